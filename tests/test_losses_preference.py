"""Preference losses: hand-computed values (plain `math`), then parity with TRL 1.16's own code.

TRL keeps its losses inside trainer methods, so the parity tests call those methods unbound on a
SimpleNamespace `self` carrying only the attributes they read (and, for DPOTrainer and
RewardTrainer, whose loss methods run the model, a stand-in model that returns chosen tensors).
"""
import math
import os
import sys
from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch
from torch.testing import assert_close

from plugtune.training.compute.losses import (
    IPO, ORPO, PREFERENCE_LOSSES, ConservativeDPO, PreferenceLogps, SigmoidDPO, SimPO, bradley_terry_loss,
    dpo_loss, ipo_loss, orpo_loss, simpo_loss)


def t(*values):
    return torch.tensor(values, dtype=torch.float64)


def neg_log_sigmoid(x):
    return math.log1p(math.exp(-x))


# Two pairs: the first prefers the chosen completion (h = 1.0), the second the rejected (h = -0.7).
CHOSEN, REJECTED = t(-1.0, -2.0), t(-3.0, -1.5)
REF_CHOSEN, REF_REJECTED = t(-1.5, -1.8), t(-2.5, -2.0)
CHOSEN_LENS, REJECTED_LENS = t(2, 4), t(5, 1)


def test_dpo_sigmoid_hand_computed():
    losses, m = dpo_loss(CHOSEN, REJECTED, REF_CHOSEN, REF_REJECTED, beta=0.5)
    # chosen log-ratios (0.5, -0.2), rejected (-0.5, 0.5) -> h = (1.0, -0.7)
    assert_close(losses, t(neg_log_sigmoid(0.5), neg_log_sigmoid(-0.35)))
    assert_close(m["rewards/chosen"], torch.tensor(0.075, dtype=torch.float64))  # mean(0.25, -0.1)
    assert_close(m["rewards/rejected"], torch.tensor(0.0, dtype=torch.float64))  # mean(-0.25, 0.25)
    assert_close(m["rewards/margins"], torch.tensor(0.075, dtype=torch.float64))
    assert_close(m["rewards/accuracies"], torch.tensor(0.5))
    assert_close(m["logps/chosen"], torch.tensor(-1.5, dtype=torch.float64))
    assert all(v.dim() == 0 and not v.requires_grad for v in m.values())


def test_dpo_gradient_is_beta_sigmoid_minus_h():
    chosen = CHOSEN.clone().requires_grad_()
    dpo_loss(chosen, REJECTED, REF_CHOSEN, REF_REJECTED, beta=0.5)[0].sum().backward()
    # d/dπ_c [-log σ(βh)] = -β σ(-βh)
    expected = [-0.5 / (1 + math.exp(0.5 * h)) for h in (1.0, -0.7)]
    assert_close(chosen.grad, t(*expected))


def test_cdpo_hand_computed():
    losses, _ = dpo_loss(CHOSEN, REJECTED, REF_CHOSEN, REF_REJECTED, beta=0.5, label_smoothing=0.1)
    expected = [0.9 * neg_log_sigmoid(0.5 * h) + 0.1 * neg_log_sigmoid(-0.5 * h) for h in (1.0, -0.7)]
    assert_close(losses, t(*expected))


def test_ipo_hand_computed_both_conventions():
    averaged, _ = ipo_loss(CHOSEN, REJECTED, REF_CHOSEN, REF_REJECTED, CHOSEN_LENS, REJECTED_LENS, beta=0.5)
    h_avg = [0.5 / 2 - (-0.5) / 5, -0.2 / 4 - 0.5 / 1]  # log-ratios divided by their token counts
    assert_close(averaged, t(*[(h - 1.0) ** 2 for h in h_avg]))  # 1/(2β) = 1
    summed, _ = ipo_loss(CHOSEN, REJECTED, REF_CHOSEN, REF_REJECTED, beta=0.5, average_log_prob=False)
    assert_close(summed, t((1.0 - 1.0) ** 2, (-0.7 - 1.0) ** 2))
    with pytest.raises(ValueError, match="lengths"):
        ipo_loss(CHOSEN, REJECTED, REF_CHOSEN, REF_REJECTED, beta=0.5)


def test_simpo_hand_computed():
    losses, m = simpo_loss(CHOSEN, REJECTED, CHOSEN_LENS, REJECTED_LENS, beta=2.0, gamma=0.5)
    rc, rr = [2.0 * -1.0 / 2, 2.0 * -2.0 / 4], [2.0 * -3.0 / 5, 2.0 * -1.5 / 1]
    assert_close(losses, t(*[neg_log_sigmoid(c - r - 0.5) for c, r in zip(rc, rr)]))
    assert_close(m["rewards/chosen"], torch.tensor(sum(rc) / 2, dtype=torch.float64))
    assert_close(m["rewards/accuracies"], torch.tensor(1.0))  # -1.0 > -1.2 and -1.0 > -3.0


def log_odds(avg_logp):
    return avg_logp - math.log(-math.expm1(avg_logp))


def test_orpo_hand_computed():
    chosen, rejected, len_c, len_r = t(-1.2, -6.0), t(-2.0, -0.9), t(3, 4), t(2, 3)
    nll = -chosen / len_c  # the chosen completion's mean token NLL
    losses, m = orpo_loss(chosen, rejected, len_c, len_r, nll, lam=0.1)
    ratios = [log_odds(-0.4) - log_odds(-1.0), log_odds(-1.5) - log_odds(-0.3)]
    assert_close(losses, t(*[n + 0.1 * neg_log_sigmoid(r) for n, r in zip((0.4, 1.5), ratios)]))
    assert_close(m["log_odds_ratio"], torch.tensor(sum(ratios) / 2, dtype=torch.float64))
    assert_close(m["nll"], torch.tensor(0.95, dtype=torch.float64))


def test_orpo_log_odds_stable_near_probability_one():
    # mean log-prob -1e-7: log1p(-exp(x)) in float32 is off by ~1.5%; expm1 is exact to rounding
    chosen, rejected, ones = torch.tensor([-1e-7]), torch.tensor([-1.0]), torch.ones(1)
    _, m = orpo_loss(chosen, rejected, ones, ones, torch.zeros(1), lam=1.0)
    assert_close(m["log_odds_ratio"], torch.tensor(log_odds(-1e-7) - log_odds(-1.0), dtype=torch.float32),
                 rtol=1e-6, atol=0)


def test_bradley_terry_hand_computed():
    rc, rr, margin = t(1.0, 0.2, -0.5), t(0.0, 0.8, -1.0), t(0.5, 0.0, 1.0)
    losses, m = bradley_terry_loss(rc, rr, margin=margin, center_rewards_coefficient=0.01)
    expected = [neg_log_sigmoid(c - r - g) + 0.01 * (c + r) ** 2
                for c, r, g in zip((1.0, 0.2, -0.5), (0.0, 0.8, -1.0), (0.5, 0.0, 1.0))]
    assert_close(losses, t(*expected))
    assert_close(m["accuracy"], torch.tensor(2 / 3))
    assert_close(m["margin"], torch.tensor((1.0 - 0.6 + 0.5) / 3, dtype=torch.float64))
    plain, _ = bradley_terry_loss(rc, rr)
    assert_close(plain, t(*[neg_log_sigmoid(c - r) for c, r in zip((1.0, 0.2, -0.5), (0.0, 0.8, -1.0))]))


def test_strategies_match_functions_and_declare_reference_use():
    x = PreferenceLogps(CHOSEN, REJECTED, CHOSEN_LENS, REJECTED_LENS, REF_CHOSEN, REF_REJECTED,
                        chosen_nll=-CHOSEN / CHOSEN_LENS)
    assert {k: v.needs_reference for k, v in PREFERENCE_LOSSES.items()} == {
        "sigmoid": True, "cdpo": True, "ipo": True, "simpo": False, "orpo": False}
    assert_close(SigmoidDPO(beta=0.5)(x)[0], dpo_loss(CHOSEN, REJECTED, REF_CHOSEN, REF_REJECTED, 0.5)[0])
    assert_close(ConservativeDPO(beta=0.5)(x)[0],
                 dpo_loss(CHOSEN, REJECTED, REF_CHOSEN, REF_REJECTED, 0.5, label_smoothing=0.1)[0])
    assert_close(IPO(beta=0.5)(x)[0],
                 ipo_loss(CHOSEN, REJECTED, REF_CHOSEN, REF_REJECTED, CHOSEN_LENS, REJECTED_LENS, 0.5)[0])
    assert_close(SimPO(beta=2.0, gamma=0.5)(x)[0], simpo_loss(CHOSEN, REJECTED, CHOSEN_LENS, REJECTED_LENS,
                                                              2.0, 0.5)[0])
    assert_close(ORPO(lam=0.2)(x)[0], orpo_loss(CHOSEN, REJECTED, CHOSEN_LENS, REJECTED_LENS, x.chosen_nll, 0.2)[0])
    with pytest.raises(ValueError, match="ref_chosen, ref_rejected"):
        SigmoidDPO()(PreferenceLogps(CHOSEN, REJECTED))


# ---- parity with TRL 1.16 -------------------------------------------------------------------------

class _Accelerator:
    device = torch.device("cpu")

    @staticmethod
    def gather(x):
        return x

    gather_for_metrics = gather


def _metrics_store():
    return defaultdict(lambda: defaultdict(list))


@pytest.fixture(scope="module")
def trl_trainers():
    torch_before = torch.__version__
    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
    pytest.importorskip("trl")
    from trl.experimental.cpo.cpo_trainer import CPOTrainer
    from trl.experimental.orpo.orpo_trainer import ORPOTrainer
    from trl.trainer import dpo_trainer
    from trl.trainer.reward_trainer import RewardTrainer

    # importing TRL must not bring in (or swap to) another torch
    assert torch.__version__ == torch_before and sys.modules["torch"] is torch and dpo_trainer.torch is torch
    return SimpleNamespace(dpo=dpo_trainer.DPOTrainer, reward=RewardTrainer, cpo=CPOTrainer, orpo=ORPOTrainer)


def _pairs(seed=0, b=3, t_len=7):
    """Per-token log-probs for b pairs laid out as TRL's DPOTrainer sees them: rows [chosen; rejected]."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.tensor([5, 2, 6, 3, 6, 1])[: 2 * b]
    completion_mask = torch.zeros(2 * b, t_len, dtype=torch.long)  # (2b, T); column 0 is the prompt
    for i, n in enumerate(lengths.tolist()):
        completion_mask[i, 1:1 + n] = 1
    per_token = -torch.rand(2 * b, t_len - 1, generator=g) * 2 * completion_mask[:, 1:]  # (2b, T-1)
    ref = -torch.rand(2 * b, generator=g) * 6
    return per_token, completion_mask, ref[:b], ref[b:]


def _trl_dpo(trainers, loss_type, beta, per_token, completion_mask, ref_chosen, ref_rejected):
    policy = SimpleNamespace(training=True)

    def forward(**kwargs):  # the fields DPOTrainer._compute_loss reads from the fused-LM-head output
        zeros = torch.zeros_like(per_token)
        return SimpleNamespace(log_probs=per_token, entropy=zeros, mean_logits=zeros, is_top1=zeros.bool())

    trainer = SimpleNamespace(
        model=policy, accelerator=_Accelerator(), beta=beta, label_smoothing=0.0, loss_types=[loss_type],
        loss_weights=[1.0], f_divergence_type="reverse_kl", ld_alpha=None, precompute_ref_logps=True,
        aux_loss_enabled=False, use_weighting=False, _metrics=_metrics_store(), _total_train_tokens=0, _tp_size=1)
    inputs = {"input_ids": torch.zeros_like(completion_mask), "attention_mask": torch.ones_like(completion_mask),
              "completion_mask": completion_mask, "ref_chosen_logps": ref_chosen, "ref_rejected_logps": ref_rejected}
    loss = trainers.dpo._compute_loss(trainer, forward, inputs, return_outputs=False)
    return loss, {k: v[0] for k, v in trainer._metrics["train"].items()}


@pytest.mark.parametrize("seed", [0, 1])
def test_dpo_sigmoid_matches_trl(trl_trainers, seed):
    per_token, mask, ref_c, ref_r = _pairs(seed)
    chosen, rejected = per_token.sum(1).chunk(2)
    trl_loss, trl_metrics = _trl_dpo(trl_trainers, "sigmoid", 0.3, per_token, mask, ref_c, ref_r)
    losses, m = dpo_loss(chosen, rejected, ref_c, ref_r, beta=0.3)
    assert_close(losses.mean(), trl_loss)
    for key in ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies", "logps/chosen",
                "logps/rejected"):
        assert_close(m[key].item(), trl_metrics[key], rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("seed", [0, 1])
def test_ipo_matches_trl_token_averaged(trl_trainers, seed):
    per_token, mask, ref_c, ref_r = _pairs(seed)
    chosen, rejected = per_token.sum(1).chunk(2)
    len_c, len_r = mask.sum(1).chunk(2)
    trl_loss, _ = _trl_dpo(trl_trainers, "ipo", 0.3, per_token, mask, ref_c, ref_r)
    losses, _ = ipo_loss(chosen, rejected, ref_c, ref_r, len_c, len_r, beta=0.3, average_log_prob=True)
    assert_close(losses.mean(), trl_loss)


def _cpo_self(loss_type, beta, label_smoothing=0.0, simpo_gamma=0.5):
    return SimpleNamespace(loss_type=loss_type, beta=beta, label_smoothing=label_smoothing, alpha=0.0,
                           simpo_gamma=simpo_gamma, accelerator=_Accelerator())


def test_cdpo_matches_trl(trl_trainers):
    # TRL 1.16's DPOTrainer no longer smooths "sigmoid" (label_smoothing now serves robust/EXO/AOT);
    # cDPO's formula is CPOTrainer.cpo_loss("sigmoid"), i.e. DPO without the reference: given
    # log-ratios log π − log π_ref in place of log π, it is cDPO exactly.
    per_token, _, ref_c, ref_r = _pairs(2)
    chosen, rejected = per_token.sum(1).chunk(2)
    trl_losses, _, _ = trl_trainers.cpo.cpo_loss(_cpo_self("sigmoid", 0.3, 0.2), chosen - ref_c, rejected - ref_r)
    losses, _ = dpo_loss(chosen, rejected, ref_c, ref_r, beta=0.3, label_smoothing=0.2)
    assert_close(losses, trl_losses)


def test_ipo_summed_matches_trl_cpo_ipo(trl_trainers):
    per_token, _, ref_c, ref_r = _pairs(3)
    chosen, rejected = per_token.sum(1).chunk(2)
    trl_losses, _, _ = trl_trainers.cpo.cpo_loss(_cpo_self("ipo", 0.3), chosen - ref_c, rejected - ref_r)
    losses, _ = ipo_loss(chosen, rejected, ref_c, ref_r, beta=0.3, average_log_prob=False)
    assert_close(losses, trl_losses)


def test_simpo_matches_trl(trl_trainers):
    # CPOTrainer feeds simpo token-averaged log-probs and takes the paper's γ, dividing it by β itself
    per_token, mask, _, _ = _pairs(4)
    chosen, rejected = per_token.sum(1).chunk(2)
    len_c, len_r = mask.sum(1).chunk(2)
    trl_losses, trl_rc, trl_rr = trl_trainers.cpo.cpo_loss(_cpo_self("simpo", 2.5, simpo_gamma=1.4),
                                                           chosen / len_c, rejected / len_r)
    losses, m = simpo_loss(chosen, rejected, len_c, len_r, beta=2.5, gamma=1.4)
    assert_close(losses, trl_losses)
    assert_close(m["rewards/chosen"], trl_rc.mean())
    assert_close(m["rewards/rejected"], trl_rr.mean())


def test_orpo_matches_trl(trl_trainers):
    # ORPOTrainer.odds_ratio_loss returns +λ log σ(log odds ratio) and the trainer subtracts it
    per_token, mask, _, _ = _pairs(5)
    chosen, rejected = per_token.sum(1).chunk(2)
    len_c, len_r = mask.sum(1).chunk(2)
    nll = -chosen / len_c
    trl_ratio_terms, _, _, trl_mean_logsig, trl_mean_log_odds = trl_trainers.orpo.odds_ratio_loss(
        SimpleNamespace(beta=0.25, accelerator=_Accelerator()), chosen / len_c, rejected / len_r)
    losses, m = orpo_loss(chosen, rejected, len_c, len_r, nll, lam=0.25)
    assert_close(losses, nll - trl_ratio_terms)
    assert_close(m["log_odds_ratio"], trl_mean_log_odds)  # TRL logs this one as "log_odds_chosen"
    assert_close(m["or_loss"], -trl_mean_logsig)


@pytest.mark.parametrize("with_margin,center", [(False, None), (True, None), (True, 0.01)])
def test_reward_loss_matches_trl(trl_trainers, with_margin, center):
    g = torch.Generator().manual_seed(7)
    rc, rr, margin = torch.randn(4, generator=g), torch.randn(4, generator=g), torch.rand(4, generator=g)
    model = SimpleNamespace(training=True)

    def forward(**kwargs):
        return SimpleNamespace(logits=torch.cat([rc, rr]).unsqueeze(-1))  # (2B, 1): chosen rows, then rejected

    trainer = SimpleNamespace(model=model, args=SimpleNamespace(center_rewards_coefficient=center),
                              accelerator=_Accelerator(), _metrics=_metrics_store(), _total_train_tokens=0, _tp_size=1)
    inputs = {"input_ids": torch.zeros(8, 3, dtype=torch.long), "attention_mask": torch.ones(8, 3, dtype=torch.long)}
    if with_margin:
        inputs["margin"] = margin
    trl_loss = trl_trainers.reward.compute_loss(trainer, forward, inputs)
    losses, m = bradley_terry_loss(rc, rr, margin=margin if with_margin else None, center_rewards_coefficient=center)
    assert_close(losses.mean(), trl_loss)
    assert_close(m["accuracy"].item(), trainer._metrics["train"]["accuracy"][0])
    assert_close(m["margin"].item(), trainer._metrics["train"]["margin"][0])
