"""Preference pairs for reward models and the DPO family, and prompt-only records for RL rollouts.

    paired    {"prompt", "chosen", "rejected", "system"?, "margin"?}   prompt: str | turns ending on a user turn
    implicit  {"chosen": [turns], "rejected": [turns]}                 TRL's implicit prompt: the shared prefix
    prompts   {"prompt", ...}                                          extra fields kept in PromptItem.meta

Unpaired (KTO-style) records {"prompt", "completion", "label"} are refused with an error naming the
record: no objective here trains on them.

A string prompt is one user turn and a string `chosen` / `rejected` one assistant turn. Tokenisation
is SFT's: prompt+completion is rendered as one conversation and only the completion's assistant
turns (with their end-of-turn token) are labelled, so the prompt tokens are exactly
`prompt_ids(tokenizer, prompt)`, what the model is given at generation time.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from plugtune.data.batching import collate
from plugtune.data.formats import _ROLES, DataError, _require_str, check_size, read_records
from plugtune.data.templates import assistant_spans, ensure_chat_template, tokenize_segments
from plugtune.data.tokenize import IGNORE_INDEX, Tokenized, TokenizeStats, prompt_ids

PREFERENCE_FORMATS = ("paired", "implicit")
Messages = list[dict[str, str]]


@dataclass
class PreferencePair:
    prompt: Messages  # ends with a user turn; may hold earlier assistant turns (history, never trained)
    chosen: Messages  # assistant turn(s) only
    rejected: Messages
    margin: float | None = None  # how much better chosen is (reward-model margin loss, Llama 2 eq. 2)
    where: str = ""  # "file:line", for messages about this pair later on


@dataclass
class TokenizedPair:
    chosen_ids: list[int]
    chosen_labels: list[int]  # IGNORE_INDEX except on the chosen completion's assistant tokens
    rejected_ids: list[int]
    rejected_labels: list[int]
    prompt_len: int  # the first prompt_len tokens of both sequences are the (identical) prompt
    margin: float | None = None


@dataclass
class PromptItem:
    prompt_ids: list[int]
    meta: dict[str, Any] = field(default_factory=dict)
    messages: Messages = field(default_factory=list)  # the prompt as turns (system turn included)


# ---------------------------------------------------------------- reading


def detect_preference_format(record: Any) -> str | None:
    if not isinstance(record, dict):
        return None
    if "chosen" in record and "rejected" in record:
        return "paired" if "prompt" in record else "implicit"
    return None


def _refuse_unpaired(record: dict, where: str) -> None:
    # A KTO dataset (one completion labelled desirable or not) looks like an SFT record plus a label;
    # without this it would fail as "missing field 'chosen'", which hides what is wrong.
    if "completion" in record and "label" in record and not ("chosen" in record and "rejected" in record):
        raise DataError(f"{where}: unpaired (KTO-style) examples ('prompt', 'completion', 'label') are not "
                        "supported; give preference pairs instead: 'prompt' + 'chosen' + 'rejected' (or "
                        "'chosen' + 'rejected' conversations that share their prompt turns)")


def _turns(value: Any, where: str, name: str) -> Messages:
    """A string (one turn, role decided by the caller) is handled before; here a list of messages,
    validated like formats._messages but naming our field (`chosen[1]`, not `messages[1]`)."""
    if not isinstance(value, list) or not value:
        raise DataError(f"{where}: field '{name}' must be a non-empty string or a non-empty list of "
                        "{'role', 'content'} messages")
    out = []
    for i, turn in enumerate(value):
        at = f"{where}: {name}[{i}]"
        if not isinstance(turn, dict):
            raise DataError(f"{at} must be an object with 'role' and 'content'")
        role = _require_str(turn, "role", at)
        if role not in _ROLES:
            raise DataError(f"{at}: unknown role '{role}' (expected one of {', '.join(_ROLES)})")
        content = _require_str(turn, "content", at)
        if role == "user" and not content.strip():
            raise DataError(f"{at}: the user turn's 'content' is empty; fill it in or remove the record")
        out.append({"role": role, "content": content})
    return out


def _field(record: dict, name: str, where: str, role: str) -> Messages:
    """A required field: a non-empty string (one `role` turn) or a list of messages."""
    if name not in record or record[name] is None:
        raise DataError(f"{where}: missing field '{name}'")
    value = record[name]
    if isinstance(value, str):
        check_size(value, where, name)
        if not value.strip():
            raise DataError(f"{where}: field '{name}' is empty; give it some text or remove the record")
        return [{"role": role, "content": value}]
    return _turns(value, where, name)


def _check_prompt(prompt: Messages, where: str, name: str = "prompt") -> None:
    # Generation continues after the last user turn; a prompt ending on an assistant turn would
    # train the model to answer its own message.
    if not any(m["role"] == "user" for m in prompt):
        raise DataError(f"{where}: field '{name}' has no user turn; a prompt must end with the user's message")
    if prompt[-1]["role"] != "user":
        raise DataError(f"{where}: the last turn of field '{name}' is '{prompt[-1]['role']}'; a prompt must end with "
                        "a user turn (move a final assistant turn into the completion)")


def _check_completion(turns: Messages, where: str, name: str) -> None:
    for i, m in enumerate(turns):
        if m["role"] != "assistant":
            raise DataError(f"{where}: {name}[{i}] is a '{m['role']}' turn; a completion holds assistant turns "
                            "only (put the conversation so far in 'prompt', or drop 'prompt' to use the implicit "
                            "form where chosen/rejected are whole conversations)")
        if not m["content"].strip():
            raise DataError(f"{where}: {name}[{i}] has empty content; there is nothing to prefer")


def _with_system(record: dict, prompt: Messages, where: str) -> Messages:
    if "system" not in record or record["system"] is None:
        return prompt
    system = _require_str(record, "system", where)
    if prompt[0]["role"] == "system":
        raise DataError(f"{where}: both a 'system' field and a system turn in the prompt; keep one of them")
    return [{"role": "system", "content": system}, *prompt]


def _split_implicit(chosen: Messages, rejected: Messages, where: str) -> tuple[Messages, Messages, Messages]:
    """The longest common prefix of turns is the prompt (TRL's `extract_prompt`), the rest the completions."""
    n = 0
    while n < min(len(chosen), len(rejected)) and chosen[n] == rejected[n]:
        n += 1
    if n == 0:
        raise DataError(f"{where}: implicit pair: 'chosen' and 'rejected' share no first turn, so there is no "
                        "prompt; both must start with the same conversation (or give a 'prompt' field)")
    if chosen == rejected:
        raise DataError(f"{where}: 'chosen' is identical to 'rejected'; the pair carries no preference: fix one "
                        "of them or remove the record")
    if chosen[n - 1]["role"] != "user":
        raise DataError(f"{where}: implicit pair: the shared prefix of 'chosen' and 'rejected' (turns 0..{n - 1}) "
                        f"ends with a '{chosen[n - 1]['role']}' turn, not a user turn; they must differ from the "
                        "first reply after the last shared user turn")
    return chosen[:n], chosen[n:], rejected[n:]


def _margin(record: dict, where: str) -> float | None:
    value = record.get("margin")
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise DataError(f"{where}: field 'margin' must be a number, got {type(value).__name__}")
    return float(value)


def parse_preference(record: Any, fmt: str, where: str) -> PreferencePair:
    if not isinstance(record, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(record).__name__}")
    _refuse_unpaired(record, where)
    if fmt == "paired":
        prompt = _field(record, "prompt", where, "user")
        chosen = _field(record, "chosen", where, "assistant")
        rejected = _field(record, "rejected", where, "assistant")
    elif fmt == "implicit":
        # A 'prompt' field next to whole conversations is ignored, as TRL's maybe_extract_prompt does.
        if isinstance(record.get("chosen"), str) or isinstance(record.get("rejected"), str):
            raise DataError(f"{where}: an implicit pair needs 'chosen' and 'rejected' as message lists (whole "
                            "conversations); for plain text add a 'prompt' field")
        prompt, chosen, rejected = _split_implicit(_field(record, "chosen", where, "user"),
                                                   _field(record, "rejected", where, "user"), where)
    else:
        raise DataError(f"unknown preference format '{fmt}' (use auto or one of {', '.join(PREFERENCE_FORMATS)})")
    _check_prompt(prompt, where)
    _check_completion(chosen, where, "chosen")
    _check_completion(rejected, where, "rejected")
    if chosen == rejected:
        raise DataError(f"{where}: 'chosen' is identical to 'rejected'; the pair carries no preference: fix one "
                        "of them or remove the record")
    return PreferencePair(_with_system(record, prompt, where), chosen, rejected, _margin(record, where), where)


def load_preferences(path: str | Path, fmt: str = "auto", split: str | None = None) -> list[PreferencePair]:
    """Preference pairs; one format (paired or implicit) per file. Any file readers.py reads (JSONL, JSON,
    CSV, Parquet, a saved `datasets` dataset)."""
    records = read_records(path, split)
    if not records:
        raise DataError(f"{path}: no records (the file is empty)")
    auto = fmt == "auto"
    if auto:
        where, first = records[0]
        fmt = detect_preference_format(first) or ""
        if not fmt:
            if isinstance(first, dict):
                _refuse_unpaired(first, where)
            keys = sorted(first) if isinstance(first, dict) else type(first).__name__
            raise DataError(f"{where}: cannot tell the preference format from {keys}; expected "
                            "'prompt'+'chosen'+'rejected' or 'chosen'+'rejected' (implicit prompt)")
    out = []
    for where, record in records:
        found = detect_preference_format(record)
        if auto and found is not None and found != fmt:
            raise DataError(f"{where}: this record is '{found}' but the file's first record is '{fmt}'; "
                            "use one format per file")
        out.append(parse_preference(record, fmt, where))
    # A margin on some pairs only would silently train the others with margin 0.
    with_margin = [x.margin is not None for x in out]
    if any(with_margin) and not all(with_margin):
        where = out[with_margin.index(False)].where
        raise DataError(f"{where}: missing field 'margin'; other pairs in the file have one, give it to all or none")
    return out


def load_prompts(path: str | Path, tokenizer) -> list[PromptItem]:
    """Prompt-only records for rollouts: `prompt` (str or turns ending on a user turn), optional `system`;
    every other field (a reference answer, an id) is kept in `meta` for the reward function."""
    items = []
    for where, record in read_records(path):
        if not isinstance(record, dict):
            raise DataError(f"{where}: expected a JSON object, got {type(record).__name__}")
        prompt = _with_system(record, _field(record, "prompt", where, "user"), where)
        _check_prompt(prompt, where)
        meta = {k: v for k, v in record.items() if k not in ("prompt", "system")}
        items.append(PromptItem(prompt_ids(tokenizer, prompt), meta, prompt))
    if not items:
        raise DataError(f"{path}: no records (the file is empty)")
    return items


# ---------------------------------------------------------------- tokenising


def tokenize_conversation(tokenizer, prompt: Messages, completion: Messages, where: str = "") -> tuple[list[int], list[int], int]:
    """ids, labels and prompt length of prompt+completion rendered as one conversation: the completion's
    assistant turns are labelled, and the first `prompt length` ids are what generation is given."""
    ensure_chat_template(tokenizer)
    text, spans = assistant_spans(tokenizer, prompt + completion, where)
    history = sum(m["role"] == "assistant" for m in prompt)  # assistant turns in the prompt are context only
    ids, inside = tokenize_segments(tokenizer, text, spans[history:])
    labels = [t if flag else IGNORE_INDEX for t, flag in zip(ids, inside)]
    prompt_tokens = prompt_ids(tokenizer, prompt)
    # A template that renders the prompt differently alone (e.g. strips earlier reasoning) would train on a
    # context the model never sees when generating; TRL only warns, we refuse.
    if ids[:len(prompt_tokens)] != prompt_tokens or any(lab != IGNORE_INDEX for lab in labels[:len(prompt_tokens)]):
        raise ValueError(f"{where}: the chat template renders the prompt differently inside the conversation than "
                         "with add_generation_prompt=True; preference training needs them to agree")
    return ids, labels, len(prompt_tokens)


def tokenize_pair(tokenizer, pair: PreferencePair) -> TokenizedPair:
    c_ids, c_labels, n = tokenize_conversation(tokenizer, pair.prompt, pair.chosen, pair.where)
    r_ids, r_labels, _ = tokenize_conversation(tokenizer, pair.prompt, pair.rejected, pair.where)
    return TokenizedPair(c_ids, c_labels, r_ids, r_labels, n, pair.margin)


def _fit(ids: list[int], labels: list[int], prompt_len: int, max_length: int,
         max_prompt_length: int | None) -> tuple[list[int], list[int], int]:
    """TRL's policy: the prompt loses its start (the latest turns and the assistant header are what the
    reply depends on), then the completion loses its end."""
    cut = max(0, prompt_len - max_prompt_length) if max_prompt_length else 0
    return ids[cut:][:max_length], labels[cut:][:max_length], prompt_len - cut


def tokenize_preferences(tokenizer, items: list[PreferencePair], max_length: int,
                         max_prompt_length: int | None = None, overflow: str = "truncate",
                         ) -> tuple[list[TokenizedPair], TokenizeStats]:
    """Tokenise with a length policy. overflow="truncate": prompts over max_prompt_length keep their last
    tokens, sequences over max_length lose the completion's end; "drop": either case drops the pair.
    A pair left with no completion tokens in one of its sequences (the prompt fills max_length) is dropped."""
    if overflow not in ("truncate", "drop"):
        raise ValueError(f"overflow must be 'truncate' or 'drop', got {overflow!r}")
    stats = TokenizeStats(examples=len(items))
    out: list[TokenizedPair] = []
    identical = 0
    for item in items:
        tok = tokenize_pair(tokenizer, item)
        seqs = [(tok.chosen_ids, tok.chosen_labels), (tok.rejected_ids, tok.rejected_labels)]
        longest = max(len(ids) for ids, _ in seqs)
        stats.max_tokens = max(stats.max_tokens, longest)
        too_long = longest > max_length or (max_prompt_length is not None and tok.prompt_len > max_prompt_length)
        if too_long and overflow == "drop":
            stats.dropped_too_long += 1
            continue
        fitted = [_fit(ids, labels, tok.prompt_len, max_length, max_prompt_length) for ids, labels in seqs]
        # Label t is predicted from position t-1, so the first token never counts (as in SFT).
        counts = [sum(lab != IGNORE_INDEX for lab in labels[1:]) for _, labels, _ in fitted]
        if min(counts) == 0:
            stats.dropped_no_labels += 1
            continue
        (c_ids, c_labels, n), (r_ids, r_labels, _) = fitted
        if c_ids == r_ids:  # truncation cut away every difference: zero preference signal
            identical += 1
            stats.dropped_no_labels += 1
            continue
        stats.truncated += int(too_long)
        stats.supervised_tokens += sum(counts)
        out.append(TokenizedPair(c_ids, c_labels, r_ids, r_labels, n, tok.margin))
    if identical:
        stats.notes.append(f"{identical} pairs dropped: chosen and rejected identical after truncation")
    stats.kept = len(out)
    return out, stats


# ---------------------------------------------------------------- batching


def collate_pairs(items: list[TokenizedPair], pad_id: int) -> dict[str, torch.Tensor]:
    """One (2B, T) right-padded batch, rows 0..B-1 chosen and B..2B-1 rejected, so a single forward
    scores both (policy and reference alike); `margin` (B,) when the pairs carry one."""
    rows = [Tokenized(it.chosen_ids, it.chosen_labels) for it in items]
    rows += [Tokenized(it.rejected_ids, it.rejected_labels) for it in items]
    batch = collate(rows, pad_id)  # input_ids, attention_mask, labels: (2B, T)
    margins = [it.margin for it in items]
    if any(m is not None for m in margins):
        if any(m is None for m in margins):
            raise ValueError("some pairs in the batch have a margin and some do not")
        batch["margin"] = torch.tensor(margins, dtype=torch.float32)  # (B,)
    return batch
