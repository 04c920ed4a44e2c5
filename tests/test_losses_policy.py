"""Policy-gradient losses: hand-computed values, a plain-Python GAE, gradients, accumulation exactness."""
import math
import random
import statistics

import pytest
import torch
from torch.testing import assert_close

from plugtune.training.compute.losses import (
    AdaptiveKLController, FixedKLController, aggregate, clipped_value_loss, gae, group_advantages, kl_k1, kl_k2,
    kl_k3, masked_whiten, per_token_rewards, ppo_clip_loss, sum_and_units)


def t(*values):
    return torch.tensor(values, dtype=torch.float64)


def test_kl_estimators_hand_computed():
    logp, ref = t(-1.0, -0.5), t(-1.2, -0.3)
    assert_close(kl_k1(logp, ref), t(0.2, -0.2))
    assert_close(kl_k2(logp, ref), t(0.02, 0.02))
    assert_close(kl_k3(logp, ref), t(math.exp(-0.2) + 0.2 - 1, math.exp(0.2) - 0.2 - 1))


def test_k1_and_k3_are_exact_in_expectation_under_the_policy():
    p, q = [0.1, 0.2, 0.3, 0.4], [0.25, 0.25, 0.4, 0.1]
    kl = sum(pi * math.log(pi / qi) for pi, qi in zip(p, q))
    logp, logq, weights = t(*map(math.log, p)), t(*map(math.log, q)), t(*p)
    assert_close((weights * kl_k1(logp, logq)).sum(), torch.tensor(kl, dtype=torch.float64))
    assert_close((weights * kl_k3(logp, logq)).sum(), torch.tensor(kl, dtype=torch.float64))


def test_adaptive_kl_controller():
    ctl = AdaptiveKLController(value=0.2, target=6.0, horizon=10_000)
    ctl.update(9.0, n_steps=256)  # error 0.5 clipped to 0.2
    assert ctl.value == pytest.approx(0.2 * (1 + 0.2 * 256 / 10_000))
    before = ctl.value
    ctl.update(6.6, n_steps=100)  # error 0.1
    assert ctl.value == pytest.approx(before * (1 + 0.1 * 100 / 10_000))
    before = ctl.value
    ctl.update(torch.tensor(1.0), n_steps=100)  # error -5/6 clipped to -0.2; a tensor KL works too
    assert ctl.value == pytest.approx(before * (1 - 0.2 * 100 / 10_000))
    fresh = AdaptiveKLController(value=0.2, target=6.0, horizon=10_000)
    fresh.load_state_dict(ctl.state_dict())
    assert fresh.value == ctl.value
    fixed = FixedKLController(0.05)
    fixed.update(100.0, 10)
    assert fixed.value == 0.05 and fixed.state_dict() == {"value": 0.05}


def test_per_token_rewards_hand_computed():
    logp = t(-1.0, -2.0, -0.5, -9.0, -1.0, -9.0, -9.0, -9.0, -9.0, -1.5, -0.2, -9.0, -9.0, -9.0, -9.0, -9.0).view(4, 4)
    ref = t(-1.5, -1.0, -0.5, -1.0, -0.8, -1.0, -1.0, -1.0, -1.0, -1.0, -1.0, -1.0, -1.0, -1.0, -1.0, -1.0).view(4, 4)
    mask = torch.tensor([[1, 1, 1, 0], [1, 0, 0, 0], [0, 1, 1, 0], [0, 0, 0, 0]])  # last row: no completion
    rewards, kl = per_token_rewards(logp, ref, t(1.0, -2.0, 0.5, 3.0), mask, kl_coef=0.1)
    expected = t(-0.1 * 0.5, 0.1 * 1.0, 0.0 + 1.0, 0.0,
                 -0.1 * -0.2 - 2.0, 0.0, 0.0, 0.0,
                 0.0, -0.1 * -0.5, -0.1 * 0.8 + 0.5, 0.0,
                 0.0, 0.0, 0.0, 0.0).view(4, 4)
    assert_close(rewards, expected)
    assert_close(kl, (logp - ref) * mask)


def gae_reference(rewards, values, lengths, gamma, lam):
    """Textbook GAE on nested lists: each row is an episode of `length` steps, V = 0 after it."""
    advantages, returns = [], []
    for r, v, n in zip(rewards, values, lengths):
        adv, last = [0.0] * len(r), 0.0
        for step in reversed(range(n)):
            next_v = v[step + 1] if step + 1 < n else 0.0
            last = r[step] + gamma * next_v - v[step] + gamma * lam * last
            adv[step] = last
        advantages.append(adv)
        returns.append([a + vv if i < n else 0.0 for i, (a, vv) in enumerate(zip(adv, v))])
    return advantages, returns


@pytest.mark.parametrize("seed,gamma,lam", [(0, 1.0, 0.95), (1, 0.9, 0.8), (2, 0.99, 1.0)])
def test_gae_matches_plain_python(seed, gamma, lam):
    rng = random.Random(seed)
    b, t_len = 5, 7
    lengths = [t_len, 0, 1] + [rng.randint(1, t_len) for _ in range(b - 3)]
    rewards = [[rng.gauss(0, 1) for _ in range(t_len)] for _ in range(b)]
    values = [[rng.gauss(0, 1) for _ in range(t_len)] for _ in range(b)]
    mask = torch.tensor([[1.0] * n + [0.0] * (t_len - n) for n in lengths], dtype=torch.float64)
    # padding holds garbage on purpose: it must not leak into valid positions
    adv, ret = gae(torch.tensor(rewards, dtype=torch.float64), torch.tensor(values, dtype=torch.float64), mask,
                   gamma, lam)
    ref_adv, ref_ret = gae_reference(rewards, values, lengths, gamma, lam)
    assert_close(adv, torch.tensor(ref_adv, dtype=torch.float64))
    assert_close(ret, torch.tensor(ref_ret, dtype=torch.float64))


def test_masked_whiten():
    x = t(1.0, 2.0, 3.0, 100.0, 5.0, -1.0, 50.0, 60.0).view(2, 4)
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]])
    valid = [1.0, 2.0, 3.0, 5.0, -1.0]
    mean, std = statistics.mean(valid), statistics.stdev(valid)
    w = masked_whiten(x, mask)
    expected = [(v - mean) / std for v in valid]
    assert_close(w[mask.bool()], t(*expected), rtol=1e-6, atol=1e-6)
    assert_close(w[~mask.bool()], t(0.0, 0.0, 0.0))
    kept = masked_whiten(x, mask, shift_mean=False)
    assert_close(kept[mask.bool()], t(*[e + mean for e in expected]), rtol=1e-6, atol=1e-6)


def test_ppo_clip_hand_checked_values_and_gradients():
    # token: (ratio, advantage) -> PPO with ε = 0.2
    cases = [(1.5, 2.0), (0.5, -1.0), (1.1, 1.0), (0.5, 1.0), (1.25, 1.0)]
    old = t(*[-1.0] * 5)
    logp = (old + t(*[math.log(r) for r, _ in cases])).requires_grad_()
    adv = t(*[a for _, a in cases])
    loss, m = ppo_clip_loss(logp.view(1, 5), old.view(1, 5), adv.view(1, 5), torch.ones(1, 5))
    # ratio 1.5, A>0: clipped at 1.2; ratio 0.5, A<0: clipped at 0.8; 1.1: inside; 0.5, A>0: the
    # unclipped term is the pessimistic one; 1.25, A>0: clipped at 1.2
    assert_close(loss, t(-2.0 * 1.2, 1.0 * 0.8, -1.1, -0.5, -1.2).view(1, 5))
    loss.sum().backward()
    # d(-A ρ)/d log π = -A ρ where unclipped, 0 where clipped
    assert_close(logp.grad, t(0.0, 0.0, -1.1, -0.5, 0.0))
    assert_close(m["clip_fraction"], torch.tensor(3 / 5))
    deltas = [math.log(r) for r, _ in cases]
    assert_close(m["approx_kl"], torch.tensor(sum(math.exp(d) - 1 - d for d in deltas) / 5, dtype=torch.float64))


def test_dapo_clip_higher_is_the_same_function():
    old = t(-1.0, -1.0)
    logp = (old + t(math.log(1.25), math.log(0.7))).requires_grad_()
    mask = torch.tensor([[1, 1]])
    # per-sequence advantage (B,) broadcast over tokens
    loss, m = ppo_clip_loss(logp.view(1, 2), old.view(1, 2), t(1.0), mask, clip_low=0.2, clip_high=0.28)
    assert_close(loss, t(-1.25, -0.7).view(1, 2))  # 1.25 < 1 + 0.28: not clipped; 0.7 < 0.8 with A>0: ρ kept
    loss.sum().backward()
    assert_close(logp.grad, t(-1.25, -0.7))
    assert_close(m["clip_fraction"], torch.tensor(0.0))


def test_clipped_value_loss_hand_computed():
    values, old, returns = t(1.0, 0.0, 2.0).view(1, 3), t(0.5, 0.1, 1.0).view(1, 3), t(2.0, 0.05, 1.0).view(1, 3)
    loss, m = clipped_value_loss(values, old, returns, torch.tensor([[1, 1, 0]]), clip_range=0.2)
    # token 0: clip(1.0, 0.3, 0.7) = 0.7 -> max(1.0, 1.69) = 1.69; token 1: inside -> 0.0025; token 2: padding
    assert_close(loss, t(0.5 * 1.69, 0.5 * 0.0025, 0.0).view(1, 3))
    assert_close(m["value_clip_fraction"], torch.tensor(0.5))


def test_group_advantages():
    rewards = t(1.0, 0.0, 0.0, 1.0, 0.2, 0.9, 0.5, 0.4)  # two prompts, G = 4
    adv = group_advantages(rewards, group_size=4)
    for g in range(2):
        group = rewards[4 * g:4 * g + 4].tolist()
        mean, std = statistics.mean(group), statistics.stdev(group)
        assert_close(adv[4 * g:4 * g + 4], t(*[(r - mean) / (std + 1e-4) for r in group]))
        assert abs(statistics.mean(adv[4 * g:4 * g + 4].tolist())) < 1e-12
        assert statistics.stdev(adv[4 * g:4 * g + 4].tolist()) == pytest.approx(1.0, abs=1e-3)
    dr = group_advantages(rewards, group_size=4, scale_by_std=False)  # Dr. GRPO: centred only
    assert_close(dr, t(0.5, -0.5, -0.5, 0.5, -0.3, 0.4, 0.0, -0.1))
    with pytest.raises(ValueError):
        group_advantages(rewards, group_size=3)


def test_aggregation_modes_hand_computed():
    per_token = t(1.0, 2.0, 3.0, 9.0, 4.0, 9.0, 9.0, 9.0).view(2, 4)  # 9s sit on padding
    mask = torch.tensor([[1, 1, 1, 0], [1, 0, 0, 0]])
    assert_close(aggregate(per_token, mask, "sequence_mean"), torch.tensor((2.0 + 4.0) / 2, dtype=torch.float64))
    assert_close(aggregate(per_token, mask, "token_mean"), torch.tensor(10.0 / 4, dtype=torch.float64))
    assert_close(aggregate(per_token, mask, "constant_normaliser", max_len=5),
                 torch.tensor(10.0 / 10, dtype=torch.float64))
    assert_close(aggregate(per_token, mask, "constant_normaliser"), torch.tensor(10.0 / 8, dtype=torch.float64))


@pytest.mark.parametrize("mode", ["token_mean", "constant_normaliser", "sequence_mean"])
def test_accumulated_sum_and_units_equal_the_full_batch(mode):
    g = torch.Generator().manual_seed(0)
    weight = torch.randn(6, dtype=torch.float64, generator=g, requires_grad=True)
    features = torch.randn(4, 6, 6, dtype=torch.float64, generator=g)  # (B, T, C)
    lengths = [6, 2, 1, 3]
    mask = torch.tensor([[1] * n + [0] * (6 - n) for n in lengths])

    def per_token(rows, t_len):  # a toy per-token loss that depends on `weight`
        return torch.tanh(features[rows, :t_len] @ weight) ** 2  # (b, t_len)

    full = aggregate(per_token(slice(0, 4), 6), mask, mode, max_len=6)
    (full_grad,) = torch.autograd.grad(full, weight)
    # two micro-batches, each padded only to its own longest row: T = 6 and T = 3
    parts = [sum_and_units(per_token(slice(0, 2), 6), mask[:2, :6], mode, max_len=6),
             sum_and_units(per_token(slice(2, 4), 3), mask[2:, :3], mode, max_len=6)]
    units = sum(u for _, u in parts)
    accumulated = sum(s / units for s, _ in parts)  # what the loop does: each micro-batch over all units
    (acc_grad,) = torch.autograd.grad(accumulated, weight)
    assert_close(accumulated, full)
    assert_close(acc_grad, full_grad)
    if mode == "token_mean":  # a mean of per-micro-batch means would not be the same (the test can fail)
        naive = sum(s / u for s, u in parts) / 2
        assert not torch.allclose(naive, full)
