"""Training objectives: `objective(model, batch) -> (summed loss, metrics)` plus `units(batch)`,
the count the summed loss is normalised by. The loop divides by the units of the whole
accumulated batch, so accumulation is exact (mean over all supervised tokens, not a mean of
per-micro-batch means).
"""
from __future__ import annotations

from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn

from plugtune.data.tokenize import IGNORE_INDEX
from plugtune.models.causal_lm import hidden_states, lm_head


class Objective(Protocol):
    def units(self, batch: dict[str, torch.Tensor]) -> int: ...

    def __call__(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict]: ...


class CausalLMObjective:
    """Next-token cross-entropy on labelled positions (SFT and plain causal LM).

    The LM head is applied only where a label exists: with a 49,152-word vocabulary, (B, T, V)
    logits dominate a LoRA step's time and memory when most tokens are prompt.
    """

    def units(self, batch: dict[str, torch.Tensor]) -> int:
        return int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())

    def __call__(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict]:
        hidden = hidden_states(model, batch["input_ids"], batch["attention_mask"])  # (B, T, C)
        targets = batch["labels"][:, 1:]  # (B, T-1): token t+1 is predicted at position t
        keep = targets != IGNORE_INDEX
        logits = lm_head(model)(hidden[:, :-1][keep])  # (N, V), N = supervised tokens
        loss_sum = F.cross_entropy(logits.float(), targets[keep], reduction="sum")
        return loss_sum, {"tokens": int(keep.sum())}


def full_logits_loss_sum(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Reference: the same loss from the model's full (B, T, V) logits (for tests and benchmarks)."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), batch["labels"][:, 1:].flatten(),
                           ignore_index=IGNORE_INDEX, reduction="sum")
