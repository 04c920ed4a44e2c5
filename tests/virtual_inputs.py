"""Shared helpers for the prompt- and prefix-tuning tests (methods that add virtual inputs)."""
import torch

from plugtune.models.causal_lm import hidden_states, lm_head
from plugtune.models.tiny import build_model
from tests.conftest import random_batch

VOCAB = 400


def ours_logits(model, batch):
    with torch.no_grad():
        return lm_head(model)(hidden_states(model, batch["input_ids"], batch["attention_mask"]))


def padded_batch():
    batch = random_batch(VOCAB, batch=3, length=9, seed=3)
    batch["attention_mask"][1, 6:] = 0  # a right-padded row, as in training batches
    return batch


def lively_model(arch):
    """A tiny model with larger random weights: its greedy tokens vary (the default init repeats
    the last token), so token-level comparisons mean something."""
    model = build_model(arch, VOCAB)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    return model
