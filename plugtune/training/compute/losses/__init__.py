"""Alignment losses as pure tensor functions: the objective runs the model, these never do.

preference: DPO family (sigmoid/cDPO, IPO, SimPO, ORPO) and the Bradley–Terry reward loss.
policy: KL estimators and controllers, PPO-RLHF rewards, GAE, whitening, PPO/DAPO clipped losses,
GRPO/Dr. GRPO advantages, and token-loss aggregation exact under gradient accumulation.
"""
from plugtune.training.compute.losses.policy import (
    AGGREGATIONS, KL_ESTIMATORS, AdaptiveKLController, FixedKLController, aggregate, clipped_value_loss, gae,
    group_advantages, kl_k1, kl_k2, kl_k3, masked_mean, masked_whiten, per_token_rewards, ppo_clip_loss,
    sum_and_units)
from plugtune.training.compute.losses.preference import (
    IPO, ORPO, PREFERENCE_LOSSES, ConservativeDPO, PreferenceLogps, SigmoidDPO, SimPO, bradley_terry_loss,
    dpo_loss, ipo_loss, orpo_loss, simpo_loss)

__all__ = [
    "AGGREGATIONS", "IPO", "KL_ESTIMATORS", "ORPO", "PREFERENCE_LOSSES", "AdaptiveKLController", "ConservativeDPO",
    "FixedKLController", "PreferenceLogps", "SigmoidDPO", "SimPO", "aggregate", "bradley_terry_loss",
    "clipped_value_loss", "dpo_loss", "gae", "group_advantages", "ipo_loss", "kl_k1", "kl_k2", "kl_k3",
    "masked_mean", "masked_whiten", "orpo_loss", "per_token_rewards", "ppo_clip_loss", "simpo_loss",
    "sum_and_units"]
