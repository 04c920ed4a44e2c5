"""IFEval's four scores (Zhou et al. 2023, arXiv:2311.07911, section 3) and a paired bootstrap for the
gain of one policy over another on the same prompts. Pure Python.

- prompt-level strict: the share of prompts whose response meets every constraint;
- instruction-level strict: the share of all constraints (over all prompts) that are met;
- loose: the same with each constraint checked on the response's loose variants (checkers.py:
  first/last line removed, "*" removed), so a "Sure, here it is:" preamble or markdown bold does not
  hide compliance.
"""
from __future__ import annotations

import random

from plugtune.tasks.instructions.checkers import check_response, constraints_of


def ifeval_scores(records: list, responses: list[str]) -> dict:
    """{prompt_strict, prompt_loose, instruction_strict, instruction_loose} as fractions in [0, 1];
    by_type {type id: {"strict", "loose", "n"}} (instruction level, n constraints of that type);
    n_prompts; passed_strict / passed_loose: one bool per prompt (for paired statistics)."""
    if len(records) != len(responses):
        raise ValueError(f"{len(records)} records but {len(responses)} responses")
    if not records:
        raise ValueError("no records to score")
    passed = {"strict": [], "loose": []}
    held: dict[str, dict[str, list[bool]]] = {}  # type -> mode -> per constraint
    for record, response in zip(records, responses):
        types = [c["type"] for c in constraints_of(record)]
        for mode in ("strict", "loose"):
            ok, per = check_response(record, response, loose=mode == "loose")
            passed[mode].append(ok)
            for kind, held_one in zip(types, per):
                held.setdefault(kind, {"strict": [], "loose": []})[mode].append(held_one)
    every = {mode: [ok for by_mode in held.values() for ok in by_mode[mode]] for mode in ("strict", "loose")}
    return {
        "prompt_strict": sum(passed["strict"]) / len(records),
        "prompt_loose": sum(passed["loose"]) / len(records),
        "instruction_strict": sum(every["strict"]) / len(every["strict"]),
        "instruction_loose": sum(every["loose"]) / len(every["loose"]),
        "by_type": {kind: {"strict": sum(v["strict"]) / len(v["strict"]), "loose": sum(v["loose"]) / len(v["loose"]),
                           "n": len(v["strict"])} for kind, v in sorted(held.items())},
        "n_prompts": len(records),
        "passed_strict": passed["strict"],
        "passed_loose": passed["loose"],
    }


def _percentile(sorted_values: list[float], q: float) -> float:
    """Linear interpolation between the closest ranks (numpy's default)."""
    pos = q * (len(sorted_values) - 1)
    lo = int(pos)
    hi = min(lo + 1, len(sorted_values) - 1)
    return sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * (pos - lo)


def paired_bootstrap(before: list[bool], after: list[bool], samples: int = 10000, seed: int = 0) -> dict:
    """Gain of `after` over `before` on the same prompts, in points (x100), with a 95% percentile
    interval: resample prompts with replacement (the same indices for both lists, so the prompts' shared
    difficulty cancels) and take the 2.5th and 97.5th percentiles of the resampled gains.

    Resampling index i contributes after[i] - before[i] in {-1, 0, 1}, so one draw of n differences
    per sample is exactly the paired bootstrap."""
    if len(before) != len(after):
        raise ValueError(f"{len(before)} results before but {len(after)} after: pair the same prompts")
    if not before:
        raise ValueError("no results to compare")
    if samples < 1:
        raise ValueError(f"samples must be at least 1, not {samples}")
    n = len(before)
    diffs = [int(bool(a)) - int(bool(b)) for b, a in zip(before, after)]
    rng = random.Random(seed)
    gains = sorted(100.0 * sum(rng.choices(diffs, k=n)) / n for _ in range(samples))
    return {"gain": 100.0 * sum(diffs) / n, "low": _percentile(gains, 0.025), "high": _percentile(gains, 0.975),
            "n": n}
