"""compare/stats.py against references: scipy's binomial test and proportion interval, a plain
bootstrap written here, Holm's procedure by hand; the separation chain on made-up rows."""
import math
import random

import numpy as np
import pytest
from scipy.stats import binomtest

from plugtune.compare.stats import (bootstrap_loss, holm, mcnemar_exact, mean_spread, paired_bootstrap_loss,
                                    pairwise_tests, separation_chain, wilson)


@pytest.mark.parametrize("k,n", [(0, 100), (3, 100), (50, 100), (96, 100), (100, 100), (1, 7)])
def test_wilson_matches_scipy(k, n):
    ci = binomtest(k, n).proportion_ci(confidence_level=0.95, method="wilson")
    assert wilson(k, n) == pytest.approx((ci.low, ci.high), abs=1e-9)


def test_wilson_known_value():
    # Wilson (1927) at 0/10: upper bound z^2 / (n + z^2) = 3.8415 / 13.8415
    assert wilson(0, 10) == pytest.approx((0.0, 1.959964**2 / (10 + 1.959964**2)), abs=1e-6)


@pytest.mark.parametrize("a_only,b_only,both", [(0, 0, 5), (10, 0, 3), (7, 3, 40), (12, 25, 9)])
def test_mcnemar_exact_is_a_binomial_test_on_discordant_items(a_only, b_only, both):
    a = [1] * a_only + [0] * b_only + [1] * both + [0] * 4
    b = [0] * a_only + [1] * b_only + [1] * both + [0] * 4
    t = mcnemar_exact(a, b)
    assert (t["a_only"], t["b_only"]) == (a_only, b_only)
    expected = binomtest(a_only, a_only + b_only, 0.5).pvalue if a_only + b_only else 1.0
    assert t["p"] == pytest.approx(expected, rel=1e-12)


def test_holm_by_hand():
    # sorted 0.01, 0.02, 0.04, 0.30 -> x4, x3, x2, x1, made monotone: 0.04, 0.06, 0.08, 0.30
    assert holm([0.04, 0.01, 0.30, 0.02]) == pytest.approx([0.08, 0.04, 0.30, 0.06])
    assert holm([0.5, 0.9]) == pytest.approx([1.0, 1.0])


def _naive_bootstrap(items, samples, seed):
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(samples):
        idx = rng.integers(0, len(items), size=len(items))
        out.append(sum(items[i][0] for i in idx) / sum(items[i][1] for i in idx))
    return np.percentile(out, [2.5, 97.5])


def test_bootstrap_matches_a_plain_loop_and_covers_the_mean():
    rng = random.Random(0)
    items = [[rng.uniform(0, 5) * n, n] for n in (rng.randint(3, 9) for _ in range(60))]
    lo, hi = bootstrap_loss(items, samples=500, seed=3)
    assert (lo, hi) == pytest.approx(tuple(_naive_bootstrap(items, 500, 3)), rel=1e-12)
    mean = sum(s for s, _ in items) / sum(n for _, n in items)
    assert lo < mean < hi


def test_paired_bootstrap_sees_a_shift_and_not_noise():
    rng = random.Random(1)
    a = [[rng.uniform(1, 3) * 5, 5] for _ in range(80)]
    shifted = [[s + 0.5 * n, n] for s, n in a]  # every item 0.5 higher per token
    t = paired_bootstrap_loss(a, shifted)
    assert t["diff"] == pytest.approx(0.5) and t["ci"][0] == pytest.approx(0.5) and t["p"] < 0.01
    noisy = [[s + rng.gauss(0, 0.3) * n, n] for s, n in a]
    t = paired_bootstrap_loss(a, noisy)
    assert t["ci"][0] < 0 < t["ci"][1] and t["p"] > 0.05


def test_mean_spread():
    assert mean_spread([0.5]) == (0.5, 0.0)
    m, s = mean_spread([1.0, 2.0, 3.0])
    assert m == 2.0 and s == pytest.approx(1.0)


def _row(name, correct, n=100):
    rng = random.Random(hash(name) % 1000)
    items = [1] * correct + [0] * (n - correct)
    return {"name": name, "exact_match": correct / n, "heldout_loss": 1 - correct / n, "item_correct": items,
            "item_loss": [[(1 - c) * 4 + rng.uniform(0, 0.1), 4] for c in items]}


def test_separation_chain_counts_methods_told_apart():
    # 98 / 97 / 60 / 20 / 0 out of 100, correct on nested items: A≈B, then three clear steps
    rows = [_row("A", 98), _row("B", 97), _row("C", 60), _row("D", 20), _row("E", 0)]
    tests = pairwise_tests(rows)
    assert len(tests) == 10
    ab = next(t for t in tests if {t["a"], t["b"]} == {"A", "B"})
    assert not ab["exact_match"]["significant"] and ab["exact_match"]["p"] == 1.0
    chain = separation_chain(rows, tests)
    assert len(chain) == 4 and chain[1:] == ["C", "D", "E"] and chain[0] in ("A", "B")
    # Holm: every adjusted p is at least the raw one
    assert all(t["exact_match"]["p_holm"] >= t["exact_match"]["p"] for t in tests)
    assert math.isclose(max(t["exact_match"]["p_holm"] for t in tests), 1.0)
