"""`train(config)`: read and tokenize the data, load the base, attach the adapter(s) (or unfreeze
everything), run the loop, and write the result: an adapter directory (PEFT format), a pool of
adapter directories plus a router (multi-task), or, for full fine-tuning, a model directory that
plain transformers loads.
"""
from __future__ import annotations

import importlib
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import torch

from plugtune.adapters import attach_adapter, save_adapter
from plugtune.config import RunConfig, to_dict
from plugtune.data import load_examples, tokenize_dataset
from plugtune.data.batching import batch_indices, grouped_batch_indices
from plugtune.data.packing import choose_layout
from plugtune.models.loading import LoadedModel, autocast_dtype, check_max_length, load_base, load_tokenizer
from plugtune.training.loop import BatchSource, FitResult, IndexedBatches, ParamGroup, fit
from plugtune.training.objectives import Objective
from plugtune.training.speed import enable_gradient_checkpointing, set_threads


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
    t, d = cfg.training, cfg.data
    tok = loaded.tokenizer if loaded is not None else load_tokenizer(cfg.model.name)
    train_examples = load_examples(d.train, d.format, d.system_prompt)
    train_items, stats = tokenize_dataset(tok, train_examples, d.max_length, d.overflow, d.train_on)
    print(f"[plugtune] train data: {stats.summary()}")
    if not train_items:
        raise ValueError(f"{d.train}: no usable examples after tokenization ({stats.summary()})")
    eval_items = None
    if d.eval:
        eval_examples = load_examples(d.eval, d.format, d.system_prompt)
        if d.eval_limit:
            eval_examples = eval_examples[: d.eval_limit]
        eval_items, eval_stats = tokenize_dataset(tok, eval_examples, d.max_length, d.overflow, d.train_on)
        print(f"[plugtune] eval data: {eval_stats.summary()}")
    longest = max(stats.max_tokens, eval_stats.max_tokens if eval_items is not None else 0)
    check_max_length(loaded.path if loaded is not None else cfg.model.name, d.max_length, longest)
    torch.manual_seed(t.seed)  # adapter initialisation is part of the run's randomness
    loaded = prepare_model(cfg, loaded)  # after the data: bad data fails before the model loads
    # A micro-batch is batch_size examples either way (the same ones with or without packing, so the
    # optimizer trajectory is unchanged); packing or grouping only changes how they are laid out.
    layout = choose_layout(d.packing, d.group_by_length, loaded.model, d.packed_attention)
    print(f"[plugtune] batches: {layout.note}")
    pad, bs = tok.pad_token_id, t.batch_size
    lengths = tuple(len(it.input_ids) for it in train_items)

    def make_batch(i: int) -> dict:
        chosen = grouped_batch_indices(lengths, i, bs, t.seed) if layout.group else batch_indices(len(lengths), i, bs, t.seed)
        return layout.collate([train_items[j] for j in chosen], pad, d.max_length)

    eval_batches = None
    if eval_items:  # the eval loss is a sum over tokens: any order and layout give the same value
        if layout.pack or layout.group:
            eval_items = sorted(eval_items, key=lambda it: len(it.input_ids))
        eval_batches = [layout.collate(eval_items[i:i + bs], pad, d.max_length) for i in range(0, len(eval_items), bs)]
    source = IndexedBatches(make_batch, len(train_items), bs, t.grad_accum)
    return Setup(loaded, source, lambda out: save_policy(cfg, loaded, out), eval_batches=eval_batches,
                 summary=f"{stats.summary()}; {layout.note}")


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
    the DPO family, PPO or GRPO (`objective:`). One loop runs them all.

    Under torchrun every process calls this: each trains on its share of the data (distributed.py);
    rank 0 alone writes checkpoints, logs, trackers and the artifact, the others wait for it."""
    from plugtune.training.checkpoint import check_output, publish, write_json, write_output
    from plugtune.training.distributed import full_params, shard_model, shard_source, start
    from plugtune.training.tracking import check_names, make_tracker

    if not cfg.data.train and not cfg.adapters:
        raise ValueError("data.train is not set: pass a data file (e.g. data.train=my_data.jsonl)")
    check_names(cfg.training.report_to)
    set_threads(cfg.training.threads)
    config = to_dict(cfg)  # as given (before the per-process device below)
    cfg, dist = start(cfg)
    try:
        out = Path(cfg.output.dir)
        resuming = check_output(out, config, cfg.output.resume, cfg.output.overwrite, dist)
        if cfg.adapters:
            setup = _prepare_multitask(cfg, loaded)
        elif cfg.objective == "sft":
            setup = _prepare_sft(cfg, loaded)
        else:
            setup = importlib.import_module(_OBJECTIVE_MODULES[cfg.objective]).prepare(cfg, loaded)
        write_output(out, config, cfg.output.overwrite, dist)  # only now: bad data never touches `out`
        model = setup.loaded.model
        device = next(model.parameters()).device
        if cfg.training.gradient_checkpointing:  # every objective: heads and adapters keep their gradients
            enable_gradient_checkpointing(model)
        if dist.mode == "fsdp":
            shard_model(model, dist)
            reference = getattr(setup.objective, "reference", None)
            if isinstance(reference, torch.nn.Module):  # DPO's frozen copy (full fine-tuning)
                shard_model(reference, dist)
        source = shard_source(setup.source, dist, paired=cfg.objective in ("dpo", "reward"))
        tracker = make_tracker(cfg.training.report_to, out, config, resuming) if dist.is_main else None
        try:
            result: FitResult = fit(model, source, cfg.training, out, objective=setup.objective,
                                    eval_batches=setup.eval_batches, device=device,
                                    amp=autocast_dtype(cfg.model.dtype, device), resume=cfg.output.resume,
                                    groups=setup.groups, dist=dist, tracker=tracker, run_config=config)
        finally:
            if tracker is not None:
                tracker.close()
        with full_params(model, dist):  # FSDP: rank 0 gets full copies of the sharded weights
            artifact = publish(setup.save, out) if dist.is_main else None
        artifact = dist.broadcast_object(artifact)
        method = "multitask" if cfg.adapters else cfg.method if cfg.objective == "sft" else f"{cfg.objective} ({cfg.method})"
        report = TrainReport(
            out_dir=str(out), artifact=str(artifact), method=method,
            steps=result.steps, train_loss=result.train_loss, eval_loss=result.eval_loss,
            train_seconds=result.train_seconds, tokens_per_second=result.tokens / max(result.train_seconds, 1e-9),
            trainable_params=result.trainable_params, total_params=result.total_params,
            peak_memory_mb=result.peak_memory_mb, data=setup.summary, eval_metrics=result.eval_metrics)
        if dist.is_main:
            write_json(out / "train_report.json", asdict(report))
        dist.barrier()
        return report
    finally:
        dist.close()
