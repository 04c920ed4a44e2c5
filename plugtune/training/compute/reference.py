"""The reference policy of DPO, PPO and GRPO.

Training adapters, the reference is the same network with its adapters switched off
(`adapters_disabled`): no second copy of the base. Continuing a previous stage's adapter (a pipeline
after SFT), it is a frozen copy of that adapter on the same base (`adapters_only`). Fine-tuning every
weight, it is a frozen copy of the model taken before training starts.
"""
from __future__ import annotations

import contextlib
import copy

import torch
from torch import nn

from plugtune.adapters.layers import adapters_disabled, adapters_only
from plugtune.training.compute.token_logps import TokenLogps, token_logps


def frozen_copy(model: nn.Module) -> nn.Module:
    """The reference for full fine-tuning: a copy of the starting weights that never trains."""
    reference = copy.deepcopy(model).eval()
    reference.requires_grad_(False)
    return reference


@contextlib.contextmanager
def as_reference(model: nn.Module, frozen: nn.Module | None = None, adapter: str | None = None):
    """The network that gives reference log-probs, for the duration: the frozen copy (full
    fine-tuning), else `model` with only the reference adapter active (a run continuing a previous
    stage's adapter), else `model` with its adapters off."""
    if frozen is not None:
        yield frozen
    elif adapter is not None:
        with adapters_only(model, adapter):
            yield model
    else:
        with adapters_disabled(model):
            yield model


class Reference:
    """`adapter`: the name of a frozen adapter on the same base that is the reference (a run that
    continues a previous stage's adapter); else the base with adapters off, or a frozen copy."""

    def __init__(self, model: nn.Module, full_finetune: bool, adapter: str | None = None):
        self.frozen: nn.Module | None = frozen_copy(model) if full_finetune else None
        self.adapter = adapter

    @torch.no_grad()
    def logps(self, model: nn.Module, batch: dict, temperature: float = 1.0, share_prefixes: bool = False) -> TokenLogps:
        with as_reference(model, self.frozen, self.adapter) as network:
            return token_logps(network, batch, temperature, share_prefixes=share_prefixes)
