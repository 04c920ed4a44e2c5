"""Sequence classification: the objective, batching, accuracy, and `train_classifier`, which fine-tunes
an encoder on the chatterbot-corpus topics fully or with an adapter through the one loop (loop.fit).

With an adapter the new classification head must train too, or it stays random: it is put in the
adapter's `modules_to_save` (PEFT does the same for task_type=SEQ_CLS: ['classifier', 'score']).
"""
from __future__ import annotations

import random
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from plugtune.adapters import attach_adapter, get_method, save_adapter
from plugtune.adapters.layers import base_parameters
from plugtune.models.encoder import load_encoder_classifier
from plugtune.tasks.topics import topic_split
from plugtune.training.engine.loop import fit
from plugtune.training.engine.settings import TrainingConfig
from plugtune.training.engine.types import IndexedBatches

HEAD_NAMES = ["classifier", "score"]  # BERT-style / decoder heads, as PEFT names them for SEQ_CLS


class ClassificationObjective:
    """Summed cross-entropy of the model's logits (B, num_labels) against one label per example;
    the loop divides by `units` = examples in the accumulated batch, giving the mean over examples."""

    def units(self, batch: dict[str, torch.Tensor]) -> int:
        return int(batch["labels"].numel())

    def __call__(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict]:
        logits = model(**model_inputs(batch)).logits  # (B, num_labels)
        loss_sum = F.cross_entropy(logits.float(), batch["labels"], reduction="sum")
        accuracy = (logits.argmax(-1) == batch["labels"]).float().mean()
        return loss_sum, {"accuracy": accuracy.detach()}


def model_inputs(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v for k, v in batch.items() if k in ("input_ids", "attention_mask", "token_type_ids")}


def collate(tokenizer, texts: list[str], labels: list[int], max_length: int = 64) -> dict[str, torch.Tensor]:
    """Tokenize a batch, padded to its longest text (short batches cost less on CPU)."""
    enc = tokenizer(texts, padding=True, truncation=True, max_length=max_length, return_tensors="pt")
    return {**dict(enc), "labels": torch.tensor(labels, dtype=torch.long)}


def batch_stream(tokenizer, texts: list[str], labels: list[int], batch_size: int, max_length: int = 64,
                 seed: int = 0):
    """make_batch(i) for loop.fit: micro-batch i of a fixed stream that reshuffles every epoch (seeded);
    the last partial batch of an epoch is dropped so every micro-batch has `batch_size` examples."""
    per_epoch = max(1, len(texts) // batch_size)
    orders: dict[int, list[int]] = {}

    def make_batch(i: int) -> dict[str, torch.Tensor]:
        epoch, k = divmod(i, per_epoch)
        if epoch not in orders:
            orders[epoch] = random.Random(seed * 100_003 + epoch).sample(range(len(texts)), len(texts))
        idx = orders[epoch][k * batch_size:(k + 1) * batch_size]
        return collate(tokenizer, [texts[j] for j in idx], [labels[j] for j in idx], max_length)

    return make_batch


@torch.no_grad()
def evaluate_accuracy(model: nn.Module, tokenizer, texts: list[str], labels: list[int], batch_size: int = 64,
                      max_length: int = 64) -> dict[str, float]:
    """Accuracy, balanced accuracy (mean recall over the classes present: the topics are imbalanced)
    and mean cross-entropy."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    order = sorted(range(len(texts)), key=lambda i: len(texts[i]))  # similar lengths: less padding
    preds, loss = [0] * len(texts), 0.0
    for start in range(0, len(order), batch_size):
        idx = order[start:start + batch_size]
        batch = collate(tokenizer, [texts[i] for i in idx], [labels[i] for i in idx], max_length)
        batch = {k: v.to(device) for k, v in batch.items()}
        logits = model(**model_inputs(batch)).logits.float()
        loss += float(F.cross_entropy(logits, batch["labels"], reduction="sum"))
        for i, p in zip(idx, logits.argmax(-1).tolist()):
            preds[i] = p
    model.train(was_training)
    hits = [p == y for p, y in zip(preds, labels)]
    recalls = [sum(h for h, y in zip(hits, labels) if y == c) / labels.count(c) for c in sorted(set(labels))]
    return {"accuracy": sum(hits) / len(hits), "balanced_accuracy": sum(recalls) / len(recalls),
            "loss": loss / len(labels)}


@dataclass
class ClassifierResult:
    method: str
    accuracy: float
    balanced_accuracy: float
    eval_loss: float
    trainable_params: int
    base_params: int
    pct_of_base: float
    train_seconds: float
    steps: int
    final_train_loss: float


def prepare_classifier(model: nn.Module, method: str, adapter_cfg: Any = None) -> int:
    """Make `model` trainable for `method` ('full' or an adapter method); returns the base's parameter count."""
    base = sum(p.numel() for p in base_parameters(model).values())
    if method == "full":
        if adapter_cfg:
            raise ValueError("method 'full' trains every parameter; it takes no adapter config")
        model.requires_grad_(True)
        return base
    adapter = get_method(method)
    cfg = adapter.parse_config(adapter_cfg or {})
    if not hasattr(cfg, "modules_to_save"):
        raise ValueError(f"adapter method '{method}' has no modules_to_save, so it cannot train the new "
                         "classification head; use lora, ia3 or bottleneck")
    if cfg.modules_to_save is None:
        cfg.modules_to_save = list(HEAD_NAMES)
    attach_adapter(model, adapter, cfg, trainable=True)
    return base


def train_classifier(model_name: str, method: str, adapter_cfg: Any, cfg: TrainingConfig, out_dir: str | Path,
                     max_length: int = 64, data=None, device: str | torch.device = "cpu",
                     save: bool = True) -> ClassifierResult:
    """Fine-tune encoder `model_name` (e.g. 'minilm-l6') on the topic split with `method`; measure test accuracy.

    `data`: a TopicSplit (default: topics.topic_split()). Writes metrics.jsonl, the final checkpoint
    (trainable weights; removed with save=False) and, for an adapter, the adapter under out_dir/adapter.
    train_seconds is loop.fit's: the training steps plus writing that checkpoint.
    """
    data = data or topic_split()
    model, tokenizer = load_encoder_classifier(model_name, len(data.label_names), seed=cfg.seed,
                                               label_names=data.label_names)
    model.to(device)
    base = prepare_classifier(model, method, adapter_cfg)
    out = Path(out_dir)
    make_batch = batch_stream(tokenizer, data.train_texts, data.train_labels, cfg.batch_size, max_length, cfg.seed)
    source = IndexedBatches(make_batch, len(data.train_texts), cfg.batch_size, cfg.grad_accum)
    result = fit(model, source, cfg, out, objective=ClassificationObjective(), device=torch.device(device),
                 resume="never")
    scores = evaluate_accuracy(model, tokenizer, data.test_texts, data.test_labels, max_length=max_length)
    if save and method != "full":
        save_adapter(model, out / "adapter", base_name=model_name)
    if not save and result.checkpoint is not None:  # fit always writes its final checkpoint
        shutil.rmtree(result.checkpoint, ignore_errors=True)
    return ClassifierResult(
        method=method, accuracy=scores["accuracy"], balanced_accuracy=scores["balanced_accuracy"],
        eval_loss=scores["loss"], trainable_params=result.trainable_params, base_params=base,
        pct_of_base=100.0 * result.trainable_params / base, train_seconds=result.train_seconds,
        steps=result.steps, final_train_loss=result.train_loss)
