"""The next-token objective: cross-entropy summed over labelled positions, with `units` = the number
of supervised tokens (engine/types.Objective). SFT trains with it, the loop evaluates with it by
default, and evaluation.py reports its loss and perplexity.
"""
from __future__ import annotations

import torch
from torch import nn

from plugtune.adapters.mixed import mixed_adapters
from plugtune.data.tokenize import IGNORE_INDEX
from plugtune.models.causal_lm import batch_hidden, lm_head
from plugtune.training.compute.logprobs import CHUNK, labelled_logps


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

