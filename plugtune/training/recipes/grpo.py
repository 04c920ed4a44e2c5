"""GRPO (Shao et al. 2024, DeepSeekMath, sec. 4.1) and its variants, on the one loop.

Per rollout batch: G completions per prompt, scored; advantages are the group-normalised scores
A_i = (r_i - mean(r)) / std(r) (eq. 3 with outcome supervision), or only centred (Dr. GRPO,
Liu et al. 2025: `grpo.scale_rewards: false`). Per step: the clipped surrogate (eq. 3) with
separate lower/upper clip ranges (DAPO's clip-higher, Yu et al. 2025, eq. 10), plus beta x the k3
KL estimate to the reference when beta > 0, aggregated over tokens as GRPO (mean per sequence,
then over sequences), DAPO (token mean, eq. 12) or Dr. GRPO (a constant normaliser) do.

With one optimisation pass per rollout the ratio is exactly 1 and old log-probs are not needed
(the policy's own, detached); with several (`rollout.epochs` x `rollout.minibatches` > 1) they are
computed once per rollout. Every forward runs each prompt once for its G completions (a tree of
prompt + completions, training/compute/prompt_trees.py; exact).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import nn

from plugtune.data.tokenize import IGNORE_INDEX
from plugtune.schema import ConfigError
from plugtune.training.compute.losses import AGGREGATIONS, group_advantages, kl_k3, ppo_clip_loss, sum_and_units
from plugtune.training.compute.reference import Reference
from plugtune.training.compute.token_logps import token_logps
from plugtune.training.recipes.common import Setup
from plugtune.training.recipes.rollouts import check_rollout_config, prepare_rl

if TYPE_CHECKING:
    from plugtune.training.config import RunConfig


@dataclass
class GRPOConfig:
    """The `grpo:` section."""

    beta: float = 0.0  # KL (k3) to the reference; 0 skips the reference pass
    clip_low: float = 0.2
    clip_high: float = 0.2  # DAPO's clip-higher: e.g. 0.28
    scale_rewards: bool = True  # False: Dr. GRPO (no division by the group's std)
    # a name in AGGREGATIONS: sequence_mean (GRPO) | token_mean (DAPO) | constant_normaliser (Dr. GRPO)
    loss_aggregation: str = "sequence_mean"


def check_config(cfg: RunConfig) -> None:
    if cfg.grpo.loss_aggregation not in AGGREGATIONS:
        raise ConfigError(f"grpo.loss_aggregation={cfg.grpo.loss_aggregation!r} is not one of "
                          f"{', '.join(AGGREGATIONS)}")
    check_rollout_config(cfg)
    if cfg.rollout.samples_per_prompt < 2:
        raise ConfigError("GRPO compares samples of the same prompt: set rollout.samples_per_prompt >= 2")


class GRPOObjective:
    def __init__(self, cfg: GRPOConfig, reference: Reference, group_size: int, max_new_tokens: int,
                 temperature: float, reuses_rollouts: bool):
        self.cfg, self.reference, self.group_size = cfg, reference, group_size
        self.max_new_tokens, self.temperature, self.reuses_rollouts = max_new_tokens, temperature, reuses_rollouts

    @torch.no_grad()
    def prepare_rollout(self, model: nn.Module, batch: dict) -> dict:
        extra = {"advantages": group_advantages(batch["scores"], self.group_size, self.cfg.scale_rewards)}
        if self.reuses_rollouts:
            extra["old_logps"] = token_logps(model, batch, self.temperature, share_prefixes=True).per_token
        if self.cfg.beta > 0:
            extra["ref_logps"] = self.reference.logps(model, batch, self.temperature, share_prefixes=True).per_token
        return extra

    def units(self, batch: dict) -> int:
        """What sum_and_units divides by, for this aggregation (known before the forward pass)."""
        mask = batch["labels"][:, 1:] != IGNORE_INDEX
        return {"sequence_mean": mask.shape[0], "token_mean": int(mask.sum()),
                "constant_normaliser": mask.shape[0] * self.max_new_tokens}[self.cfg.loss_aggregation]

    def __call__(self, model: nn.Module, batch: dict) -> tuple[torch.Tensor, dict]:
        lp = token_logps(model, batch, self.temperature, share_prefixes=True)
        mask = lp.mask
        old = batch.get("old_logps", lp.per_token.detach())
        per_token, metrics = ppo_clip_loss(lp.per_token, old, batch["advantages"], mask, self.cfg.clip_low,
                                           self.cfg.clip_high)
        if self.cfg.beta > 0:
            kl = kl_k3(lp.per_token, batch["ref_logps"]) * mask
            per_token = per_token + self.cfg.beta * kl
            metrics["kl_to_ref"] = kl.sum() / mask.sum().clamp(min=1)
        loss_sum, _ = sum_and_units(per_token, mask, self.cfg.loss_aggregation, self.max_new_tokens)
        metrics["reward"] = batch["scores"].mean()
        metrics.update({k: v for k, v in batch.items() if k.startswith("rollout/")})
        return loss_sum, metrics


def prepare(cfg: RunConfig, loaded=None) -> Setup:
    r = cfg.rollout

    def make(model: nn.Module, reference: Reference):
        return GRPOObjective(cfg.grpo, reference, r.samples_per_prompt, r.max_new_tokens, r.temperature,
                             reuses_rollouts=r.epochs * r.minibatches > 1), []

    return prepare_rl(cfg, loaded, make)
