"""Verifiable instructions in the style of IFEval (Zhou et al. 2023, arXiv:2311.07911): short everyday
requests carrying one or two constraints that a few lines of Python check exactly.

This module holds the checkers, named by IFEval's instruction ids and taking IFEval's kwargs, and the
rewards built on them; prompts.py generates the records they check, scores.py scores a model on them:

    {"prompt": "<user message>", "constraints": [{"type": "change_case:english_lowercase", "kwargs": {}}, ...]}

Checking rules (strict: the response is checked as given). Where ours is stricter than IFEval's code, it
says so; an answer that passes here passes IFEval's checker too, except where noted.
- words: maximal runs of letters/digits, an apostrophe joining runs ("don't" is one word, "well-being"
  two, "3" one); markdown symbols are not words. No NLTK: the same regex everywhere.
- detectable_format:number_bullet_lists {num_bullets}: lines whose first non-blank characters are
  "* " or "- " (a space after the marker, so "**bold**" and "---" are not bullets; IFEval counts
  "---" and "*x"). Other lines (a preamble, a closing line) are allowed, as in IFEval; numbered lists
  and "•" do not count. Exactly N.
- change_case:english_lowercase / english_capital: the response equals its lower()/upper() and
  contains a letter (IFEval: str.islower()/isupper(), plus a language check we leave out), so an
  acronym ("NASA") breaks lowercase and "I" breaks it too.
- length_constraints:number_words {relation: "less than" | "at least", num_words}: the word count
  above. An answer without words follows neither relation (IFEval: "" is "less than" anything).
- detectable_format:json_format {keys?}: the whole response, whitespace-stripped, is JSON. One ```json
  fence around the whole answer is allowed (IFEval strips it even in strict mode, and chat models fence
  JSON by habit); text outside the fence fails. Our extra kwarg `keys` (not in IFEval): the JSON is an
  object holding each key with a non-empty value (extra keys allowed); without it any JSON passes.
- startend:end_checker {end_phrase}: the response, whitespace and surrounding double quotes removed,
  ends with the phrase, compared case-insensitively as in IFEval (so it combines with the case rules).
- keywords:frequency {keyword, frequency, relation}: the word, case-insensitive, as a whole word (\\b
  boundaries: "waters" does not count; IFEval counts substrings), compared with `frequency`.
- punctuation:no_comma: no "," anywhere, and at least one word (IFEval: no comma).
- detectable_format:title: a non-blank "<<...>>" on one line anywhere.
Held out from training (prompts.py's "unseen" split), checked as IFEval does:
- detectable_content:postscript {postscript_marker}: a line starting with the marker ("P.S.": also
  "p. s.", any case); IFEval also accepts the marker inside a line.
- startend:quotation: the stripped response starts and ends with a double quote (and is longer than 1).
- keywords:forbidden_words {forbidden_words}: none of the words occurs, case-insensitive, whole word.
- detectable_format:number_highlighted_sections {num_highlights}: at least N non-blank *x* or **x**
  spans, each on one line.

Loose checking (IFEval's "loose" accuracy): a constraint holds loosely if it holds on any non-blank
variant of the response: as is, without its first line, without its last line, without both, each
also with every "*" removed (`response_variants`).

Old records (and saved rollout buffers) name types by their former short names (bullets, lowercase,
max_words, ...); `canonical` maps them, with their kwargs, to the ids above wherever a record is read.
"""
from __future__ import annotations

import json
import re

_WORD = re.compile(r"[^\W_]+(?:['’][^\W_]+)*")
_BULLET = re.compile(r"^[ \t]*[*-][ \t]+\S", re.MULTILINE)
_FENCE = re.compile(r"```(?:json)?\s*(.*?)\s*```", re.DOTALL | re.IGNORECASE)
_TITLE = re.compile(r"<<[^\n<>]*[^\s<>][^\n<>]*>>")
_HIGHLIGHT = re.compile(r"\*[^\n*]*\*")
_DOUBLE_HIGHLIGHT = re.compile(r"\*\*[^\n*]*\*\*")

BULLETS = "detectable_format:number_bullet_lists"
LOWERCASE = "change_case:english_lowercase"
UPPERCASE = "change_case:english_capital"
NUMBER_WORDS = "length_constraints:number_words"
JSON_FORMAT = "detectable_format:json_format"
END_CHECKER = "startend:end_checker"
KEYWORD_FREQUENCY = "keywords:frequency"
NO_COMMA = "punctuation:no_comma"
TITLE = "detectable_format:title"
POSTSCRIPT = "detectable_content:postscript"
QUOTATION = "startend:quotation"
FORBIDDEN_WORDS = "keywords:forbidden_words"
HIGHLIGHTS = "detectable_format:number_highlighted_sections"
RELATIONS = ("less than", "at least")  # IFEval's _COMPARISON_RELATION


def count_words(text: str) -> int:
    return len(_WORD.findall(text))


def _compare(count: int, relation: str, threshold: int) -> bool:
    if relation not in RELATIONS:
        raise ValueError(f"relation must be one of {RELATIONS}, not {relation!r}")
    return count < threshold if relation == "less than" else count >= threshold


def _whole_word(word: str, text: str) -> int:
    return len(re.findall(rf"\b{re.escape(word)}\b", text, flags=re.IGNORECASE))


def _json_value(response: str):
    """The parsed JSON of the whole (optionally fenced) response; raises ValueError if it is not JSON."""
    text = response.strip()
    fenced = _FENCE.fullmatch(text)
    return json.loads(fenced.group(1) if fenced else text)


def _filled(obj, key: str) -> bool:
    return obj.get(key) not in (None, "", [], {})  # {"tip": ""} would otherwise be a free reward


# ---- checkers: check(response, **kwargs) -> bool ----

def check_bullets(response: str, num_bullets: int) -> bool:
    return len(_BULLET.findall(response)) == num_bullets


def check_lowercase(response: str) -> bool:
    return response == response.lower() and any(c.isalpha() for c in response)


def check_uppercase(response: str) -> bool:
    return response == response.upper() and any(c.isalpha() for c in response)


def check_number_words(response: str, relation: str, num_words: int) -> bool:
    n = count_words(response)
    return n > 0 and _compare(n, relation, num_words)


def check_json(response: str, keys: list[str] | tuple = ()) -> bool:
    try:
        obj = _json_value(response)
    except ValueError:
        return False
    return not keys or (isinstance(obj, dict) and all(_filled(obj, k) for k in keys))


def check_end(response: str, end_phrase: str) -> bool:
    return response.strip().strip('"').lower().endswith(end_phrase.strip().lower())


def check_keyword_frequency(response: str, keyword: str, frequency: int, relation: str = "at least") -> bool:
    return _compare(_whole_word(keyword, response), relation, frequency)


def check_no_comma(response: str) -> bool:
    return "," not in response and count_words(response) > 0


def check_title(response: str) -> bool:
    return _TITLE.search(response) is not None


def _postscript_pattern(marker: str) -> re.Pattern:
    # "P.S." also as "p. s."; any other marker literally; case-insensitive, at the start of a line.
    body = r"p\.\s?p\.\s?s" if marker == "P.P.S" else r"p\.\s?s\." if marker == "P.S." else re.escape(marker.lower())
    return re.compile(rf"^\s*{body}", re.MULTILINE | re.IGNORECASE)


def check_postscript(response: str, postscript_marker: str = "P.S.") -> bool:
    return _postscript_pattern(postscript_marker).search(response) is not None


def check_quotation(response: str) -> bool:
    text = response.strip()
    return len(text) > 1 and text[0] == '"' and text[-1] == '"'


def check_forbidden_words(response: str, forbidden_words: list[str]) -> bool:
    return not any(_whole_word(w, response) for w in forbidden_words)


def count_highlights(response: str) -> int:
    single = [h for h in _HIGHLIGHT.findall(response) if h.strip("*").strip()]
    double = [h for h in _DOUBLE_HIGHLIGHT.findall(response) if h[2:-2].strip()]
    return len(single) + len(double)


def check_highlights(response: str, num_highlights: int) -> bool:
    return count_highlights(response) >= num_highlights


CHECKERS = {
    BULLETS: check_bullets, LOWERCASE: check_lowercase, UPPERCASE: check_uppercase,
    NUMBER_WORDS: check_number_words, JSON_FORMAT: check_json, END_CHECKER: check_end,
    KEYWORD_FREQUENCY: check_keyword_frequency, NO_COMMA: check_no_comma, TITLE: check_title,
    POSTSCRIPT: check_postscript, QUOTATION: check_quotation, FORBIDDEN_WORDS: check_forbidden_words,
    HIGHLIGHTS: check_highlights,
}

# Former short names -> (IFEval id, kwargs translation), for records written before the rename.
ALIASES = {
    "bullets": (BULLETS, lambda kw: {"num_bullets": kw["n"]}),
    "lowercase": (LOWERCASE, lambda kw: {}),
    "uppercase": (UPPERCASE, lambda kw: {}),
    "max_words": (NUMBER_WORDS, lambda kw: {"relation": "less than", "num_words": kw["n"]}),
    "min_words": (NUMBER_WORDS, lambda kw: {"relation": "at least", "num_words": kw["n"]}),
    "json_keys": (JSON_FORMAT, lambda kw: {"keys": list(kw["keys"])}),
    "ends_with": (END_CHECKER, lambda kw: {"end_phrase": kw["phrase"]}),
    "keyword": (KEYWORD_FREQUENCY, lambda kw: {"keyword": kw["word"], "frequency": kw["count"], "relation": "at least"}),
    "no_commas": (NO_COMMA, lambda kw: {}),
    "title": (TITLE, lambda kw: {}),
}


def canonical(constraint: dict) -> dict:
    """The constraint under its IFEval id and kwargs; a former short name is translated."""
    kind, kwargs = constraint["type"], constraint.get("kwargs") or {}
    if kind in CHECKERS:
        return {"type": kind, "kwargs": dict(kwargs)}
    if kind in ALIASES:
        new, translate = ALIASES[kind]
        return {"type": new, "kwargs": translate(kwargs)}
    raise KeyError(f"unknown constraint type '{kind}' (known: {', '.join(CHECKERS)}; former names: {', '.join(ALIASES)})")


# ---- partial credit: how close a failing response came, in [0, 1] (for the shaped reward only) ----

def _letters_share(response: str, upper: bool) -> float:
    letters = [c for c in response if c.isalpha()]
    return sum(c.isupper() == upper for c in letters) / len(letters) if letters else 0.0


def _json_closeness(response: str, keys: list[str] | tuple = ()) -> float:
    try:
        obj = _json_value(response)
    except ValueError:
        return 0.25 if response.strip().startswith(("{", "```")) else 0.0
    if not isinstance(obj, dict):
        return 0.25
    return 0.5 + 0.5 * sum(_filled(obj, k) for k in keys) / max(len(keys), 1)


def _words_closeness(r: str, relation: str, num_words: int) -> float:
    n = count_words(r)
    if not n:
        return 0.0
    if relation == "less than":
        return max(0.0, 1 - (n - num_words + 1) / num_words)
    return min(1.0, n / max(num_words, 1))


def _frequency_closeness(r: str, keyword: str, frequency: int, relation: str = "at least") -> float:
    found = _whole_word(keyword, r)
    return min(1.0, found / max(frequency, 1)) if relation == "at least" else frequency / (found + 1)


PARTIAL = {
    BULLETS: lambda r, num_bullets: max(0.0, 1 - abs(len(_BULLET.findall(r)) - num_bullets) / num_bullets),
    LOWERCASE: lambda r: _letters_share(r, upper=False),
    UPPERCASE: lambda r: _letters_share(r, upper=True),
    NUMBER_WORDS: _words_closeness,
    JSON_FORMAT: _json_closeness,
    END_CHECKER: lambda r, end_phrase: 0.5 if end_phrase.lower() in r.lower() else 0.0,
    KEYWORD_FREQUENCY: _frequency_closeness,
    NO_COMMA: lambda r: max(0.0, 1 - r.count(",") / 5) if count_words(r) else 0.0,
    TITLE: lambda r: 0.5 if "<<" in r or ">>" in r else 0.0,
    POSTSCRIPT: lambda r, postscript_marker="P.S.": 0.5 if postscript_marker.lower() in r.lower() else 0.0,
    QUOTATION: lambda r: 0.5 if r.strip()[:1] == '"' or r.strip()[-1:] == '"' else 0.0,
    FORBIDDEN_WORDS: lambda r, forbidden_words: sum(not _whole_word(w, r) for w in forbidden_words) / len(forbidden_words),
    HIGHLIGHTS: lambda r, num_highlights: min(1.0, count_highlights(r) / num_highlights),
}


def constraints_of(record_or_constraints: dict | list) -> list[dict]:
    """The record's (or an RL prompt's meta dict's) constraints under their IFEval ids."""
    if isinstance(record_or_constraints, dict):
        record_or_constraints = record_or_constraints["constraints"]
    if not record_or_constraints:
        raise ValueError("no constraints to check: a verifiable instruction carries at least one")
    return [canonical(c) for c in record_or_constraints]


def response_variants(response: str) -> list[str]:
    """IFEval's loose variants: as is, first line removed, last line removed, both; each also with
    every "*" removed (markdown emphasis)."""
    lines = response.split("\n")
    cut = [response, "\n".join(lines[1:]).strip(), "\n".join(lines[:-1]).strip(), "\n".join(lines[1:-1]).strip()]
    return cut + [v.replace("*", "") for v in cut]


def check_response(record_or_constraints: dict | list, response: str, loose: bool = False) -> tuple[bool, list[bool]]:
    """(all constraints hold, one bool per constraint). Accepts a record (or an RL prompt's meta
    dict) with a "constraints" field, or the list of constraints itself. `loose`: each constraint
    holds if it holds on any non-blank variant of the response (IFEval's loose accuracy)."""
    variants = [v for v in response_variants(response) if v.strip()] if loose else [response]
    per = [any(bool(CHECKERS[c["type"]](v, **c["kwargs"])) for v in variants)
           for c in constraints_of(record_or_constraints)]
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
                  for c, held in zip(constraints_of(meta), per)]
        out.append(0.5 * sum(credit) / len(credit))
    return out


def strict_accuracy(records: list, responses: list[str]) -> float:
    """IFEval's prompt-level strict accuracy: the fraction of responses meeting all their constraints."""
    if len(records) != len(responses):
        raise ValueError(f"{len(records)} records but {len(responses)} responses")
    return sum(check_response(r, s)[0] for r, s in zip(records, responses)) / max(len(records), 1)


def accuracy_by_type(records: list, responses: list[str]) -> dict[str, float]:
    """Instruction-level strict accuracy per constraint type (IFEval's instruction-level, split by type)."""
    held: dict[str, list[bool]] = {}
    for record, response in zip(records, responses):
        for c, ok in zip(constraints_of(record), check_response(record, response)[1]):
            held.setdefault(c["type"], []).append(ok)
    return {t: sum(v) / len(v) for t, v in sorted(held.items())}
