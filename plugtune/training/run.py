"""`train(config)`: read and tokenize the data, load the base, attach the adapter(s) (or unfreeze
everything), run the loop, and write the result: an adapter directory (PEFT format), a pool of
adapter directories plus a router (multi-task), or, for full fine-tuning, a model directory that
plain transformers loads.
"""
from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import yaml

from plugtune.adapters import attach_adapter, save_adapter
from plugtune.config import RunConfig, to_dict
from plugtune.data import load_examples, micro_batch, tokenize_dataset
from plugtune.data.batching import collate
from plugtune.models.loading import LoadedModel, autocast_dtype, load_base
from plugtune.training.loop import FitResult, IndexedBatches, fit


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


def _single_task_data(cfg: RunConfig, tok) -> tuple[IndexedBatches, list | None, str]:
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
    return source, eval_batches, stats.summary()


def train(cfg: RunConfig, loaded: LoadedModel | None = None) -> TrainReport:
    """One adapter (or full fine-tuning) on data.train, or, with an `adapters:` section, several
    adapters at once in shared mixed batches (training/multitask.py)."""
    if not cfg.data.train and not cfg.adapters:
        raise ValueError("data.train is not set: pass a JSONL/JSON file (e.g. data.train=my_data.jsonl)")
    out = Path(cfg.output.dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.yaml").write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
    groups, objective = None, None
    if cfg.adapters:
        from plugtune.training import multitask

        loaded = loaded or load_base(cfg.model.name, cfg.model.dtype, cfg.model.device)
        # Read (and so validate) the data before spending time on the adapters.
        tasks, eval_batches, prompts, notes = multitask.load_tasks(cfg, loaded.tokenizer)
        print("[plugtune] train data: " + "; ".join(notes))
        torch.manual_seed(cfg.training.seed)  # adapter initialisation is part of the run's randomness
        groups = multitask.attach_tasks(loaded.model, cfg)
        source = multitask.MixedTaskBatches(tasks, cfg.training.grad_accum, loaded.tokenizer.pad_token_id)
        objective, summary = multitask.MultiTaskLMObjective(), "; ".join(notes)
    else:
        if loaded is not None:
            tok = loaded.tokenizer
        else:
            from plugtune.models.loading import load_tokenizer

            tok = load_tokenizer(cfg.model.name)
        source, eval_batches, summary = _single_task_data(cfg, tok)  # validates the data before the model loads
        torch.manual_seed(cfg.training.seed)
        loaded = prepare_model(cfg, loaded)
    model, tok = loaded.model, loaded.tokenizer
    device = next(model.parameters()).device
    result: FitResult = fit(model, source, cfg.training, out, objective=objective, eval_batches=eval_batches,
                            device=device, amp=autocast_dtype(cfg.model.dtype, device), resume=cfg.output.resume,
                            groups=groups)
    if cfg.adapters:
        artifact = multitask.save_tasks(model, tok, cfg, out, prompts)
    elif cfg.method == "full":
        artifact = out / "model"
        model.save_pretrained(artifact, safe_serialization=True)
        tok.save_pretrained(artifact)
    else:
        artifact = save_adapter(model, out / "adapter", "default", base_name=cfg.model.name)
    report = TrainReport(
        out_dir=str(out), artifact=str(artifact), method="multitask" if cfg.adapters else cfg.method,
        steps=result.steps, train_loss=result.train_loss, eval_loss=result.eval_loss,
        train_seconds=result.train_seconds, tokens_per_second=result.tokens / max(result.train_seconds, 1e-9),
        trainable_params=result.trainable_params, total_params=result.total_params,
        peak_memory_mb=result.peak_memory_mb, data=summary, eval_metrics=result.eval_metrics)
    (out / "train_report.json").write_text(json.dumps(asdict(report), indent=2))
    return report
