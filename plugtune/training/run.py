"""`train(config)`: the orchestrator on top of the training layers. It checks the output directory,
asks the recipe (recipes/) to read the data, load the base and attach the adapter(s) or unfreeze
everything, runs the one loop (engine/loop.py) and publishes the result atomically: an adapter
directory (PEFT format), a pool of adapter directories plus a router (multi-task), a reward model,
or, for full fine-tuning, a model directory that plain transformers loads.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from plugtune.training.config import RunConfig, to_dict
from plugtune.inference.router import fit_router
from plugtune.models.loading import LoadedModel, autocast_dtype, load_base
from plugtune.training.engine.checkpoint import check_output, publish, write_json, write_output
from plugtune.training.engine.distributed import full_params, shard_model, shard_source, start
from plugtune.training.engine.loop import FitResult, fit
from plugtune.training.engine.speed import enable_gradient_checkpointing, set_threads
from plugtune.training.engine.tracking import check_names, make_tracker
from plugtune.training.recipes import RECIPES, multitask
from plugtune.training.recipes.common import Setup, prepare_model

__all__ = ["TrainReport", "prepare_model", "train"]


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


def _prepare(cfg: RunConfig, loaded: LoadedModel | None) -> Setup:
    """The recipe's setup; a multi-task run also publishes a router fitted on its adapters' prompts."""
    if loaded is None and cfg.model.quantize != "none":  # every recipe then starts from the quantized base
        loaded = load_base(cfg.model.name, cfg.model.dtype, cfg.model.device, cfg.model.quantize)
    if not cfg.adapters:
        return RECIPES[cfg.objective].prepare(cfg, loaded)
    setup = multitask.prepare(cfg, loaded)
    if not cfg.router.build:
        return setup
    save_pool = setup.save

    def save_with_router(out: Path) -> Path:
        pool_dir = save_pool(out)
        router = fit_router(setup.loaded.model, setup.loaded.tokenizer, setup.router_prompts, kind=cfg.router.kind,
                            shipped=cfg.router.shipped_negatives, false_route_rate=cfg.router.false_route_rate)
        router.save(pool_dir / "router")
        return pool_dir

    setup.save = save_with_router
    return setup


def train(cfg: RunConfig, loaded: LoadedModel | None = None) -> TrainReport:
    """Train what `cfg` says: one adapter (or full fine-tuning) with next-token loss on data.train;
    several adapters at once in shared mixed batches (an `adapters:` section); or a reward model,
    the DPO family, PPO or GRPO (`objective:`). One loop runs them all.

    Under torchrun every process calls this: each trains on its share of the data (distributed.py);
    rank 0 alone writes checkpoints, logs, trackers and the artifact, the others wait for it."""
    if not cfg.data.train and not cfg.adapters:
        raise ValueError("data.train is not set: pass a data file (e.g. data.train=my_data.jsonl)")
    check_names(cfg.training.report_to)
    set_threads(cfg.training.threads)
    config = to_dict(cfg)  # as given (before the per-process device below)
    cfg, dist = start(cfg)
    try:
        out = Path(cfg.output.dir)
        resuming = check_output(out, config, cfg.output.resume, cfg.output.overwrite, dist)
        setup = _prepare(cfg, loaded)
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
        source = shard_source(setup.source, dist)
        tracker = make_tracker(cfg.training.report_to, out, config, resuming) if dist.is_main else None
        try:
            result: FitResult = fit(model, source, cfg.training, out, objective=setup.objective,
                                    eval_batches=setup.eval_batches, device=device,
                                    amp=autocast_dtype(cfg.model.dtype, device), resume=cfg.output.resume,
                                    groups=setup.groups, dist=dist, tracker=tracker, run_config=config,
                                    plot=cfg.output.plot)
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
