"""Pairwise preference losses: pure functions of per-sequence log-probabilities.

Every input is a (B,) tensor for B (chosen, rejected) pairs: the summed log-probability of a
completion's tokens, log π(y|x) = Σ_t log π(y_t | x, y_<t), the completion's token count, and,
for the reference-based losses, the same sums under the frozen reference. The objective runs
the model; these functions never do. Each returns `(losses (B,), metrics)`: per-example losses,
not reduced (the objective decides how to reduce and normalise), and detached 0-dim tensors
to log (no `.item()`, so no host sync until the loop logs).

The DPO family is also offered as small strategy objects (`PREFERENCE_LOSSES`) that all take
one `PreferenceLogps`; `needs_reference` tells the objective whether to run the reference.
Pass float32 log-probs: the sigmoids and ORPO's log(1 − p) lose too much in bf16.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor


def _metrics(chosen_rewards: Tensor, rejected_rewards: Tensor, chosen_logps: Tensor,
             rejected_logps: Tensor) -> dict[str, Tensor]:
    """The implicit-reward metrics TRL logs, as detached 0-dim tensors."""
    c, r = chosen_rewards.detach(), rejected_rewards.detach()
    return {"rewards/chosen": c.mean(), "rewards/rejected": r.mean(), "rewards/margins": (c - r).mean(),
            "rewards/accuracies": (c > r).float().mean(),
            "logps/chosen": chosen_logps.detach().mean(), "logps/rejected": rejected_logps.detach().mean()}


def _per_token(logps: Tensor, lengths: Tensor) -> Tensor:
    return logps / lengths.clamp(min=1).to(logps.dtype)  # (B,) mean log-prob per completion token


def dpo_loss(chosen_logps: Tensor, rejected_logps: Tensor, ref_chosen_logps: Tensor, ref_rejected_logps: Tensor,
             beta: float = 0.1, label_smoothing: float = 0.0) -> tuple[Tensor, dict[str, Tensor]]:
    """Sigmoid DPO (Rafailov et al. 2023, eq. 7); with label_smoothing ε, conservative DPO (cDPO).

    h = (log π(y_c) − log π_ref(y_c)) − (log π(y_r) − log π_ref(y_r))      all inputs (B,)
    loss = −(1 − ε) log σ(β h) − ε log σ(−β h)    (cDPO: the label is flipped with probability ε;
    ε = 0 is eq. 7). Rewards logged are β(log π − log π_ref), the implicit reward of eq. 5.
    """
    chosen_logratios = chosen_logps - ref_chosen_logps  # (B,)
    rejected_logratios = rejected_logps - ref_rejected_logps  # (B,)
    logits = beta * (chosen_logratios - rejected_logratios)  # (B,)
    losses = -(1 - label_smoothing) * F.logsigmoid(logits) - label_smoothing * F.logsigmoid(-logits)
    return losses, _metrics(beta * chosen_logratios, beta * rejected_logratios, chosen_logps, rejected_logps)


def ipo_loss(chosen_logps: Tensor, rejected_logps: Tensor, ref_chosen_logps: Tensor, ref_rejected_logps: Tensor,
             chosen_lengths: Tensor | None = None, rejected_lengths: Tensor | None = None, beta: float = 0.1,
             average_log_prob: bool = True) -> tuple[Tensor, dict[str, Tensor]]:
    """IPO (Azar et al. 2023, eq. 17): loss = (h − 1/(2β))², β being the paper's τ.

    With `average_log_prob` (the default, as in TRL 1.16 and, per TRL, the IPO authors' own
    runs) each log-ratio is divided by its completion's token count before the difference:
    h = (log π(y_c) − log π_ref(y_c))/|y_c| − (log π(y_r) − log π_ref(y_r))/|y_r|, so the
    squared target 1/(2β) does not depend on completion length. `average_log_prob=False` is
    eq. 17 read literally, with summed log-probs. All inputs (B,); lengths are token counts.
    """
    chosen_logratios = chosen_logps - ref_chosen_logps  # (B,)
    rejected_logratios = rejected_logps - ref_rejected_logps  # (B,)
    if average_log_prob:
        if chosen_lengths is None or rejected_lengths is None:
            raise ValueError("ipo_loss(average_log_prob=True) needs chosen_lengths and rejected_lengths")
        h = _per_token(chosen_logratios, chosen_lengths) - _per_token(rejected_logratios, rejected_lengths)
    else:
        h = chosen_logratios - rejected_logratios
    losses = (h - 1 / (2 * beta)) ** 2
    return losses, _metrics(beta * chosen_logratios, beta * rejected_logratios, chosen_logps, rejected_logps)


def simpo_loss(chosen_logps: Tensor, rejected_logps: Tensor, chosen_lengths: Tensor, rejected_lengths: Tensor,
               beta: float = 2.0, gamma: float = 1.0) -> tuple[Tensor, dict[str, Tensor]]:
    """SimPO (Meng et al. 2024, eq. 6), reference-free and length-normalised:

    loss = −log σ(β/|y_c| log π(y_c) − β/|y_r| log π(y_r) − γ)           all inputs (B,)

    `gamma` is the paper's γ, the target reward margin in reward units (TRL's `simpo_gamma`);
    the SimPO repository configures γ/β instead (`gamma_beta_ratio`, 0.5 with β = 2 here).
    Rewards logged are β/|y| log π(y), the implicit reward of eq. 4.
    """
    chosen_rewards = beta * _per_token(chosen_logps, chosen_lengths)  # (B,)
    rejected_rewards = beta * _per_token(rejected_logps, rejected_lengths)  # (B,)
    losses = -F.logsigmoid(chosen_rewards - rejected_rewards - gamma)
    return losses, _metrics(chosen_rewards, rejected_rewards, chosen_logps, rejected_logps)


def _log1mexp(x: Tensor) -> Tensor:
    """log(1 − exp(x)) for x < 0, without cancellation (Mächler 2012: switch at x = −log 2)."""
    return torch.where(x < -0.6931471805599453, torch.log1p(-torch.exp(x)), torch.log(-torch.expm1(x)))


def orpo_loss(chosen_logps: Tensor, rejected_logps: Tensor, chosen_lengths: Tensor, rejected_lengths: Tensor,
              chosen_nll: Tensor, lam: float = 0.1) -> tuple[Tensor, dict[str, Tensor]]:
    """ORPO (Hong et al. 2024, eq. 6–7): loss = L_SFT + λ L_OR, reference-free.

    P(y|x) = exp(log π(y)/|y|) (length-averaged, as the paper defines it); log odds(y) = log P − log(1 − P);
    L_OR = −log σ(log odds(y_c) − log odds(y_r)). `chosen_nll` (B,) is L_SFT, the chosen
    completion's mean token NLL; over the same tokens it equals −chosen_logps/chosen_lengths.
    (TRL 1.16's ORPOTrainer takes one token mean over the whole batch, prompt tokens included,
    and returns +λ log σ(·) as "losses", then subtracts it: the same L_OR, opposite sign.)
    Rewards logged are λ/|y| log π(y), as TRL logs them.
    """
    chosen_avg = _per_token(chosen_logps, chosen_lengths)  # (B,) log P(y_c|x), < 0
    rejected_avg = _per_token(rejected_logps, rejected_lengths)  # (B,)
    log_odds_ratio = (chosen_avg - _log1mexp(chosen_avg)) - (rejected_avg - _log1mexp(rejected_avg))  # (B,)
    or_loss = -F.logsigmoid(log_odds_ratio)  # (B,) eq. 7
    losses = chosen_nll + lam * or_loss  # (B,) eq. 6
    metrics = _metrics(lam * chosen_avg, lam * rejected_avg, chosen_logps, rejected_logps)
    metrics.update({"log_odds_ratio": log_odds_ratio.detach().mean(), "or_loss": or_loss.detach().mean(),
                    "nll": chosen_nll.detach().mean()})
    return losses, metrics


def bradley_terry_loss(chosen_rewards: Tensor, rejected_rewards: Tensor, margin: Tensor | None = None,
                       center_rewards_coefficient: float | None = None) -> tuple[Tensor, dict[str, Tensor]]:
    """Reward-model loss (Ouyang et al. 2022, eq. 1; Llama 2's margin m, Touvron et al. 2023, eq. 2):

    loss = −log σ(r_c − r_r − m) + c (r_c + r_r)²                        all inputs (B,)

    The optional second term centres the rewards near zero (Eisenstein et al. 2023; TRL's
    `center_rewards_coefficient`). Its mean over the batch is TRL's RewardTrainer loss.
    """
    diff = chosen_rewards - rejected_rewards  # (B,)
    losses = -F.logsigmoid(diff - margin if margin is not None else diff)
    if center_rewards_coefficient:
        losses = losses + center_rewards_coefficient * (chosen_rewards + rejected_rewards) ** 2
    d = diff.detach()
    return losses, {"accuracy": (d > 0).float().mean(), "margin": d.mean(),
                    "rewards/chosen": chosen_rewards.detach().mean(),
                    "rewards/rejected": rejected_rewards.detach().mean()}


# ---- strategies: one call signature for every DPO-family variant --------------------------------


@dataclass(frozen=True)
class PreferenceLogps:
    """What an objective computes for a batch of B pairs; every field is (B,)."""
    chosen: Tensor  # Σ_t log π(y_c,t | x, y_c,<t) over completion tokens
    rejected: Tensor
    chosen_lengths: Tensor | None = None  # completion token counts
    rejected_lengths: Tensor | None = None
    ref_chosen: Tensor | None = None  # the same sums under the reference policy
    ref_rejected: Tensor | None = None
    chosen_nll: Tensor | None = None  # mean token NLL of y_c (ORPO's SFT term)


def _need(x: PreferenceLogps, loss: object, *fields: str) -> list[Tensor]:
    missing = [f for f in fields if getattr(x, f) is None]
    if missing:
        raise ValueError(f"{type(loss).__name__} needs PreferenceLogps.{', '.join(missing)}")
    return [getattr(x, f) for f in fields]


@dataclass(frozen=True)
class SigmoidDPO:
    beta: float = 0.1
    label_smoothing: float = 0.0
    needs_reference: ClassVar[bool] = True

    def __call__(self, x: PreferenceLogps) -> tuple[Tensor, dict[str, Tensor]]:
        ref_c, ref_r = _need(x, self, "ref_chosen", "ref_rejected")
        return dpo_loss(x.chosen, x.rejected, ref_c, ref_r, self.beta, self.label_smoothing)


@dataclass(frozen=True)
class ConservativeDPO(SigmoidDPO):
    """cDPO: sigmoid DPO with a non-zero default ε (the probability a label is wrong)."""
    label_smoothing: float = 0.1


@dataclass(frozen=True)
class IPO:
    beta: float = 0.1
    average_log_prob: bool = True
    needs_reference: ClassVar[bool] = True

    def __call__(self, x: PreferenceLogps) -> tuple[Tensor, dict[str, Tensor]]:
        ref_c, ref_r = _need(x, self, "ref_chosen", "ref_rejected")
        return ipo_loss(x.chosen, x.rejected, ref_c, ref_r, x.chosen_lengths, x.rejected_lengths, self.beta,
                        self.average_log_prob)


@dataclass(frozen=True)
class SimPO:
    beta: float = 2.0
    gamma: float = 1.0
    needs_reference: ClassVar[bool] = False

    def __call__(self, x: PreferenceLogps) -> tuple[Tensor, dict[str, Tensor]]:
        len_c, len_r = _need(x, self, "chosen_lengths", "rejected_lengths")
        return simpo_loss(x.chosen, x.rejected, len_c, len_r, self.beta, self.gamma)


@dataclass(frozen=True)
class ORPO:
    lam: float = 0.1
    needs_reference: ClassVar[bool] = False

    def __call__(self, x: PreferenceLogps) -> tuple[Tensor, dict[str, Tensor]]:
        len_c, len_r, nll = _need(x, self, "chosen_lengths", "rejected_lengths", "chosen_nll")
        return orpo_loss(x.chosen, x.rejected, len_c, len_r, nll, self.lam)


# name -> strategy class; build with PREFERENCE_LOSSES[name](**params) and call on a PreferenceLogps.
PREFERENCE_LOSSES: dict[str, type] = {"sigmoid": SigmoidDPO, "cdpo": ConservativeDPO, "ipo": IPO,
                                      "simpo": SimPO, "orpo": ORPO}
