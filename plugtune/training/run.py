"""`train(config)`: read and tokenize the data, load the base, attach the adapter(s) (or unfreeze
everything), run the loop, and write the result: an adapter directory (PEFT format), a pool of
adapter directories plus a router (multi-task), or, for full fine-tuning, a model directory that
plain transformers loads.
"""
from __future__ import annotations

import importlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import torch
import yaml

from plugtune.adapters import attach_adapter, save_adapter
from plugtune.config import RunConfig, to_dict
from plugtune.data import load_examples, micro_batch, tokenize_dataset
from plugtune.data.batching import collate
from plugtune.models.loading import LoadedModel, autocast_dtype, load_base, load_tokenizer
from plugtune.training.loop import BatchSource, FitResult, IndexedBatches, ParamGroup, fit
from plugtune.training.objectives import Objective


@dataclass
class TrainReport:
    out_dir: str
    artifact: str  # adapter or model directory
    method: str
    steps: int
    train_loss: float
    eval_loss: float | None
    train_seconds: float
    tokens_per_second: float
    trainable_params: int
    total_params: int
    peak_memory_mb: float
    data: str  # tokenization summary
    eval_metrics: dict = field(default_factory=dict)  # the objective's own evaluation at the end


def prepare_model(cfg: RunConfig, loaded: LoadedModel | None = None) -> LoadedModel:
    loaded = loaded or load_base(cfg.model.name, cfg.model.dtype, cfg.model.device)
    if cfg.method == "full":
        for p in loaded.model.parameters():
            p.requires_grad_(True)
    else:
        attach_adapter(loaded.model, cfg.method, cfg.adapter, name="default", trainable=True)
    return loaded


@dataclass
class Setup:
    """Everything the loop needs for one objective, and how to write the result."""

    loaded: LoadedModel
    source: BatchSource
    save: Callable[[Path], Path]  # writes the artifact under the output dir, returns its path
    objective: Objective | None = None  # None: next-token loss
    groups: list[ParamGroup] | None = None
    eval_batches: list | None = None
    summary: str = ""


# Objectives beyond SFT live in their own modules, each with `prepare(cfg, loaded) -> Setup`.
_OBJECTIVE_MODULES = {"reward": "plugtune.training.reward", "dpo": "plugtune.training.dpo",
                      "ppo": "plugtune.training.ppo", "grpo": "plugtune.training.grpo"}


def save_policy(cfg: RunConfig, loaded: LoadedModel, out: Path, name: str = "default") -> Path:
    """The trained weights: an adapter directory (PEFT format), or a full model directory."""
    if cfg.method == "full":
        artifact = out / "model"
        loaded.model.save_pretrained(artifact, safe_serialization=True)
        loaded.tokenizer.save_pretrained(artifact)
        return artifact
    return save_adapter(loaded.model, out / "adapter", name, base_name=cfg.model.name)


def _prepare_sft(cfg: RunConfig, loaded: LoadedModel | None) -> Setup:
    tok = loaded.tokenizer if loaded is not None else load_tokenizer(cfg.model.name)
    train_examples = load_examples(cfg.data.train, cfg.data.format, cfg.data.system_prompt)
    train_items, stats = tokenize_dataset(tok, train_examples, cfg.data.max_length, cfg.data.overflow, cfg.data.train_on)
    print(f"[plugtune] train data: {stats.summary()}")
    if not train_items:
        raise ValueError(f"{cfg.data.train}: no usable examples after tokenization ({stats.summary()})")
    eval_batches = None
    if cfg.data.eval:
        eval_examples = load_examples(cfg.data.eval, cfg.data.format, cfg.data.system_prompt)
        if cfg.data.eval_limit:
            eval_examples = eval_examples[: cfg.data.eval_limit]
        eval_items, eval_stats = tokenize_dataset(tok, eval_examples, cfg.data.max_length, cfg.data.overflow,
                                                  cfg.data.train_on)
        print(f"[plugtune] eval data: {eval_stats.summary()}")
        bs = cfg.training.batch_size
        eval_batches = [collate(eval_items[i:i + bs], tok.pad_token_id) for i in range(0, len(eval_items), bs)]
    t = cfg.training
    source = IndexedBatches(lambda i: micro_batch(train_items, i, t.batch_size, t.seed, tok.pad_token_id),
                            len(train_items), t.batch_size, t.grad_accum)
    torch.manual_seed(cfg.training.seed)  # adapter initialisation is part of the run's randomness
    loaded = prepare_model(cfg, loaded)  # after the data: bad data fails before the model loads
    return Setup(loaded, source, lambda out: save_policy(cfg, loaded, out), eval_batches=eval_batches,
                 summary=stats.summary())


def _prepare_multitask(cfg: RunConfig, loaded: LoadedModel | None) -> Setup:
    from plugtune.training import multitask

    loaded = loaded or load_base(cfg.model.name, cfg.model.dtype, cfg.model.device)
    tasks, eval_batches, prompts, notes = multitask.load_tasks(cfg, loaded.tokenizer)
    print("[plugtune] train data: " + "; ".join(notes))
    torch.manual_seed(cfg.training.seed)
    groups = multitask.attach_tasks(loaded.model, cfg)
    source = multitask.MixedTaskBatches(tasks, cfg.training.grad_accum, loaded.tokenizer.pad_token_id)
    return Setup(loaded, source, lambda out: multitask.save_tasks(loaded.model, loaded.tokenizer, cfg, out, prompts),
                 multitask.MultiTaskLMObjective(), groups, eval_batches, "; ".join(notes))


def train(cfg: RunConfig, loaded: LoadedModel | None = None) -> TrainReport:
    """Train what `cfg` says: one adapter (or full fine-tuning) with next-token loss on data.train;
    several adapters at once in shared mixed batches (an `adapters:` section); or a reward model,
    the DPO family, PPO or GRPO (`objective:`). One loop runs them all."""
    if not cfg.data.train and not cfg.adapters:
        raise ValueError("data.train is not set: pass a data file (e.g. data.train=my_data.jsonl)")
    out = Path(cfg.output.dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.yaml").write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
    if cfg.adapters:
        setup = _prepare_multitask(cfg, loaded)
    elif cfg.objective == "sft":
        setup = _prepare_sft(cfg, loaded)
    else:
        setup = importlib.import_module(_OBJECTIVE_MODULES[cfg.objective]).prepare(cfg, loaded)
    model = setup.loaded.model
    device = next(model.parameters()).device
    result: FitResult = fit(model, setup.source, cfg.training, out, objective=setup.objective,
                            eval_batches=setup.eval_batches, device=device,
                            amp=autocast_dtype(cfg.model.dtype, device), resume=cfg.output.resume, groups=setup.groups)
    artifact = setup.save(out)
    method = "multitask" if cfg.adapters else cfg.method if cfg.objective == "sft" else f"{cfg.objective} ({cfg.method})"
    report = TrainReport(
        out_dir=str(out), artifact=str(artifact), method=method,
        steps=result.steps, train_loss=result.train_loss, eval_loss=result.eval_loss,
        train_seconds=result.train_seconds, tokens_per_second=result.tokens / max(result.train_seconds, 1e-9),
        trainable_params=result.trainable_params, total_params=result.total_params,
        peak_memory_mb=result.peak_memory_mb, data=setup.summary, eval_metrics=result.eval_metrics)
    (out / "train_report.json").write_text(json.dumps(asdict(report), indent=2))
    return report
