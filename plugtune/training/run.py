"""`train(config)`: load the base, attach the adapter (or unfreeze everything), read and tokenize
the data, run the loop, and write the result: an adapter directory (PEFT format) or, for full
fine-tuning, a model directory that plain transformers loads.
"""
from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
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


def prepare_model(cfg: RunConfig, loaded: LoadedModel | None = None) -> LoadedModel:
    loaded = loaded or load_base(cfg.model.name, cfg.model.dtype, cfg.model.device)
    if cfg.method == "full":
        for p in loaded.model.parameters():
            p.requires_grad_(True)
    else:
        attach_adapter(loaded.model, cfg.method, cfg.adapter, name="default", trainable=True)
    return loaded


def train(cfg: RunConfig, loaded: LoadedModel | None = None) -> TrainReport:
    if not cfg.data.train:
        raise ValueError("data.train is not set: pass a JSONL/JSON file (e.g. data.train=my_data.jsonl)")
    out = Path(cfg.output.dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.yaml").write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
    # Read (and so validate) the data before spending time on the model.
    train_examples = load_examples(cfg.data.train, cfg.data.format, cfg.data.system_prompt)
    eval_examples = load_examples(cfg.data.eval, cfg.data.format, cfg.data.system_prompt) if cfg.data.eval else []
    if cfg.data.eval_limit:
        eval_examples = eval_examples[: cfg.data.eval_limit]
    torch.manual_seed(cfg.training.seed)  # adapter initialisation is part of the run's randomness
    loaded = prepare_model(cfg, loaded)
    model, tok = loaded.model, loaded.tokenizer
    device = next(model.parameters()).device

    train_items, stats = tokenize_dataset(tok, train_examples, cfg.data.max_length, cfg.data.overflow, cfg.data.train_on)
    print(f"[plugtune] train data: {stats.summary()}")
    if not train_items:
        raise ValueError(f"{cfg.data.train}: no usable examples after tokenization ({stats.summary()})")
    eval_batches = None
    if eval_examples:
        eval_items, eval_stats = tokenize_dataset(tok, eval_examples, cfg.data.max_length, cfg.data.overflow,
                                                  cfg.data.train_on)
        print(f"[plugtune] eval data: {eval_stats.summary()}")
        bs = cfg.training.batch_size
        eval_batches = [collate(eval_items[i:i + bs], tok.pad_token_id) for i in range(0, len(eval_items), bs)]

    t = cfg.training
    source = IndexedBatches(lambda i: micro_batch(train_items, i, t.batch_size, t.seed, tok.pad_token_id),
                            len(train_items), t.batch_size, t.grad_accum)
    result: FitResult = fit(model, source, t, out, eval_batches=eval_batches, device=device,
                            amp=autocast_dtype(cfg.model.dtype, device), resume=cfg.output.resume)

    if cfg.method == "full":
        artifact = out / "model"
        model.save_pretrained(artifact, safe_serialization=True)
        tok.save_pretrained(artifact)
    else:
        artifact = save_adapter(model, out / "adapter", "default", base_name=cfg.model.name)
    report = TrainReport(
        out_dir=str(out), artifact=str(artifact), method=cfg.method, steps=result.steps,
        train_loss=result.train_loss, eval_loss=result.eval_loss, train_seconds=result.train_seconds,
        tokens_per_second=result.tokens / max(result.train_seconds, 1e-9), trainable_params=result.trainable_params,
        total_params=result.total_params, peak_memory_mb=result.peak_memory_mb, data=stats.summary())
    (out / "train_report.json").write_text(json.dumps(asdict(report), indent=2))
    return report
