"""Verifiable instructions in the style of IFEval (Zhou et al. 2023, arXiv:2311.07911): short everyday
requests carrying one or two constraints that a few lines of Python check exactly.

This module holds the checkers and the scores built on them (strict accuracy, per-type accuracy, the
shaped reward GRPO/PPO train with); prompts.py generates the records they check:

    {"prompt": "<user message>", "constraints": [{"type": "lowercase", "kwargs": {}}, ...], ...}

Checking rules (strict: the response is checked as given; only the surrounding whitespace that
generation leaves is ignored where stated):
- words: maximal runs of letters/digits, an apostrophe joining runs ("don't" is one word, "well-being"
  two, "3" one); markdown symbols are not words. No NLTK: the same regex everywhere.
- bullets: lines whose first non-blank characters are "* " or "- " (a space after the marker, so
  "**bold**" and "---" are not bullets). Other lines (a preamble, a closing line) are allowed, as in
  IFEval; numbered lists and "•" do not count. Exactly N.
- lowercase / uppercase: the response equals its lower()/upper() and contains a letter, so an
  acronym ("NASA") breaks lowercase and "I" breaks it too.
- fewer than N / at least N words: the word count above. An answer without words follows nothing.
- json_keys: the whole response, whitespace-stripped, is a JSON object holding each key with a
  non-empty value (extra keys allowed). One ```json fence around the whole answer is allowed: IFEval's
  own JSON checker strips it even in strict mode, and chat models fence JSON by habit; text outside
  the fence fails.
- ends_with: the response, trailing whitespace removed, ends with the phrase, compared
  case-insensitively as in IFEval (so it combines with lowercase/uppercase).
- keyword: the word, case-insensitive, as a whole word (\\b boundaries: "waters" does not count),
  at least k times.
- no_commas: no "," anywhere, and at least one word.
- title: a non-blank "<<...>>" on one line anywhere.

Scores: `strict_accuracy` is IFEval's prompt-level strict accuracy (all constraints or nothing).
`compliance_reward` is the shaped training reward: 1.0 when all hold, else 0.5 x the mean credit of
the constraints (1 for one that holds, 0.9 x a graded closeness for one that does not), so any fully
compliant answer beats every partial one while samples that all fail still differ in reward.
"""
from __future__ import annotations

import json
import re

_WORD = re.compile(r"[^\W_]+(?:['’][^\W_]+)*")
_BULLET = re.compile(r"^[ \t]*[*-][ \t]+\S", re.MULTILINE)
_FENCE = re.compile(r"```(?:json)?\s*(.*?)\s*```", re.DOTALL | re.IGNORECASE)
_TITLE = re.compile(r"<<[^\n<>]*[^\s<>][^\n<>]*>>")


def count_words(text: str) -> int:
    return len(_WORD.findall(text))


# ---- checkers: check(response, **kwargs) -> bool ----

def check_bullets(response: str, n: int) -> bool:
    return len(_BULLET.findall(response)) == n


def check_lowercase(response: str) -> bool:
    return response == response.lower() and any(c.isalpha() for c in response)


def check_uppercase(response: str) -> bool:
    return response == response.upper() and any(c.isalpha() for c in response)


def check_max_words(response: str, n: int) -> bool:
    return 0 < count_words(response) < n  # "fewer than n"


def check_min_words(response: str, n: int) -> bool:
    return count_words(response) >= n


def check_json_keys(response: str, keys: list[str]) -> bool:
    text = response.strip()
    fenced = _FENCE.fullmatch(text)
    if fenced:
        text = fenced.group(1)
    try:
        obj = json.loads(text)
    except ValueError:
        return False
    # Non-empty values: {"tip": ""} would otherwise be a free reward.
    return isinstance(obj, dict) and all(obj.get(k) not in (None, "", [], {}) for k in keys)


def check_ends_with(response: str, phrase: str) -> bool:
    return response.rstrip().lower().endswith(phrase.lower())


def check_keyword(response: str, word: str, count: int) -> bool:
    return len(re.findall(rf"\b{re.escape(word)}\b", response, flags=re.IGNORECASE)) >= count


def check_no_commas(response: str) -> bool:
    return "," not in response and count_words(response) > 0


def check_title(response: str) -> bool:
    return _TITLE.search(response) is not None


CHECKERS = {
    "bullets": check_bullets, "lowercase": check_lowercase, "uppercase": check_uppercase,
    "max_words": check_max_words, "min_words": check_min_words, "json_keys": check_json_keys,
    "ends_with": check_ends_with, "keyword": check_keyword, "no_commas": check_no_commas,
    "title": check_title,
}


# ---- partial credit: how close a failing response came, in [0, 1] (for the shaped reward only) ----

def _letters_share(response: str, upper: bool) -> float:
    letters = [c for c in response if c.isalpha()]
    return sum(c.isupper() == upper for c in letters) / len(letters) if letters else 0.0


def _json_closeness(response: str, keys: list[str]) -> float:
    text = response.strip()
    fenced = _FENCE.fullmatch(text)
    try:
        obj = json.loads(fenced.group(1) if fenced else text)
    except ValueError:
        return 0.25 if text.startswith(("{", "```")) else 0.0
    if not isinstance(obj, dict):
        return 0.25
    return 0.5 + 0.5 * sum(obj.get(k) not in (None, "", [], {}) for k in keys) / len(keys)


PARTIAL = {
    "bullets": lambda r, n: max(0.0, 1 - abs(len(_BULLET.findall(r)) - n) / n),
    "lowercase": lambda r: _letters_share(r, upper=False),
    "uppercase": lambda r: _letters_share(r, upper=True),
    "max_words": lambda r, n: max(0.0, 1 - (count_words(r) - n + 1) / n) if count_words(r) else 0.0,
    "min_words": lambda r, n: min(1.0, count_words(r) / n),
    "json_keys": _json_closeness,
    "ends_with": lambda r, phrase: 0.5 if phrase.lower() in r.lower() else 0.0,
    "keyword": lambda r, word, count: min(1.0, len(re.findall(rf"\b{re.escape(word)}\b", r, flags=re.IGNORECASE)) / count),
    "no_commas": lambda r: max(0.0, 1 - r.count(",") / 5) if count_words(r) else 0.0,
    "title": lambda r: 0.5 if "<<" in r or ">>" in r else 0.0,
}


def _constraints(record_or_constraints: dict | list) -> list[dict]:
    if isinstance(record_or_constraints, dict):
        record_or_constraints = record_or_constraints["constraints"]
    if not record_or_constraints:
        raise ValueError("no constraints to check: a verifiable instruction carries at least one")
    return list(record_or_constraints)


def check_response(record_or_constraints: dict | list, response: str) -> tuple[bool, list[bool]]:
    """(all constraints hold, one bool per constraint). Accepts a record (or an RL prompt's meta
    dict) with a "constraints" field, or the list of constraints itself."""
    per = []
    for c in _constraints(record_or_constraints):
        if c["type"] not in CHECKERS:
            raise KeyError(f"unknown constraint type '{c['type']}' (known: {', '.join(CHECKERS)})")
        per.append(bool(CHECKERS[c["type"]](response, **c["kwargs"])))
    return all(per), per


def compliance_reward(prompts_meta: list, responses: list[str], graded: bool = True) -> list[float]:
    """Shaped reward per response: 1.0 if every constraint holds; else 0.5 x the mean over constraints
    of 1 (held) or, with `graded`, 0.9 x how close it came (PARTIAL: the share of lowercase letters, the
    distance to N bullets, ...). A fully compliant answer beats every partial one, and a sampler that
    never meets a constraint (a base model never answers in lowercase) still sees which of its samples
    came closer, which is what GRPO's group-relative advantages and the DPO pair choice need."""
    if len(prompts_meta) != len(responses):
        raise ValueError(f"{len(prompts_meta)} prompts but {len(responses)} responses")
    out = []
    for meta, response in zip(prompts_meta, responses):
        ok, per = check_response(meta, response)
        if ok:
            out.append(1.0)
            continue
        credit = [1.0 if held else (0.9 * PARTIAL[c["type"]](response, **c["kwargs"]) if graded else 0.0)
                  for c, held in zip(_constraints(meta), per)]
        out.append(0.5 * sum(credit) / len(credit))
    return out


def strict_accuracy(records: list, responses: list[str]) -> float:
    """IFEval's prompt-level strict accuracy: the fraction of responses meeting all their constraints."""
    if len(records) != len(responses):
        raise ValueError(f"{len(records)} records but {len(responses)} responses")
    return sum(check_response(r, s)[0] for r, s in zip(records, responses)) / max(len(records), 1)


def accuracy_by_type(records: list, responses: list[str]) -> dict[str, float]:
    """Instruction-level accuracy per constraint type (IFEval's instruction-level, split by type)."""
    held: dict[str, list[bool]] = {}
    for record, response in zip(records, responses):
        for c, ok in zip(_constraints(record), check_response(record, response)[1]):
            held.setdefault(c["type"], []).append(ok)
    return {t: sum(v) / len(v) for t, v in sorted(held.items())}
