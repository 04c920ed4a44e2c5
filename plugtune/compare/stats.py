"""The statistics of `plugtune compare`: an interval for every quality figure and a test for every
difference between two methods, all on the same held-out items (every method answers the same ones).

- Exact match: the Wilson score interval (Wilson, 1927), which stays inside [0, 1] and keeps its
  coverage near 0% and 100%, where the normal-approximation interval collapses to a point.
- Two methods' exact match: the exact McNemar test (McNemar, 1947): only the items one method gets
  right and the other wrong carry information; under "no difference" each such item is a fair coin,
  so the two-sided p-value is a binomial tail.
- Losses (held-out, general text): a percentile bootstrap over items (Efron & Tibshirani, 1993) of the
  per-token mean (sum of item losses / sum of item tokens); two methods: the paired bootstrap, resampling
  the same items for both (Koehn, 2004).
- Many pairs: Holm's step-down correction (Holm, 1979) keeps the family-wise error rate at alpha.
"""
from __future__ import annotations

import math
from itertools import combinations

import numpy as np

Z95 = 1.959963984540054  # the normal quantile for a two-sided 95% interval
BOOTSTRAP_SAMPLES = 2000
ALPHA = 0.05


def wilson(correct: int, total: int, z: float = Z95) -> tuple[float, float]:
    """The Wilson score interval of a proportion correct/total, as fractions."""
    if total <= 0:
        return 0.0, 1.0
    p = correct / total
    centre = (p + z * z / (2 * total)) / (1 + z * z / total)
    half = z / (1 + z * z / total) * math.sqrt(p * (1 - p) / total + z * z / (4 * total * total))
    return max(0.0, centre - half), min(1.0, centre + half)


def mcnemar_exact(a: list[int], b: list[int]) -> dict:
    """Exact McNemar test on paired 0/1 outcomes of two methods on the same items: {a_only, b_only, p}."""
    if len(a) != len(b):
        raise ValueError(f"paired outcomes of different lengths ({len(a)} and {len(b)})")
    a_only = sum(1 for x, y in zip(a, b) if x and not y)
    b_only = sum(1 for x, y in zip(a, b) if y and not x)
    n, k = a_only + b_only, min(a_only, b_only)
    # two-sided: twice the smaller binomial(n, 1/2) tail, capped at 1
    tail = sum(math.comb(n, i) for i in range(k + 1)) / 2**n if n else 1.0
    return {"a_only": a_only, "b_only": b_only, "p": min(1.0, 2 * tail)}


def _ratio(sums: np.ndarray, counts: np.ndarray, index: np.ndarray) -> np.ndarray:
    """Per-token mean of each bootstrap resample (rows of `index`)."""
    return sums[index].sum(axis=1) / np.maximum(counts[index].sum(axis=1), 1)


def _resamples(n: int, samples: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, n, size=(samples, n))


def bootstrap_loss(items: list[list[float]], samples: int = BOOTSTRAP_SAMPLES, seed: int = 0) -> tuple[float, float]:
    """95% percentile interval of the per-token loss over items [[loss sum, tokens], ...]."""
    arr = np.asarray(items, dtype=np.float64)
    if len(arr) == 0:
        return float("nan"), float("nan")
    means = _ratio(arr[:, 0], arr[:, 1], _resamples(len(arr), samples, seed))
    lo, hi = np.percentile(means, [2.5, 97.5])
    return float(lo), float(hi)


def paired_bootstrap_loss(a: list[list[float]], b: list[list[float]], samples: int = BOOTSTRAP_SAMPLES,
                          seed: int = 0) -> dict:
    """Per-token loss of b minus a on the same items: {diff, ci: [lo, hi], p}. p is two-sided: twice the
    share of resampled differences on the other side of zero (the percentile-bootstrap test)."""
    x, y = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if x.shape != y.shape:
        raise ValueError(f"paired items of different shapes ({x.shape} and {y.shape})")
    diff = float(y[:, 0].sum() / max(y[:, 1].sum(), 1) - x[:, 0].sum() / max(x[:, 1].sum(), 1))
    index = _resamples(len(x), samples, seed)
    d = _ratio(y[:, 0], y[:, 1], index) - _ratio(x[:, 0], x[:, 1], index)
    lo, hi = np.percentile(d, [2.5, 97.5])
    p = min(1.0, 2 * min(float((d <= 0).mean()), float((d >= 0).mean())))
    return {"diff": diff, "ci": [float(lo), float(hi)], "p": max(p, 1 / samples)}


def holm(pvalues: list[float]) -> list[float]:
    """Holm-adjusted p-values, in the order given."""
    order = sorted(range(len(pvalues)), key=lambda i: pvalues[i])
    adjusted, running = [0.0] * len(pvalues), 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (len(pvalues) - rank) * pvalues[i]))
        adjusted[i] = running
    return adjusted


def mean_spread(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation over seeds (0 for one seed)."""
    v = [x for x in values if x is not None]
    if not v:
        return float("nan"), float("nan")
    m = sum(v) / len(v)
    return m, (math.sqrt(sum((x - m) ** 2 for x in v) / (len(v) - 1)) if len(v) > 1 else 0.0)


def pairwise_tests(rows: list[dict], alpha: float = ALPHA) -> list[dict]:
    """Every pair of rows, on exact match (McNemar) and held-out loss (paired bootstrap), Holm-corrected
    within each measure. A row needs `name`, `item_correct` (0/1 per item, seeds concatenated) and
    `item_loss` ([[sum, tokens], ...] in the same order)."""
    pairs = list(combinations(rows, 2))
    em = [mcnemar_exact(a["item_correct"], b["item_correct"]) for a, b in pairs]
    loss = [paired_bootstrap_loss(a["item_loss"], b["item_loss"]) for a, b in pairs]
    em_adj, loss_adj = holm([t["p"] for t in em]), holm([t["p"] for t in loss])
    out = []
    for k, (a, b) in enumerate(pairs):
        out.append({"a": a["name"], "b": b["name"],
                    "exact_match": {**em[k], "diff": _mean(b["item_correct"]) - _mean(a["item_correct"]),
                                    "p_holm": em_adj[k], "significant": em_adj[k] < alpha},
                    "heldout_loss": {**loss[k], "p_holm": loss_adj[k], "significant": loss_adj[k] < alpha}})
    return out


def _mean(values: list[int]) -> float:
    return sum(values) / max(len(values), 1)


def significant(tests: list[dict], a: str, b: str, measure: str = "exact_match") -> bool:
    for t in tests:
        if {t["a"], t["b"]} == {a, b}:
            return t[measure]["significant"]
    raise KeyError(f"no test between {a} and {b}")


def test_between(tests: list[dict], a: str, b: str) -> dict:
    return next(t for t in tests if {t["a"], t["b"]} == {a, b})


def separation_chain(rows: list[dict], tests: list[dict], measure: str = "exact_match") -> list[str]:
    """The longest list of rows, best first, in which each is significantly better than the next on
    `measure` (exact match: higher; loss: lower): how many methods the comparison tells apart."""
    sign = -1 if measure == "exact_match" else 1
    key = "exact_match" if measure == "exact_match" else "heldout_loss"
    ordered = sorted(rows, key=lambda r: sign * r[key])
    chain_from: dict[int, list[str]] = {}  # the longest chain starting at ordered[i]
    for i in reversed(range(len(ordered))):
        chain_from[i] = [ordered[i]["name"]]
        for j in range(i + 1, len(ordered)):
            better = sign * ordered[i][key] < sign * ordered[j][key]
            if better and significant(tests, ordered[i]["name"], ordered[j]["name"], measure) \
                    and len(chain_from[j]) + 1 > len(chain_from[i]):
                chain_from[i] = [ordered[i]["name"]] + chain_from[j]
    return max(chain_from.values(), key=len) if chain_from else []
