"""`plugtune compare`: the same base, the same data, one budget, several ways to customise it.

    plugtune compare arith [budget.max_steps=8] [--out runs/compare]

The usual summary says it in words (full fine-tuning: high cost, large data, full control; adapters:
low, small, modular; instruction tuning: medium, medium, behaviour). This measures it on a task:
for every method (full fine-tuning, LoRA, DoRA, IA3, Houlsby/Pfeiffer, prompt tuning, ... and an
optional SFT -> DPO row) it trains with `train()` and records trainable parameters, peak memory, wall
time and throughput, checkpoint size, held-out loss and exact match, retention (loss on general text
before and after), and, for the methods chosen for the data sweep, quality against the number of
distinct training examples. compare/report.py writes report.md, report.json and the plots.

Peak memory. A process's RSS high-water mark (ru_maxrss) never goes down, so the runs of one process
cannot be told apart. With `isolate: true` (the default) each main run trains and evaluates in its own
process (`python -m plugtune.compare.runner --worker JOB`): its peak is its own, and the increase over the
high-water mark right after loading the base isolates what training adds (gradients, optimizer state,
activations). Data-sweep runs stay in this process and report no memory. On CUDA the same two marks
come from torch.cuda.max_memory_allocated.
"""
from __future__ import annotations

import copy
import json
import os
import random
import shlex
import shutil
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch

from plugtune.adapters import load_adapter
from plugtune.adapters.merge import fold_into_base
from plugtune.compare.config import (CompareConfig, MethodSpec, dpo_run_config, family_of, load_compare_config,
                                     method_run_config, slug)
from plugtune.compare.report import (dpo_row, machine_info, method_row, print_summary, sweep_point, train_records,
                                     write_report)
from plugtune.config import RunConfig
from plugtune.data import load_examples
from plugtune.data.batching import batch_indices
from plugtune.data.formats import read_records
from plugtune.data.tokenize import IGNORE_INDEX
from plugtune.evaluation import exact_match, loss_and_perplexity, normalise_answer
from plugtune.inference.generate import GenerationConfig, generate
from plugtune.models.loading import LoadedModel, load_base
from plugtune.schema import ConfigError, from_dict, to_dict
from plugtune.tasks.chat import general_chat
from plugtune.training.engine.loop import count_parameters, peak_memory_mb
from plugtune.training.recipes.dpo import read_pairs
from plugtune.training.run import train


# ---------------------------------------------------------------- one job (in this process or a worker)


def heldout_examples(path: str, n: int, fmt: str = "auto", system_prompt: str | None = None):
    return load_examples(path, fmt, system_prompt)[:n]


def retention_examples(spec: dict) -> list:
    """General text for the forgetting measure: chatterbot-corpus conversations (question -> answer,
    loss on the answer) or the first n examples of any data file (a `text` file trains every token)."""
    if spec["source"] == "none" or spec["n"] == 0:
        return []
    if spec["source"] == "chatterbot":
        return general_chat(spec["n"])
    return load_examples(spec["source"])[: spec["n"]]


def evaluate_model(model, tokenizer, job: dict, retention: list) -> dict:
    ev = job["eval"]
    heldout = heldout_examples(job["heldout"], ev["n"], job["format"], job["system_prompt"])
    t0 = time.perf_counter()
    em = exact_match(model, tokenizer, heldout, GenerationConfig(max_new_tokens=ev["max_new_tokens"]),
                     batch_size=ev["batch_size"])
    loss = loss_and_perplexity(model, tokenizer, heldout, job["max_length"], ev["batch_size"])["loss"]
    out = {"exact_match": em.accuracy, "correct": em.correct, "total": em.total, "heldout_loss": loss,
           "samples": em.samples[: ev["samples"]]}
    if retention:
        out["retention_loss"] = loss_and_perplexity(model, tokenizer, retention, job["retention"]["max_length"],
                                                    ev["batch_size"])["loss"]
    out["eval_seconds"] = time.perf_counter() - t0
    return out


def perturb(answer: str, rng: random.Random) -> str:
    """The reference with one thing wrong: a digit changed (never to a leading zero), else two words
    swapped, else the text reversed or a character appended."""
    digits = [i for i, c in enumerate(answer) if c.isdigit()]
    if digits:
        i = rng.choice(digits)
        choices = [d for d in "0123456789" if d != answer[i] and not (d == "0" and i == 0 and len(answer) > 1)]
        return answer[:i] + rng.choice(choices) + answer[i + 1:]
    words = answer.split()
    if len(words) > 1 and len(set(words)) > 1:
        i = rng.choice([k for k in range(len(words) - 1) if words[k] != words[k + 1]])
        words[i], words[i + 1] = words[i + 1], words[i]
        return " ".join(words)
    return answer[::-1] if answer[::-1] != answer else answer + "."


def build_pairs(model, tokenizer, examples: list, rejected: str, gen_cfg, batch_size: int, seed: int = 0):
    """Preference pairs from task examples: chosen = the reference; rejected = the model's own wrong
    greedy answer (rejected=model) or, where it is right or empty, the perturbed reference."""
    answers = generate(model, tokenizer, [ex.prompt_messages() for ex in examples], gen_cfg, batch_size=batch_size)
    rng = random.Random(seed)
    rows, from_model = [], 0
    for ex, answer in zip(examples, answers):
        wrong = answer.strip() and normalise_answer(answer) != normalise_answer(ex.reference)
        use_model = rejected == "model" and wrong
        from_model += bool(use_model)
        rows.append({"prompt": ex.prompt_messages(), "chosen": ex.reference,
                     "rejected": answer if use_model else perturb(ex.reference, rng)})
    return rows, from_model


def _fresh_base(job: dict, base):
    if base is None:
        return load_base(job["model"], job["dtype"], job["device"])
    return LoadedModel(copy.deepcopy(base.model), base.tokenizer, base.path, base.name)


def _sft_model(job: dict, base):
    """The SFT row's model as the new base: its adapter folded into the weights, or its model directory."""
    artifact = Path(job["sft_artifact"])
    if not (artifact / "adapter_config.json").is_file():
        return load_base(str(artifact), job["dtype"], job["device"])
    loaded = _fresh_base(job, base)
    load_adapter(loaded.model, artifact)
    fold_into_base(loaded.model, "default")
    return loaded


def _dpo_tokens(pairs_file: str, tokenizer, run) -> int:
    """Completion tokens (chosen + rejected) the DPO stage trained on: the pair stream re-drawn."""
    items, _ = read_pairs(pairs_file, tokenizer, run, run.dpo.max_prompt_length or None)
    t, total = run.training, 0
    for i in range(t.max_steps * t.grad_accum):
        for j in batch_indices(len(items), i, t.batch_size, t.seed):
            total += sum(lab != IGNORE_INDEX for lab in items[j].chosen_labels[1:] + items[j].rejected_labels[1:])
    return total


def run_job(job: dict, base=None) -> dict:
    """Train and evaluate one run. `base` None: load it here (a worker process, memory measured);
    else train a copy of it in this process (memory not measured)."""
    run = from_dict(RunConfig, job["run_config"], where="job")
    own_process = base is None
    if own_process:
        # What the loop imports on the way (the loss-curve plot) is not training memory: import it before the
        # after-load mark. Here, not at the top: pyplot is slow to import, and the Agg backend chosen before it
        # is a process-wide setting that only a worker process should make.
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot  # noqa: F401
    retention = retention_examples(job["retention"]) if job["with_retention"] else []
    stage: dict[str, Any] = {}
    if job["kind"] == "dpo":
        loaded = _sft_model(job, base)
        device = next(loaded.model.parameters()).device
        after_load = peak_memory_mb(device)
        prompts = heldout_examples(job["train_file"], job["pairs"], job["format"], job["system_prompt"])
        t0 = time.perf_counter()
        rows, from_model = build_pairs(loaded.model, loaded.tokenizer, prompts, job["rejected"],
                                       GenerationConfig(max_new_tokens=job["eval"]["max_new_tokens"]),
                                       job["eval"]["batch_size"], run.training.seed)
        Path(run.data.train).parent.mkdir(parents=True, exist_ok=True)
        Path(run.data.train).write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
        stage = {"pairs": len(rows), "rejected_from_model": from_model, "pairs_seconds": time.perf_counter() - t0}
    else:
        loaded = _fresh_base(job, base)
        device = next(loaded.model.parameters()).device
        after_load = peak_memory_mb(device)
    report = train(run, loaded)
    memory = {"measured": own_process, "after_load_mb": after_load if own_process else None,
              "peak_mb": report.peak_memory_mb if own_process else None}
    result = {"train": asdict(report), "memory": memory,
              **stage, **evaluate_model(loaded.model, loaded.tokenizer, job, retention)}
    if job["kind"] == "dpo":
        result["supervised_tokens"] = _dpo_tokens(run.data.train, loaded.tokenizer, run)
    return result


def _run_in_worker(job: dict, job_dir: Path) -> dict:
    job_dir.mkdir(parents=True, exist_ok=True)
    job_file, result_file = job_dir / "job.json", job_dir / "result.json"
    result_file.unlink(missing_ok=True)
    job_file.write_text(json.dumps({**job, "result": str(result_file)}, indent=1))
    proc = subprocess.run([sys.executable, "-m", "plugtune.compare.runner", "--worker", str(job_file)])
    if proc.returncode != 0 or not result_file.is_file():
        raise RuntimeError(f"the worker for '{job['name']}' failed (exit {proc.returncode}); its output is above; "
                           f"rerun it alone with: {sys.executable} -m plugtune.compare.runner --worker {job_file}")
    return json.loads(result_file.read_text())


def _worker_main(job_file: str) -> None:
    job = json.loads(Path(job_file).read_text())
    torch.set_num_threads(job["threads"])
    Path(job["result"]).write_text(json.dumps(run_job(job), indent=1))


# ---------------------------------------------------------------- the comparison


def _calibrated_steps(cfg: CompareConfig, spec: MethodSpec, base, out: Path) -> tuple[int, float]:
    """Steps that fill budget.seconds: time calibration_steps steps on a copy, the first one not counted."""
    n = cfg.budget.calibration_steps
    run_dir = out / "calibration" / slug(spec.name)
    train(method_run_config(cfg, spec, n, run_dir), _fresh_base({}, base))
    elapsed = [r["elapsed_s"] for r in train_records(run_dir)]
    per_step = (elapsed[-1] - elapsed[0]) / (len(elapsed) - 1)
    shutil.rmtree(run_dir, ignore_errors=True)
    return max(1, int(cfg.budget.seconds / per_step)), per_step


def _job(cfg: CompareConfig, kind: str, name: str, run, base_run, threads: int, with_retention: bool) -> dict:
    d = base_run.data
    return {"kind": kind, "name": name, "run_config": to_dict(run), "model": base_run.model.name,
            "dtype": base_run.model.dtype, "device": base_run.model.device, "heldout": cfg.eval.data or d.eval,
            "format": d.format, "system_prompt": d.system_prompt, "max_length": d.max_length, "eval": asdict(cfg.eval),
            "retention": asdict(cfg.retention), "with_retention": with_retention, "threads": threads}


def _subset_file(train_file: str, n: int, out: Path) -> tuple[str, int]:
    """The first n records of the training file, as JSONL; (path, records). n >= all: the file itself."""
    records = read_records(train_file)
    if n >= len(records):
        return train_file, len(records)
    path = out / "data" / f"train_first{n}.jsonl"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for _, r in records[:n]))
    return str(path), n


def _tidy(run_dir: Path, keep: bool, artifact: str | None = None) -> None:
    if keep:
        return
    shutil.rmtree(run_dir / "checkpoints", ignore_errors=True)
    if artifact:
        shutil.rmtree(artifact, ignore_errors=True)


@dataclass
class _Comparison:
    """What every run of one comparison shares: the settings, the base run config, the loaded base."""

    cfg: CompareConfig
    base_run: RunConfig
    out: Path
    base: LoadedModel
    base_params: int
    threads: int  # torch threads of this process; each worker process uses as many

    def job(self, kind: str, name: str, run, with_retention: bool = True) -> dict:
        return _job(self.cfg, kind, name, run, self.base_run, self.threads, with_retention)

    def run_main(self, job: dict, run_dir: Path) -> dict:
        """A main row: in its own process when isolated (its memory measured), else on a copy of the base."""
        return _run_in_worker(job, run_dir / "worker") if self.cfg.isolate else run_job(job, self.base)


def run_compare(cfg: CompareConfig, command: str = "", plan_only: bool = False) -> dict:
    """Train and evaluate every method, the SFT -> DPO row and the data sweep; write the report."""
    base_run = from_dict(RunConfig, cfg.base, where="base")
    n_train = len(read_records(base_run.data.train))
    sizes = sorted({min(n_train, n_train if s == "all" else s) for s in cfg.data_sweep.sizes})
    plan = _plan(cfg, sizes, n_train)
    print("[compare] plan:\n" + "\n".join(f"  {line}" for line in plan))
    if plan_only:
        return {"plan": plan}
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    t_start, machine = time.perf_counter(), machine_info()
    comparison = _load_comparison(cfg, base_run, out)
    base = _evaluate_base(comparison)
    rows, steps_of, per_step_of = _run_methods(comparison)
    if cfg.sft_then_dpo.after:
        rows.append(_run_sft_then_dpo(comparison, rows))
    sweep = _run_data_sweep(comparison, rows, steps_of, sizes, n_train)
    report = {
        "title": cfg.title, "command": command, "settings": asdict(cfg), "machine": machine, "train_examples": n_train,
        "base": base, "rows": rows, "sweep": sweep, "calibration_seconds_per_step": per_step_of,
        "total_seconds": time.perf_counter() - t_start, "load_average_end": list(os.getloadavg()), "out": str(out),
    }
    write_report(report, out)
    print_summary(report)
    return report


def _load_comparison(cfg: CompareConfig, base_run: RunConfig, out: Path) -> _Comparison:
    """Load the base once: the data-sweep runs (and, when not isolated, every run) train copies of it."""
    threads = torch.get_num_threads()
    base = load_base(base_run.model.name, base_run.model.dtype, base_run.model.device)
    return _Comparison(cfg, base_run, out, base, count_parameters(base.model)[1], threads)


def _evaluate_base(c: _Comparison) -> dict:
    """The report's base entry: held-out exact match and loss, and retention loss, of the untrained base."""
    job = c.job("base", "base", c.base_run)
    print(f"[compare] evaluating the base model ({c.base_params:,} parameters) ...")
    result = evaluate_model(c.base.model, c.base.tokenizer, job, retention_examples(job["retention"]))
    return {"model": c.base_run.model.name, "params": c.base_params, "retention_loss": result.get("retention_loss"),
            **{k: result[k] for k in ("exact_match", "correct", "total", "heldout_loss", "eval_seconds", "samples")}}


def _run_methods(c: _Comparison) -> tuple[list[dict], dict[str, int], dict[str, float]]:
    """One row per method: (rows, steps of each, seconds per step of each when the budget is in seconds)."""
    cfg = c.cfg
    rows, steps_of, per_step_of = [], {}, {}
    for k, spec in enumerate(cfg.methods, start=1):
        if cfg.budget.seconds:
            steps_of[spec.name], per_step_of[spec.name] = _calibrated_steps(cfg, spec, c.base, c.out)
        else:
            steps_of[spec.name] = cfg.budget.max_steps
        run_dir = c.out / "runs" / slug(spec.name)
        run = method_run_config(cfg, spec, steps_of[spec.name], run_dir)
        print(f"[compare] {k}/{len(cfg.methods)} {spec.name}: {run.method}, {steps_of[spec.name]} steps ...")
        result = c.run_main(c.job("sft", spec.name, run), run_dir)
        rows.append(method_row(spec.name, family_of(spec), spec.method, run, result, c.base_params, run_dir))
        _tidy(run_dir, cfg.keep_checkpoints)
    return rows, steps_of, per_step_of


def _run_sft_then_dpo(c: _Comparison, rows: list[dict]) -> dict:
    """The SFT -> DPO row: the SFT row's model as the base, pairs built with it, then a DPO adapter."""
    d = c.cfg.sft_then_dpo
    sft = next(r for r in rows if r["name"] == d.after)
    run_dir = c.out / "runs" / slug(d.name)
    sft_model = None if (Path(sft["checkpoint"]) / "adapter_config.json").is_file() else sft["checkpoint"]
    run = dpo_run_config(c.cfg, run_dir / "pairs.jsonl", run_dir, sft_model)
    print(f"[compare] {d.name}: pairs from '{d.after}', DPO {d.max_steps} steps ...")
    job = {**c.job("dpo", d.name, run), "sft_artifact": sft["checkpoint"], "train_file": c.base_run.data.train,
           "pairs": d.pairs, "rejected": d.rejected}
    row = dpo_row(d, sft, run, c.run_main(job, run_dir), c.base_params, run_dir)
    _tidy(run_dir, c.cfg.keep_checkpoints)
    return row


def _run_data_sweep(c: _Comparison, rows: list[dict], steps_of: dict[str, int], sizes: list[int],
                    n_train: int) -> list[dict]:
    """Quality against data: each sweep method on the first n examples, in this process (no memory
    measured); the point with every example and the main run's steps is the main row itself."""
    cfg, sweep = c.cfg, []
    for name in cfg.data_sweep.methods:
        spec = next(s for s in cfg.methods if s.name == name)
        main = next(r for r in rows if r["name"] == name)
        steps = cfg.data_sweep.max_steps or steps_of[name]
        for n in sizes:
            if n == n_train and steps == main["steps"]:
                sweep.append(sweep_point(name, n, n_train, main, reused=True))
                continue
            train_file, _ = _subset_file(c.base_run.data.train, n, c.out)
            run_dir = c.out / "sweep" / f"{slug(name)}-n{n}"
            run = method_run_config(cfg, spec, steps, run_dir, train_file)
            print(f"[compare] data sweep: {name} on the first {n} examples, {steps} steps ...")
            result = run_job(c.job("sft", name, run, with_retention=False), c.base)
            row = method_row(name, family_of(spec), spec.method, run, result, c.base_params, run_dir)
            sweep.append(sweep_point(name, n, n_train, row, reused=False))
            _tidy(run_dir, cfg.keep_checkpoints, result["train"]["artifact"])
    return sweep


def _plan(cfg: CompareConfig, sizes: list[int], n_train: int) -> list[str]:
    steps = f"{cfg.budget.max_steps} steps" if cfg.budget.max_steps else f"~{cfg.budget.seconds:g} s"
    lines = [f"{s.name}: {s.method}, {steps} x batch {cfg.budget.batch_size * cfg.budget.grad_accum}"
             + (" (+ data sweep)" if s.name in cfg.data_sweep.methods else "") for s in cfg.methods]
    d = cfg.sft_then_dpo
    if d.after:
        lines.append(f"{d.name}: {d.pairs} pairs from '{d.after}', DPO {d.max_steps} steps x {d.batch_size} pairs")
    for name in cfg.data_sweep.methods:
        extra = [n for n in sizes if n != n_train or cfg.data_sweep.max_steps]
        lines.append(f"data sweep {name}: {len(extra)} extra runs on the first {', '.join(map(str, extra))} examples")
    rows = len(cfg.methods) + bool(d.after)
    where = "each main row in its own process" if cfg.isolate else "all in this process"
    lines.append(f"evaluation: {cfg.eval.n} held-out examples for the base, {rows} rows and each sweep run; "
                 f"retention: {cfg.retention.source} x {cfg.retention.n} for the base and the rows; {where}")
    return lines


# ---------------------------------------------------------------- CLI


def cmd_compare(args) -> None:
    overrides = list(args.overrides) + ([f"out={args.out}"] if args.out else [])
    cfg = load_compare_config(args.config, overrides)
    if args.only:
        cfg = only_methods(cfg, [n.strip() for n in args.only.split(",") if n.strip()])
    extra = (["--out", args.out] if args.out else []) + (["--only", args.only] if args.only else [])
    command = "plugtune compare " + " ".join(shlex.quote(a) for a in [args.config, *args.overrides, *extra])
    run_compare(cfg, command, plan_only=args.plan)


def only_methods(cfg: CompareConfig, names: list[str]) -> CompareConfig:
    """A copy with only the named rows (the SFT -> DPO row only when its SFT row stays)."""
    unknown = [n for n in names if n not in {m.name for m in cfg.methods}]
    if unknown:
        raise ConfigError(f"--only: no method named {', '.join(unknown)} (methods: "
                          f"{', '.join(m.name for m in cfg.methods)})")
    sweep = replace(cfg.data_sweep, methods=[m for m in cfg.data_sweep.methods if m in names])
    dpo = cfg.sft_then_dpo if cfg.sft_then_dpo.after in names else replace(cfg.sft_then_dpo, after="")
    return replace(cfg, methods=[m for m in cfg.methods if m.name in names], data_sweep=sweep, sft_then_dpo=dpo)


def add_compare_parser(subparsers) -> None:
    p = subparsers.add_parser("compare", help="train one base with several methods under one budget; write "
                                              "report.md, report.json and plots")
    p.add_argument("config", help="a compare YAML file, or a shipped one (compare)")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. budget.max_steps=8 eval.n=50 "
                                                "base.model.name=DIR methods=... isolate=false")
    p.add_argument("--out", default=None, help="output directory (default: the config's `out`)")
    p.add_argument("--only", default=None, metavar="NAME[,NAME]", help="run only these methods (row names)")
    p.add_argument("--plan", action="store_true", help="print the runs it would do and exit")
    p.set_defaults(func=cmd_compare)


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--worker":
        _worker_main(sys.argv[2])
    else:
        sys.exit("usage: python -m plugtune.compare.runner --worker JOB.json   (plugtune compare CONFIG runs a comparison)")
