"""Policy-gradient pieces for PPO-RLHF, GRPO, Dr. GRPO and DAPO: pure tensor functions.

Shapes: B sequences, T completion positions; `mask` (B, T) is 1 on completion tokens and 0 on
padding (float or bool). Per-token inputs (log-probs, values, rewards) are (B, T) and aligned
with `mask`. Losses come back per token (B, T), already zero at padding, plus detached 0-dim
metric tensors; `aggregate` / `sum_and_units` turn them into the scalar to backpropagate.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor


def masked_mean(x: Tensor, mask: Tensor) -> Tensor:
    """Mean of x (B, T) over positions where mask (B, T) is set; 0 when there are none."""
    mask = mask.to(x.dtype)
    return (x * mask).sum() / mask.sum().clamp(min=1)


# ---- KL between policy and reference, per token (Schulman, "Approximating KL divergence", 2020) ----
# Tokens are sampled from the policy π, so each is an estimator of KL(π || π_ref) at that token.

def kl_k1(logp: Tensor, ref_logp: Tensor) -> Tensor:
    """k1 = log π − log π_ref: unbiased, high variance, can be negative. (B, T) -> (B, T)"""
    return logp - ref_logp


def kl_k2(logp: Tensor, ref_logp: Tensor) -> Tensor:
    """k2 = ½ (log π − log π_ref)²: biased, low variance, ≥ 0. (B, T) -> (B, T)"""
    return 0.5 * (logp - ref_logp) ** 2


def kl_k3(logp: Tensor, ref_logp: Tensor) -> Tensor:
    """k3 = exp(ref − logp) − (ref − logp) − 1: unbiased and ≥ 0. (B, T) -> (B, T)"""
    log_ratio = ref_logp - logp
    return torch.expm1(log_ratio) - log_ratio  # expm1 keeps precision where the ratio is near 1


KL_ESTIMATORS: dict[str, Callable[[Tensor, Tensor], Tensor]] = {"k1": kl_k1, "k2": kl_k2, "k3": kl_k3}


@dataclass
class AdaptiveKLController:
    """Ziegler et al. 2019, eq. 2 (used by InstructGPT): steer the KL coefficient β to a target.

    e = clip(KL / KL_target − 1, −0.2, 0.2);  β ← β (1 + K_β e), with K_β = n_steps / horizon.
    """
    value: float = 0.2  # current β
    target: float = 6.0  # KL_target, nats per sequence
    horizon: int = 10_000

    def update(self, current_kl: float, n_steps: int) -> None:
        error = min(max(float(current_kl) / self.target - 1.0, -0.2), 0.2)
        self.value *= 1.0 + error * n_steps / self.horizon

    def state_dict(self) -> dict:
        return {"value": self.value}

    def load_state_dict(self, state: dict) -> None:
        self.value = float(state["value"])


@dataclass
class FixedKLController:
    """A constant β with the adaptive controller's interface."""
    value: float = 0.05

    def update(self, current_kl: float, n_steps: int) -> None:
        pass

    def state_dict(self) -> dict:
        return {"value": self.value}

    def load_state_dict(self, state: dict) -> None:
        self.value = float(state["value"])


def per_token_rewards(logp: Tensor, ref_logp: Tensor, scores: Tensor, mask: Tensor, kl_coef: float,
                      estimator: str = "k1") -> tuple[Tensor, Tensor]:
    """PPO-RLHF rewards (InstructGPT, Ouyang et al. 2022, eq. 2): r_t = −β KL_t at every completion
    token, plus the reward model's sequence score at the last completion token.

    logp, ref_logp, mask: (B, T); scores: (B,). Returns (rewards (B, T), kl (B, T)), both zero at
    padding. Call under no_grad: these are the environment's rewards, not a loss.
    """
    mask = mask.to(logp.dtype)
    kl = KL_ESTIMATORS[estimator](logp, ref_logp) * mask  # (B, T)
    positions = torch.arange(mask.shape[1], device=mask.device, dtype=mask.dtype)
    last = (mask * positions).argmax(dim=1, keepdim=True)  # (B, 1) index of the last completion token
    has_tokens = mask.amax(dim=1, keepdim=True)  # (B, 1): a row with no tokens gets no score
    rewards = (-kl_coef * kl).scatter_add(1, last, scores.to(logp.dtype).unsqueeze(1) * has_tokens)
    return rewards, kl


def gae(rewards: Tensor, values: Tensor, mask: Tensor, gamma: float = 1.0,
        lam: float = 0.95) -> tuple[Tensor, Tensor]:
    """Generalised advantage estimation (Schulman et al. 2016, eq. 11–16), all inputs (B, T):

    δ_t = r_t + γ V_{t+1} − V_t;   A_t = δ_t + γλ A_{t+1};   returns R_t = A_t + V_t.

    A masked position ends the episode: it bootstraps nothing (V = 0) and passes no advantage
    back, so right padding contributes nothing. Returns (advantages, returns), zero at padding.
    Vectorised over the batch, one reverse step per position.
    """
    mask = mask.to(values.dtype)
    values, rewards = values * mask, rewards * mask
    next_value = next_advantage = torch.zeros_like(values[:, 0])  # (B,)
    reversed_advantages = []
    for t in reversed(range(values.shape[1])):
        delta = rewards[:, t] + gamma * next_value - values[:, t]  # TD residual δ_t
        next_advantage = (delta + gamma * lam * next_advantage) * mask[:, t]  # Σ_l (γλ)^l δ_{t+l}, recursively
        next_value = values[:, t]
        reversed_advantages.append(next_advantage)
    advantages = torch.stack(reversed_advantages[::-1], dim=1)  # (B, T)
    return advantages, (advantages + values) * mask


def masked_whiten(x: Tensor, mask: Tensor, shift_mean: bool = True, eps: float = 1e-8) -> Tensor:
    """(x − mean) / std over the valid tokens of x (B, T); mean added back if not `shift_mean`.

    std uses Bessel's correction, as TRL's `masked_whiten` did. Zero at padding.
    """
    mask = mask.to(x.dtype)
    mean = masked_mean(x, mask)
    var = ((x - mean) ** 2 * mask).sum() / (mask.sum() - 1).clamp(min=1)
    whitened = (x - mean) * torch.rsqrt(var + eps)
    return (whitened if shift_mean else whitened + mean) * mask


def ppo_clip_loss(logp: Tensor, old_logp: Tensor, advantages: Tensor, mask: Tensor, clip_low: float = 0.2,
                  clip_high: float | None = None) -> tuple[Tensor, dict[str, Tensor]]:
    """PPO's clipped surrogate (Schulman et al. 2017, eq. 7), negated to a loss, per token:

    ρ = exp(log π − log π_old);   loss = max(−A ρ, −A clip(ρ, 1 − ε_low, 1 + ε_high)).

    clip_high=None means ε_high = ε_low (PPO, GRPO); DAPO's clip-higher (Yu et al. 2025, eq. 10)
    sets ε_high > ε_low, e.g. 0.2 / 0.28. logp, old_logp, mask: (B, T); advantages (B, T), or (B,)
    for one advantage per sequence (GRPO). Returns (loss (B, T), metrics): `clip_fraction`
    (tokens where the clipped term is taken) and `approx_kl`, k3 of KL(π_old || π) on tokens
    sampled from π_old.
    """
    eps_high = clip_low if clip_high is None else clip_high
    if advantages.dim() == 1:
        advantages = advantages.unsqueeze(1)  # (B, 1): the sequence's advantage at each of its tokens
    log_ratio = logp - old_logp  # (B, T)
    ratio = torch.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1 - clip_low, 1 + eps_high)
    loss = torch.maximum(unclipped, clipped) * mask.to(logp.dtype)  # (B, T)
    with torch.no_grad():
        metrics = {"clip_fraction": masked_mean((clipped > unclipped).float(), mask),
                   "approx_kl": masked_mean(kl_k3(old_logp, logp), mask),
                   "ratio": masked_mean(ratio, mask)}
    return loss, metrics


def clipped_value_loss(values: Tensor, old_values: Tensor, returns: Tensor, mask: Tensor,
                       clip_range: float = 0.2) -> tuple[Tensor, dict[str, Tensor]]:
    """PPO2's value loss (OpenAI baselines): ½ max((V − R)², (clip(V, V_old ± ε_v) − R)²).

    All inputs (B, T). Returns (loss (B, T), {"value_clip_fraction"}).
    """
    clipped_values = old_values + torch.clamp(values - old_values, -clip_range, clip_range)
    unclipped_sq = (values - returns) ** 2
    clipped_sq = (clipped_values - returns) ** 2
    loss = 0.5 * torch.maximum(unclipped_sq, clipped_sq) * mask.to(values.dtype)  # (B, T)
    with torch.no_grad():
        metrics = {"value_clip_fraction": masked_mean((clipped_sq > unclipped_sq).float(), mask)}
    return loss, metrics


def group_advantages(rewards: Tensor, group_size: int, scale_by_std: bool = True, eps: float = 1e-4) -> Tensor:
    """GRPO outcome advantages (Shao et al. 2024, DeepSeekMath, sec. 4.1.2): (r − mean_g) / (std_g + eps).

    rewards: (N·G,), G = group_size consecutive completions per prompt. std is the unbiased one
    (torch.std, as TRL). Dr. GRPO (Liu et al. 2025) drops the std: scale_by_std=False.
    Returns (N·G,).
    """
    if rewards.numel() % group_size:
        raise ValueError(f"{rewards.numel()} rewards do not split into groups of {group_size}")
    grouped = rewards.view(-1, group_size)  # (N, G)
    advantages = grouped - grouped.mean(dim=1, keepdim=True)
    if scale_by_std:
        advantages = advantages / (grouped.std(dim=1, keepdim=True) + eps)
    return advantages.reshape(-1)


# ---- aggregating per-token losses ----------------------------------------------------------------
# Each mode is a ratio Σ(summed) / Σ(units) of two sums over sequences. The loop divides the
# summed losses of all micro-batches by the units of the whole accumulated batch, so
# accumulating (summed, units) over micro-batches gives exactly the full batch's value:
#   sequence_mean        (GRPO, eq. 3):   Σ_i mean_t loss_it          /  B
#   token_mean           (DAPO, eq. 12):  Σ_it loss_it                 /  Σ_it mask_it
#   constant_normaliser  (Dr. GRPO):      Σ_it loss_it                 /  (B · max_len)
# For constant_normaliser pass max_len (the generation's max_completion_length): the default,
# this batch's padded T, differs between micro-batches and breaks that exactness.

def _sequence_mean(per_token: Tensor, mask: Tensor, max_len: int | None) -> tuple[Tensor, Tensor]:
    per_sequence = per_token.sum(dim=1) / mask.sum(dim=1).clamp(min=1)  # (B,)
    return per_sequence.sum(), per_token.new_tensor(float(mask.shape[0]))


def _token_mean(per_token: Tensor, mask: Tensor, max_len: int | None) -> tuple[Tensor, Tensor]:
    return per_token.sum(), mask.sum().to(per_token.dtype)


def _constant_normaliser(per_token: Tensor, mask: Tensor, max_len: int | None) -> tuple[Tensor, Tensor]:
    return per_token.sum(), per_token.new_tensor(float(mask.shape[0] * (max_len or mask.shape[1])))


AGGREGATIONS: dict[str, Callable[[Tensor, Tensor, int | None], tuple[Tensor, Tensor]]] = {
    "sequence_mean": _sequence_mean, "token_mean": _token_mean, "constant_normaliser": _constant_normaliser}


def sum_and_units(per_token: Tensor, mask: Tensor, mode: str, max_len: int | None = None) -> tuple[Tensor, Tensor]:
    """(summed loss, normalising units), both 0-dim tensors, for per_token and mask (B, T).

    Padding in per_token is zeroed here. Sum both over micro-batches and divide once (see above).
    """
    mask = mask.to(per_token.dtype)
    return AGGREGATIONS[mode](per_token * mask, mask, max_len)


def aggregate(per_token: Tensor, mask: Tensor, mode: str, max_len: int | None = None) -> Tensor:
    """One batch's scalar loss: summed / units for the chosen mode."""
    summed, units = sum_and_units(per_token, mask, mode, max_len)
    return summed / units.clamp(min=1)
