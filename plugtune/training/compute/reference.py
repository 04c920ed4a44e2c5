"""The reference policy of DPO, PPO and GRPO.

Training adapters, the reference is the same network with its adapters switched off
(`adapters_disabled`): no second copy of the base. Fine-tuning every weight, it is a frozen copy
of the model taken before training starts.
"""
from __future__ import annotations

import copy

import torch
from torch import nn

from plugtune.adapters.layers import adapters_disabled
from plugtune.training.compute.token_logps import TokenLogps, token_logps


def frozen_copy(model: nn.Module) -> nn.Module:
    """The reference for full fine-tuning: a copy of the starting weights that never trains."""
    reference = copy.deepcopy(model).eval()
    reference.requires_grad_(False)
    return reference


class Reference:
    def __init__(self, model: nn.Module, full_finetune: bool):
        self.frozen: nn.Module | None = frozen_copy(model) if full_finetune else None

    @torch.no_grad()
    def logps(self, model: nn.Module, batch: dict, temperature: float = 1.0, share_prefixes: bool = False) -> TokenLogps:
        if self.frozen is not None:
            return token_logps(self.frozen, batch, temperature, share_prefixes=share_prefixes)
        with adapters_disabled(model):
            return token_logps(model, batch, temperature, share_prefixes=share_prefixes)
