"""Programmatic repair: edit a model's own answer until it meets the record's constraints, when a
simple edit can (lower/upper-case it, drop its commas, add a <<title>> or the end phrase, cut its
sentences into exactly N bullets, wrap them as JSON with the asked keys, add the keyword, trim or
extend it to the asked length). The result is kept only if the strict checker then passes it: the
verified-demonstration idea of AutoIF (Dong et al. 2024, arXiv:2406.13542), with edits in place of
rewrites by a larger model.

Two tries, the lighter first: (1) the answer as written with only the whole-text edits (case, commas,
title, end phrase), so its own layout survives; (2) the answer taken apart into sentences and rebuilt
(bullets, JSON, length, keyword), fixing one failing constraint at a time until all hold or no edit
helps (then None: "answer in fewer than 5 words" with a title and an end phrase has no room).
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass, field

from plugtune.tasks.instructions.checkers import (BULLETS, END_CHECKER, JSON_FORMAT, KEYWORD_FREQUENCY,
                                                  LOWERCASE, NO_COMMA, NUMBER_WORDS, TITLE, UPPERCASE, check_response,
                                                  check_title, constraints_of, count_words)

# Generic sentences (no commas, no capitals after the first letter) to reach a minimum length.
FILLERS = ["Start small and build the habit step by step.", "It gets easier with a little practice.",
           "Small steps add up over time.", "Many people find it rewarding once they begin.",
           "Try it for a week and see how you feel.", "Keep it simple and enjoy the process.",
           "Ask a friend to join you for extra motivation.", "Be patient with yourself as you learn."]
KEYWORD_SENTENCES = ["Keep {w} in mind.", "Think about {w} every day.", "It all starts with {w}.",
                     "Make room for {w} in your week."]
_TITLE_SPAN = re.compile(r"<<[^\n]*?>>")
_LIST_MARKER = re.compile(r"^(?:[*\-•+]|\d+[.)])\s+")
_SENTENCE_END = re.compile(r"(?<=[.!?])[\"')\]]*\s+")
_TERMINAL = (".", "!", "?")
_MAX_EDITS = 400
_CONJUNCTIONS = {"and", "but", "so", "while", "because"}
_DANGLING = {"a", "an", "the", "to", "and", "or", "but", "of", "for", "with", "your", "in", "on", "at", "by", "is",
             "are", "that", "which", "so", "as", "from", "it", "you", "my", "their", "its"}


@dataclass
class _Draft:
    """The answer as sentences (token lists, trimmable) plus sentences added for a keyword (kept)."""
    units: list[list[str]]
    kept: list[str] = field(default_factory=list)
    fillers_used: int = 0


def _drop_unfinished(text: str) -> str:
    """Cut a last sentence that generation left unfinished ("... helps. Also try to")."""
    text = text.rstrip()
    head, _, last = text.rpartition("\n")
    if last.rstrip("\"')]*").endswith(_TERMINAL) or last.rstrip().endswith(":"):
        return text
    cut = [m.start() for m in re.finditer(r"[.!?][\"')\]]*(?=\s)", last)]
    if not cut:
        return text
    return (head + "\n" if head else "") + last[:cut[-1] + 1].rstrip()


def _sentences(response: str) -> list[str]:
    """The answer's sentences, markdown taken off (list markers, headings, bold, titles, rules)."""
    out: list[str] = []
    for line in _drop_unfinished(response).splitlines():
        line = _TITLE_SPAN.sub("", line).strip()
        if not line or set(line) <= set("-*_=#"):
            continue
        line = _LIST_MARKER.sub("", re.sub(r"^#+\s*", "", line)).replace("**", "").strip()
        out += [s.strip() for s in _SENTENCE_END.split(line) if count_words(s)]
    return [s for s in out if not s.endswith(":")] or out  # without a lead-in ("Here are some tips:")


def _sentence(tokens: list[str]) -> str:
    text = " ".join(tokens).rstrip(",;:-")
    text = text[:1].upper() + text[1:]  # a clause split off a longer sentence starts one
    return text if text.rstrip("\"')]*").endswith(_TERMINAL) else text + "."


def _groups(items: list[str], n: int) -> list[str]:
    """`items` in n contiguous, near-equal groups (n <= len(items))."""
    size, extra = divmod(len(items), n)
    out, start = [], 0
    for i in range(n):
        end = start + size + (i < extra)
        out.append(" ".join(items[start:end]))
        start = end
    return out


def _no_commas(text: str) -> str:
    return re.sub(r",\s*(?=(?:and|or|but)\b)", " ", text).replace(",", "")


def _whole_text_edits(text: str, kinds: dict, record: dict, bullets: bool) -> str:
    if TITLE in kinds and not check_title(text):
        text = f"<<{_title(record, text)}>>\n{text}"
    if END_CHECKER in kinds:
        phrase = kinds[END_CHECKER]["end_phrase"].strip()
        if not text.rstrip().lower().endswith(phrase.lower()):
            text = text.rstrip() + ("\n" if bullets else " ") + phrase
    if NO_COMMA in kinds:
        text = _no_commas(text)
    if LOWERCASE in kinds:
        text = text.lower()
    if UPPERCASE in kinds:
        text = text.upper()
    return text


def _title(record: dict, text: str) -> str:
    """The record's topic in title case ("Drinking Water"), else the answer's first words."""
    if record.get("topic"):
        words = str(record["topic"]).split()
    else:
        sentences = _sentences(text)
        words = sentences[0].split()[:4] if sentences else []
    return " ".join(w.strip(".,;:!?\"'").capitalize() for w in words) or "My Answer"


def _needed_units(kinds: dict) -> int:
    return max(kinds.get(BULLETS, {}).get("num_bullets", 1), len(kinds.get(JSON_FORMAT, {}).get("keys") or [1]))


def _render(draft: _Draft, kinds: dict, record: dict) -> str:
    sentences = [_sentence(u) for u in draft.units if u] + draft.kept
    if JSON_FORMAT in kinds:
        keys = list(kinds[JSON_FORMAT].get("keys") or ["answer"])
        values = _groups(sentences, len(keys)) if len(sentences) >= len(keys) else [" ".join(sentences)] * len(keys)
        values = [_whole_text_edits(v, {k: kw for k, kw in kinds.items() if k in (NO_COMMA, LOWERCASE, UPPERCASE)},
                                    record, False) for v in values]
        return json.dumps(dict(zip(keys, values)), ensure_ascii=False)
    if BULLETS in kinds:
        n = kinds[BULLETS]["num_bullets"]
        body = "\n".join(f"* {g}" for g in _groups(sentences, min(n, len(sentences))))
    else:
        body = " ".join(sentences)
    return _whole_text_edits(body, kinds, record, BULLETS in kinds)


def _split_longest(units: list[list[str]]) -> bool:
    """Split the longest sentence in two: at the comma or conjunction nearest its middle, else in the middle."""
    longest = max(units, key=len)
    if len(longest) < 2:
        return False
    at = [i + 1 for i, t in enumerate(longest[:-1]) if t.endswith((",", ";"))]
    at += [i for i, t in enumerate(longest[1:-1], 1) if t.lower() in _CONJUNCTIONS]
    cut = min(at, key=lambda i: abs(i - len(longest) / 2)) if at else len(longest) // 2
    second = longest[cut:]
    if len(second) > 1 and second[0].lower() in _CONJUNCTIONS:
        second = second[1:]
    i = units.index(longest)
    units[i:i + 1] = [longest[:cut], second]
    return True


def _shorten_longest(units: list[list[str]]) -> bool:
    """Drop the last clause (after its last comma) of the longest sentence, else its last word, and
    any dangling little word ("a", "to", ...) left at its end."""
    longest = max(units, key=len)
    if len(longest) < 2:
        return False
    commas = [i + 1 for i, t in enumerate(longest[:-1]) if t.endswith((",", ";"))]
    del longest[commas[-1] if commas else len(longest) - 1:]
    while len(longest) > 1 and longest[-1].lower().strip(",;") in _DANGLING:
        longest.pop()
    return True


def _fix(draft: _Draft, constraint: dict, kinds: dict) -> bool:
    """One edit towards meeting `constraint`; False when no edit of this kind can help."""
    kind, kw = constraint["type"], constraint["kwargs"]
    units = draft.units
    if kind in (BULLETS, JSON_FORMAT) and len(units) < _needed_units(kinds):
        return _split_longest(units)
    if kind == NUMBER_WORDS and kw["relation"] == "less than":
        if len(units) > _needed_units(kinds):
            units.pop()  # whole sentences first: cleaner than cutting one short
            return True
        return _shorten_longest(units)
    if kind == NUMBER_WORDS:  # at least
        if draft.fillers_used >= len(FILLERS):
            return False
        units.append(FILLERS[draft.fillers_used].split())
        draft.fillers_used += 1
        return True
    if kind == KEYWORD_FREQUENCY and kw.get("relation", "at least") == "at least":
        if len(draft.kept) >= kw["frequency"] + len(KEYWORD_SENTENCES):
            return False
        draft.kept.append(KEYWORD_SENTENCES[len(draft.kept) % len(KEYWORD_SENTENCES)].format(w=kw["keyword"]))
        return True
    return False  # case, commas, title, end phrase: applied to the whole text already


def repair(record: dict, response: str) -> str | None:
    """`response` edited to meet every constraint of `record` (a record, or an RL prompt's meta dict,
    with "constraints"; its "topic", if any, names the title), or None where no simple edit does.
    The returned text always passes `check_response(record, text)` strictly."""
    constraints = constraints_of(record)
    kinds = {c["type"]: c["kwargs"] for c in constraints}
    if len(kinds) != len(constraints):
        return None  # one type twice: the edits could pull two ways
    if check_response(record, response)[0]:
        return response
    record = record if isinstance(record, dict) else {"constraints": record}
    text = response.strip()
    if text and not (kinds.keys() & {BULLETS, JSON_FORMAT, NUMBER_WORDS, KEYWORD_FREQUENCY}):
        light = _whole_text_edits(_drop_unfinished(text), kinds, record, bool(re.search(r"^\s*[*-] ", text, re.M)))
        if check_response(record, light)[0]:
            return light
    draft = _Draft([s.split() for s in _sentences(response)])
    if not draft.units:
        return None
    for _ in range(_MAX_EDITS):
        text = _render(draft, kinds, record)
        ok, per = check_response(record, text)
        if ok:
            return text
        if not any(_fix(draft, c, kinds) for c, held in zip(constraints, per) if not held):
            return None
    return None
