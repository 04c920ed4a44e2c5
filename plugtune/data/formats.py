"""Read instruction data (JSONL, JSON, CSV, Parquet or a saved `datasets` dataset: see readers.py)
in the common formats and normalise every record to a list of chat messages, or to plain text.

    alpaca             {"instruction", "input"?, "output"}
    messages           {"messages": [{"role", "content"}, ...]}            (OpenAI / TRL)
    sharegpt           {"conversations": [{"from", "value"}, ...]}
    prompt_completion  {"prompt", "completion"}
    text               {"text"}                                           (trained on every token)

Checked per record: roles are system / user / assistant (ShareGPT's names mapped); a user or
assistant turn has non-empty content (an empty system turn is allowed); there is an assistant turn.
A conversation that ends after its last assistant turn with more turns (a user turn left unanswered)
loses those trailing turns: they carry no answer to learn or compare with. The example is kept, and
the count is reported with the tokenization summary (`Example.unanswered_turns`).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from plugtune.data.readers import (PACKAGED_PREFIX, DataError, check_size, read_records,  # noqa: F401 (re-exported)
                                   resolve_data_path)


@dataclass
class Example:
    messages: list[dict[str, str]] = field(default_factory=list)  # chat form
    text: str | None = None  # plain-text form (no roles, all tokens trained)
    meta: dict[str, Any] = field(default_factory=dict)  # e.g. a reference answer for exact match
    where: str = ""  # "file:line" of the record, for messages about it later
    unanswered_turns: int = 0  # trailing turns after the last assistant turn, removed (see the module docstring)

    @property
    def reference(self) -> str | None:
        """The last assistant message: the answer a generation is compared with."""
        for m in reversed(self.messages):
            if m["role"] == "assistant":
                return m["content"]
        return None

    def prompt_messages(self) -> list[dict[str, str]]:
        """Messages before the final assistant turn: what a model is asked to answer."""
        if self.messages and self.messages[-1]["role"] == "assistant":
            return self.messages[:-1]
        return list(self.messages)


FORMATS = ("alpaca", "messages", "sharegpt", "prompt_completion", "text")
_SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                   "model": "assistant", "chatgpt": "assistant", "bing": "assistant", "bard": "assistant",
                   "system": "system"}
_ROLES = ("system", "user", "assistant")


def detect_format(record: dict[str, Any]) -> str | None:
    if "messages" in record:
        return "messages"
    if "conversations" in record:
        return "sharegpt"
    if "instruction" in record and "output" in record:
        return "alpaca"
    if "prompt" in record and "completion" in record:
        return "prompt_completion"
    if "text" in record:
        return "text"
    return None


def _require_str(record: dict, key: str, where: str, optional: bool = False) -> str:
    if key not in record or (record[key] is None and optional):
        if optional:
            return ""
        raise DataError(f"{where}: missing field '{key}'")
    value = record[key]
    if value is None:
        raise DataError(f"{where}: field '{key}' is null (or an empty cell); give it text or remove the record")
    if not isinstance(value, str):
        raise DataError(f"{where}: field '{key}' must be a string, got {type(value).__name__}")
    check_size(value, where, key)
    return value


def _nonempty(text: str, where: str, what: str) -> str:
    if not text.strip():
        raise DataError(f"{where}: {what} is empty; there is nothing to learn from it: fill it in or remove the record")
    return text


def _messages(turns: Any, where: str, role_key: str, content_key: str, roles: dict[str, str] | None) -> list[dict]:
    field_name = "messages" if roles is None else "conversations"
    if turns is None:
        raise DataError(f"{where}: missing field '{field_name}'")
    if not isinstance(turns, list) or not turns:
        raise DataError(f"{where}: field '{field_name}' must be a non-empty list of turns "
                        f"[{{'{role_key}': ..., '{content_key}': ...}}, ...], got {type(turns).__name__}")
    out = []
    for i, turn in enumerate(turns):
        at = f"{where}: {field_name}[{i}]"
        if not isinstance(turn, dict):
            raise DataError(f"{at} must be an object with '{role_key}' and '{content_key}', got {type(turn).__name__}")
        raw_role = _require_str(turn, role_key, at)
        role = roles.get(raw_role.lower()) if roles is not None else raw_role
        if role not in _ROLES:
            raise DataError(f"{at}: unknown role '{raw_role}' (expected one of {', '.join(roles or _ROLES)}); "
                            "rename it or remove the turn")
        if isinstance(turn.get(content_key), list):
            raise DataError(f"{at}: '{content_key}' is a list (content parts?); give the turn's text as one string")
        content = _require_str(turn, content_key, at)
        if role != "system":  # an empty system prompt is a choice; an empty question or answer is a bug
            _nonempty(content, at, f"the {role} turn's '{content_key}'")
        out.append({"role": role, "content": content})
    return out


def normalise(record: Any, fmt: str, where: str, system_prompt: str | None = None) -> Example:
    if not isinstance(record, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(record).__name__}")
    if fmt == "auto":
        fmt = detect_format(record) or ""
        if not fmt:
            raise DataError(f"{where}: cannot tell the format from the fields {sorted(record)}; expected one of "
                            "'messages', 'conversations', 'instruction'+'output', 'prompt'+'completion', 'text'")
    meta = {k: v for k, v in record.items() if k in ("id", "skill", "answer")}
    if fmt == "text":
        return Example(text=_nonempty(_require_str(record, "text", where), where, "field 'text'"), meta=meta,
                       where=where)
    if fmt == "alpaca":
        instruction = _nonempty(_require_str(record, "instruction", where), where, "field 'instruction'")
        extra = _require_str(record, "input", where, optional=True)
        user = f"{instruction}\n\n{extra}" if extra.strip() else instruction
        output = _nonempty(_require_str(record, "output", where), where, "field 'output'")
        messages = [{"role": "user", "content": user}, {"role": "assistant", "content": output}]
    elif fmt == "prompt_completion":
        prompt = _nonempty(_require_str(record, "prompt", where), where, "field 'prompt'")
        completion = _nonempty(_require_str(record, "completion", where), where, "field 'completion'")
        messages = [{"role": "user", "content": prompt}, {"role": "assistant", "content": completion}]
    elif fmt == "messages":
        messages = _messages(record.get("messages"), where, "role", "content", None)
    elif fmt == "sharegpt":
        messages = _messages(record.get("conversations"), where, "from", "value", _SHAREGPT_ROLES)
    else:
        raise DataError(f"unknown data format '{fmt}' (use auto or one of {', '.join(FORMATS)})")
    last = max((i for i, m in enumerate(messages) if m["role"] == "assistant"), default=-1)
    if last < 0:
        raise DataError(f"{where}: the conversation has no assistant turn, so there is nothing to learn; add the "
                        "answer as an assistant turn or remove the record")
    unanswered = len(messages) - 1 - last
    messages = messages[:last + 1]  # a final user turn has no answer: dropped, and counted by tokenize_dataset
    if system_prompt and messages[0]["role"] != "system":
        messages = [{"role": "system", "content": system_prompt}, *messages]
    return Example(messages=messages, meta=meta, where=where, unanswered_turns=unanswered)


def load_examples(path: str | Path, fmt: str = "auto", system_prompt: str | None = None,
                  split: str | None = None) -> list[Example]:
    """Every record of `path` as an Example; one format per file (`fmt`, or detected from the first record)."""
    records = read_records(path, split)
    if not records:
        raise DataError(f"{path}: no records (the file is empty)")
    if fmt == "auto":  # one format per file, taken from the first record, so a broken record is named as such
        where, first = records[0]
        fmt = detect_format(first) if isinstance(first, dict) else None
        if fmt is None:
            normalise(first, "auto", where)  # raises the descriptive error
    return [normalise(r, fmt, where, system_prompt) for where, r in records]
