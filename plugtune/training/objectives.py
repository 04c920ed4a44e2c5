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

from plugtune.adapters.mixed import mixed_adapters
from plugtune.data.tokenize import IGNORE_INDEX
from plugtune.models.causal_lm import batch_hidden, lm_head
from plugtune.training.logprobs import CHUNK, labelled_logps


class Objective(Protocol):
    """`units(batch)`: what the summed loss is a sum over, an int or {key: int} (one key per summed
    loss). `__call__` returns the summed loss (a tensor, or {key: tensor}) and metrics: scalars that
    are means over the micro-batch (tensors are fine: the loop syncs once per step). Optional:
    `reports_perplexity`, and state_dict/load_state_dict for objectives with state."""

    def units(self, batch: dict[str, torch.Tensor]) -> int | dict[str, int]: ...

    def __call__(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor | dict, dict]: ...


class CausalLMObjective:
    """Next-token cross-entropy on labelled positions (SFT and plain causal LM), on padded or packed
    batches (data/packing.py: position_ids restart per example, no attention_mask).

    The LM head is applied only where a label exists, `chunk` positions at a time
    (logprobs.labelled_logps): with a 49,152-word vocabulary, (B, T, V) logits dominate a LoRA
    step's time and memory when most tokens are prompt.
    """

    reports_perplexity = True

    def __init__(self, chunk: int = CHUNK):
        self.chunk = chunk

    def units(self, batch: dict[str, torch.Tensor]) -> int:
        return int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())

    def __call__(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict]:
        if batch.get("adapter_names") is not None:  # one adapter per row (e.g. routed evaluation)
            with mixed_adapters(model, batch["adapter_names"]):
                hidden = batch_hidden(model, batch)  # (B, T, C)
        else:
            hidden = batch_hidden(model, batch)
        targets = batch["labels"][:, 1:]  # (B, T-1): token t+1 is predicted at position t
        keep = targets != IGNORE_INDEX
        logps = labelled_logps(lm_head(model), hidden[:, :-1][keep], targets[keep], self.chunk)  # (N,)
        return -logps.sum(), {}  # cross-entropy summed over the N supervised tokens


def full_logits_loss_sum(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Reference: the same loss from the model's full (B, T, V) logits (for tests and benchmarks)."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), batch["labels"][:, 1:].flatten(),
                           ignore_index=IGNORE_INDEX, reduction="sum")
