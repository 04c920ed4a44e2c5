"""Scalar heads on a causal LM's final hidden states: a reward head (one score per sequence, read at
the last non-padding token) and a value head (one estimate per token, PPO's critic).

A head is attached to the model as a named submodule, so it trains alongside adapters, lands in
checkpoints with the other trainable parameters, and moves with the model across devices.
"""
from __future__ import annotations

import contextlib

import math

import torch
from torch import nn


class ScalarHead(nn.Module):
    """h (..., C) -> score (...,): a linear layer to one output."""

    def __init__(self, hidden_size: int, init_std: float = 0.0, zero: bool = False):
        super().__init__()
        self.score = nn.Linear(hidden_size, 1)
        if zero:  # a value head that starts at 0 leaves the first advantages to the rewards alone
            nn.init.zeros_(self.score.weight)
        else:  # TRL's reward-head init: N(0, 1/sqrt(C + 1))
            nn.init.normal_(self.score.weight, std=init_std or 1 / math.sqrt(hidden_size + 1))
        nn.init.zeros_(self.score.bias)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.score(hidden.to(self.score.weight.dtype)).squeeze(-1)


def attach_head(model: nn.Module, name: str, init_std: float = 0.0, zero: bool = False) -> ScalarHead:
    """Add a fresh ScalarHead as `model.<name>` (fp32, on the model's device); returns it."""
    if getattr(model, name, None) is not None:
        raise ValueError(f"the model already has a module named '{name}'")
    hidden = model.get_input_embeddings().weight.shape[1]
    head = ScalarHead(hidden, init_std, zero).to(next(model.parameters()).device)
    model.add_module(name, head)
    return head


def last_token(hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """(B, T, C) -> (B, C): each row's last non-padding position (right padding)."""
    last = attention_mask.sum(-1).clamp(min=1) - 1  # (B,)
    return hidden[torch.arange(hidden.shape[0], device=hidden.device), last]


@contextlib.contextmanager
def heads_detached(model: nn.Module):
    """Take scalar heads (reward, value) off `model` for the duration, e.g. so that save_pretrained
    writes the plain causal LM, whatever heads a run has attached."""
    heads = {name: m for name, m in model.named_children() if isinstance(m, ScalarHead)}
    for name in heads:
        delattr(model, name)
    try:
        yield model
    finally:
        for name, m in heads.items():
            model.add_module(name, m)
