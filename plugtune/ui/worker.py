"""The process behind one background job of the page (jobs.py starts it detached):

    python -m plugtune.ui.worker train JOB_DIR CONFIG.yaml [key=value ...]    # plugtune train, same code
    python -m plugtune.ui.worker merge JOB_DIR MODEL ADAPTER OUT              # plugtune merge
    python -m plugtune.ui.worker gguf JOB_DIR MODEL ADAPTER OUT QUANT         # plugtune export --format gguf
    python -m plugtune.ui.worker checkpoint JOB_DIR RUN_CONFIG CHECKPOINT OUT # a checkpoint as an adapter

It records its state in JOB_DIR/state.json (atomically), so the page can read it back at any time.
SIGTERM (the page's Stop) ends it as `stopped`; a training run keeps its checkpoints and resumes
from the last one.
"""
from __future__ import annotations

import json
import os
import signal
import sys
import time
import traceback
from dataclasses import asdict
from pathlib import Path

import yaml

from plugtune.ui.jobs import STATE, read_json, write_json_atomic


class Stopped(BaseException):
    """SIGTERM: unwinds through the training loop (not an Exception, so nothing swallows it)."""


def _update(job_dir: Path, **fields) -> None:
    write_json_atomic(job_dir / STATE, {**(read_json(job_dir / STATE) or {}), **fields, "updated": time.time()})


def run_train(job_dir: Path, config: str, overrides: list[str]) -> dict:
    """What `plugtune train CONFIG key=value ...` does (cli.cmd_train): one run, or a pipeline of stages."""
    from plugtune.config import load_run_config
    from plugtune.training.pipeline import is_pipeline, run_pipeline
    from plugtune.training.run import train

    if is_pipeline(config):
        return asdict(run_pipeline(config, overrides))
    cfg = load_run_config(config, overrides)
    _update(job_dir, max_steps=cfg.training.max_steps, out_dir=cfg.output.dir)
    report = train(cfg)
    return asdict(report)


def run_merge(job_dir: Path, model: str, adapter: str, out: str) -> dict:
    from plugtune.adapters.merge import merge_and_save
    from plugtune.api import load

    _update(job_dir, progress=0.1, stage="loading the base model and the adapter")
    lm = load(model, adapter, "float32", "cpu")
    _update(job_dir, progress=0.5, stage="merging the adapter into the base and saving")
    path = merge_and_save(lm.model, lm.tokenizer, out)
    return {"out": str(path)}


def run_gguf(job_dir: Path, model: str, adapter: str, out: str, quant: str) -> dict:
    """`plugtune export --format gguf`: the base with the adapter merged, as one GGUF file (plugtune.export)."""
    from plugtune.export import export_gguf

    _update(job_dir, progress=0.2, stage=f"writing {Path(out).name} ({quant})")
    result = export_gguf(out, model=model, adapter=adapter, quant=quant)
    return {"out": str(result.path), "bytes": result.path.stat().st_size}


def run_checkpoint(job_dir: Path, run_config: str, checkpoint: str, out: str) -> dict:
    """The adapter as it was at a checkpoint: the run's base and fresh adapter, the checkpoint's
    trainable weights loaded into it, saved in the adapter format."""
    from plugtune.adapters import save_adapter
    from plugtune.config import from_dict, RunConfig
    from plugtune.models.loading import read_safetensors
    from plugtune.training.engine.checkpoint import WEIGHTS
    from plugtune.training.run import prepare_model

    if (Path(out) / "adapter_config.json").is_file():  # made before: the same weights
        return {"out": out}
    cfg = from_dict(RunConfig, yaml.safe_load(Path(run_config).read_text()), where=run_config)
    if cfg.method == "full" or cfg.adapters:
        raise ValueError("only single-adapter runs have checkpoints that are adapters (this run is "
                         f"{'full fine-tuning' if cfg.method == 'full' else 'multi-task'})")
    _update(job_dir, progress=0.2, stage="loading the base model")
    loaded = prepare_model(cfg)
    weights = read_safetensors(Path(checkpoint) / WEIGHTS)
    missing = set(weights) - {n for n, _ in loaded.model.named_parameters()}
    if missing:
        raise ValueError(f"{checkpoint} has weights this run's model lacks: {sorted(missing)[:3]}")
    loaded.model.load_state_dict(weights, strict=False)
    _update(job_dir, progress=0.7, stage="saving the adapter")
    tmp = Path(out).with_name(Path(out).name + ".tmp")
    save_adapter(loaded.model, tmp, "default")
    os.replace(tmp, out)
    return {"out": out}


JOBS = {"train": lambda d, a: run_train(d, a[0], a[1:]), "merge": lambda d, a: run_merge(d, *a),
        "gguf": lambda d, a: run_gguf(d, *a),
        "checkpoint": lambda d, a: run_checkpoint(d, *a)}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    kind, job_dir, args = argv[0], Path(argv[1]), argv[2:]

    def on_term(signum, frame):
        raise Stopped()

    signal.signal(signal.SIGTERM, on_term)
    _update(job_dir, state="running", pid=os.getpid(), progress=0.0)
    try:
        result = JOBS[kind](job_dir, args)
    except Stopped:
        _update(job_dir, state="stopped", error=None)
        print("[plugtune ui] stopped", flush=True)
        return 143
    except BaseException as exc:  # noqa: BLE001 - recorded for the page, traceback in the log
        traceback.print_exc()
        message = " ".join(str(exc).split()) or type(exc).__name__
        _update(job_dir, state="failed", error=f"{type(exc).__name__}: {message}")
        return 1
    _update(job_dir, state="finished", progress=1.0, result=json.loads(json.dumps(result, default=str)), error=None)
    print("[plugtune ui] finished", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
