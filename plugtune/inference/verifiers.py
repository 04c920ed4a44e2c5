"""Verifiers: functions that score answers, shared by RL rollouts (their reward) and rejection
sampling (which answer is best, which passes).

A verifier takes (prompts, completions) -> one float per completion, where each prompt is a
`data.preference.PromptItem` (its `meta` holds the record's extra fields, e.g. the constraints of a
verifiable instruction). It is named by a registered name or given as 'package.module:function'.
"""
from __future__ import annotations

import importlib
import math
from typing import Callable

from plugtune.data.preference import PromptItem
from plugtune.tasks.instructions.checkers import compliance_reward

Verifier = Callable[[list[PromptItem], list[str]], list[float]]


def instructions_reward(prompts: list[PromptItem], completions: list[str]) -> list[float]:
    """The verifiable-instruction checkers (tasks/instructions/checkers.py) as a shaped score: 1.0 when
    every constraint holds, below 0.5 otherwise (graded by how close the answer came)."""
    return compliance_reward([p.meta for p in prompts], completions)


REWARD_FUNCTIONS: dict[str, Verifier] = {
    "instructions": instructions_reward,
}


def resolve_reward_function(name: str) -> Verifier:
    """A registered name, or 'package.module:function' taking (prompts, completions) -> list of floats."""
    if name in REWARD_FUNCTIONS:
        return REWARD_FUNCTIONS[name]
    module, sep, attr = name.partition(":")
    if not sep:
        raise ValueError(f"unknown reward function '{name}': use one of {', '.join(REWARD_FUNCTIONS)} or "
                         "'package.module:function' (called with (prompts, completions), returning one float each)")
    try:
        fn = getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError) as exc:
        raise ValueError(f"reward function '{name}' could not be imported: {exc}. Give an importable "
                         "'package.module:function' (the module on PYTHONPATH) or one of "
                         f"{', '.join(REWARD_FUNCTIONS)}") from exc
    if not callable(fn):
        raise ValueError(f"reward function '{name}' is a {type(fn).__name__}, not a function")
    return fn


def checked_scores(fn: Verifier, prompts: list[PromptItem], completions: list[str]) -> list[float]:
    """fn's scores, checked: one finite number per completion, or an error that names the function
    and says what it must return."""
    name = getattr(fn, "__name__", repr(fn))
    values = fn(prompts, completions)
    try:
        values = list(values)
    except TypeError:
        raise ValueError(f"reward function {name} returned {type(values).__name__}; it must return a list of "
                         f"{len(completions)} numbers, one per completion") from None
    if len(values) != len(completions):
        raise ValueError(f"reward function {name} returned {len(values)} values for {len(completions)} completions; "
                         "it must return one number per completion")
    out = []
    for i, v in enumerate(values):
        if isinstance(v, bool) or not isinstance(v, (int, float)) and not hasattr(v, "__float__"):
            raise ValueError(f"reward function {name} returned {v!r} ({type(v).__name__}) for completion {i}; "
                             "it must return a number per completion")
        v = float(v)
        if not math.isfinite(v):
            raise ValueError(f"reward function {name} returned {v} for completion {i}; scores must be finite")
        out.append(v)
    return out
