"""PPO for RLHF (Ouyang et al. 2022, InstructGPT; Stiennon et al. 2020), on the one loop.

Per rollout batch (no grad; `prepare_rollout`): the policy's log-probs and values of its own
completions, the reference's log-probs, per-token rewards r_t = -beta * KL_t plus the score at the
last token (InstructGPT eq. 2), GAE advantages and returns (Schulman et al. 2016, eq. 11-16),
whitened. Per optimizer step (`__call__`): the clipped policy loss (Schulman et al. 2017, eq. 7)
plus vf_coef x the clipped value loss, averaged over completion tokens.

The value head sits on the policy's own final hidden states (one forward gives log-probs and
values), trains in its own parameter group (`ppo.value_lr_scale`), and is not saved with the
policy. The KL coefficient is fixed or adaptive (Ziegler et al. 2019, eq. 2); its state is saved
in checkpoints.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import nn

from plugtune.data.tokenize import IGNORE_INDEX
from plugtune.models.heads import attach_head
from plugtune.training.compute.token_logps import token_logps
from plugtune.schema import ConfigError
from plugtune.training.compute.losses import (KL_ESTIMATORS, AdaptiveKLController, FixedKLController,
                                              clipped_value_loss, gae, masked_whiten, per_token_rewards,
                                              ppo_clip_loss)
from plugtune.training.compute.reference import Reference
from plugtune.training.engine.types import ParamGroup
from plugtune.training.recipes.common import Setup
from plugtune.training.recipes.rollouts import check_rollout_config, prepare_rl

if TYPE_CHECKING:
    from plugtune.training.config import RunConfig


@dataclass
class PPOConfig:
    """The `ppo:` section."""

    kl_coef: float = 0.05  # beta of the per-token KL penalty (InstructGPT eq. 2)
    kl_estimator: str = "k1"  # a name in KL_ESTIMATORS: k1 | k2 | k3
    adaptive_kl: bool = False  # Ziegler et al. 2019's controller towards kl_target
    kl_target: float = 6.0
    kl_horizon: int = 10000
    gamma: float = 1.0
    lam: float = 0.95
    clip_range: float = 0.2
    value_clip: float = 0.2
    vf_coef: float = 0.1
    whiten_advantages: bool = True
    value_lr_scale: float = 1.0  # the value head's learning rate, as a multiple of training.lr


def check_config(cfg: RunConfig) -> None:
    if cfg.ppo.kl_estimator not in KL_ESTIMATORS:
        raise ConfigError(f"ppo.kl_estimator={cfg.ppo.kl_estimator!r} is not one of {', '.join(KL_ESTIMATORS)}")
    check_rollout_config(cfg)


class PPOObjective:
    def __init__(self, cfg: PPOConfig, reference: Reference, value_head: nn.Module, temperature: float):
        self.cfg, self.reference, self.value_head, self.temperature = cfg, reference, value_head, temperature
        self.kl_ctl = (AdaptiveKLController(cfg.kl_coef, cfg.kl_target, cfg.kl_horizon) if cfg.adaptive_kl
                       else FixedKLController(cfg.kl_coef))

    @torch.no_grad()
    def prepare_rollout(self, model: nn.Module, batch: dict) -> dict:
        lp = token_logps(model, batch, self.temperature, share_prefixes=True)
        values = self.value_head(lp.hidden[:, :-1])  # (N, T-1): V(state before token t+1)
        ref = self.reference.logps(model, batch, self.temperature, share_prefixes=True).per_token
        mask = lp.mask
        rewards, kl = per_token_rewards(lp.per_token, ref, batch["scores"], mask, self.kl_ctl.value,
                                        self.cfg.kl_estimator)
        advantages, returns = gae(rewards, values, mask, self.cfg.gamma, self.cfg.lam)
        if self.cfg.whiten_advantages:
            advantages = masked_whiten(advantages, mask)
        seq_kl = (kl * mask).sum(-1)  # (N,) KL of each completion to the reference
        self.kl_ctl.update(float(seq_kl.mean()), len(seq_kl))
        return {"old_logps": lp.per_token, "old_values": values, "advantages": advantages, "returns": returns,
                "kl": seq_kl}

    def units(self, batch: dict) -> int:
        return int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())  # token mean

    def __call__(self, model: nn.Module, batch: dict) -> tuple[torch.Tensor, dict]:
        lp = token_logps(model, batch, self.temperature, share_prefixes=True)
        values = self.value_head(lp.hidden[:, :-1])
        mask = lp.mask
        policy_loss, pm = ppo_clip_loss(lp.per_token, batch["old_logps"], batch["advantages"], mask,
                                        self.cfg.clip_range)
        value_loss, vm = clipped_value_loss(values, batch["old_values"], batch["returns"], mask, self.cfg.value_clip)
        loss_sum = ((policy_loss + self.cfg.vf_coef * value_loss) * mask).sum()
        metrics = {**pm, **vm, "reward": batch["scores"].mean(), "kl_to_ref": batch["kl"].mean(),
                   "kl_coef": torch.tensor(self.kl_ctl.value),
                   "value_loss": (value_loss * mask).sum() / mask.sum().clamp(min=1)}
        metrics.update({k: v for k, v in batch.items() if k.startswith("rollout/")})
        return loss_sum, metrics

    def state_dict(self) -> dict:
        return {"kl": self.kl_ctl.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.kl_ctl.load_state_dict(state["kl"])


def prepare(cfg: RunConfig, loaded=None) -> Setup:
    def make(model: nn.Module, reference: Reference):
        head = attach_head(model, "value_head", zero=True)
        objective = PPOObjective(cfg.ppo, reference, head, cfg.rollout.temperature)
        return objective, [ParamGroup("value_head", list(head.parameters()), lr_scale=cfg.ppo.value_lr_scale)]

    return prepare_rl(cfg, loaded, make)
