"""Read instruction data (JSONL or JSON) in the common formats and normalise every record to a
list of chat messages, or to plain text.

    alpaca             {"instruction", "input"?, "output"}
    messages           {"messages": [{"role", "content"}, ...]}            (OpenAI / TRL)
    sharegpt           {"conversations": [{"from", "value"}, ...]}
    prompt_completion  {"prompt", "completion"}
    text               {"text"}                                           (trained on every token)
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


class DataError(ValueError):
    """Malformed input data; the message names the file, the line and the field."""


@dataclass
class Example:
    messages: list[dict[str, str]] = field(default_factory=list)  # chat form
    text: str | None = None  # plain-text form (no roles, all tokens trained)
    meta: dict[str, Any] = field(default_factory=dict)  # e.g. a reference answer for exact match

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
    if key not in record:
        if optional:
            return ""
        raise DataError(f"{where}: missing field '{key}'")
    value = record[key]
    if value is None and optional:
        return ""
    if not isinstance(value, str):
        raise DataError(f"{where}: field '{key}' must be a string, got {type(value).__name__}")
    return value


def _messages(turns: Any, where: str, role_key: str, content_key: str, roles: dict[str, str] | None) -> list[dict]:
    field_name = "messages" if roles is None else "conversations"
    if not isinstance(turns, list) or not turns:
        raise DataError(f"{where}: field '{field_name}' must be a non-empty list of turns")
    out = []
    for i, turn in enumerate(turns):
        at = f"{where}: {field_name}[{i}]"
        if not isinstance(turn, dict):
            raise DataError(f"{at} must be an object with '{role_key}' and '{content_key}'")
        raw_role = _require_str(turn, role_key, at)
        role = roles.get(raw_role.lower()) if roles is not None else raw_role
        if role not in _ROLES:
            raise DataError(f"{at}: unknown role '{raw_role}' (expected one of {', '.join(roles or _ROLES)})")
        out.append({"role": role, "content": _require_str(turn, content_key, at)})
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
        return Example(text=_require_str(record, "text", where), meta=meta)
    if fmt == "alpaca":
        instruction = _require_str(record, "instruction", where)
        extra = _require_str(record, "input", where, optional=True)
        user = f"{instruction}\n\n{extra}" if extra.strip() else instruction
        messages = [{"role": "user", "content": user}, {"role": "assistant", "content": _require_str(record, "output", where)}]
    elif fmt == "prompt_completion":
        messages = [{"role": "user", "content": _require_str(record, "prompt", where)},
                    {"role": "assistant", "content": _require_str(record, "completion", where)}]
    elif fmt == "messages":
        messages = _messages(record.get("messages"), where, "role", "content", None)
    elif fmt == "sharegpt":
        messages = _messages(record.get("conversations"), where, "from", "value", _SHAREGPT_ROLES)
    else:
        raise DataError(f"unknown data format '{fmt}' (use auto or one of {', '.join(FORMATS)})")
    if not any(m["role"] == "assistant" for m in messages):
        raise DataError(f"{where}: the conversation has no assistant turn, so there is nothing to learn")
    if system_prompt and messages[0]["role"] != "system":
        messages = [{"role": "system", "content": system_prompt}, *messages]
    return Example(messages=messages, meta=meta)


PACKAGED_PREFIX = "plugtune:"


def resolve_data_path(path: str | Path) -> Path:
    """A file path, or 'plugtune:skills/dates_train.jsonl' for data shipped inside the package."""
    text = str(path)
    if text.startswith(PACKAGED_PREFIX):
        return Path(__file__).parent / text[len(PACKAGED_PREFIX):]
    return Path(path)


def read_records(path: str | Path) -> list[tuple[str, Any]]:
    """(location, record) pairs from a .jsonl file (one object per line) or a .json array."""
    path = resolve_data_path(path)
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".json" or text.lstrip().startswith("["):
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise DataError(f"{path}: not valid JSON (line {exc.lineno}, column {exc.colno}): {exc.msg}") from exc
        if not isinstance(data, list):
            raise DataError(f"{path}: a .json data file must hold a list of records")
        return [(f"{path} record {i}", r) for i, r in enumerate(data)]
    records = []
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            records.append((f"{path}:{lineno}", json.loads(line)))
        except json.JSONDecodeError as exc:
            raise DataError(f"{path}:{lineno}: not valid JSON ({exc.msg} at column {exc.colno}); "
                            "each line of a .jsonl file must be one JSON object") from exc
    return records


def load_examples(path: str | Path, fmt: str = "auto", system_prompt: str | None = None) -> list[Example]:
    records = read_records(path)
    if not records:
        raise DataError(f"{path}: no records")
    if fmt == "auto":  # one format per file, taken from the first record, so a broken record is named as such
        where, first = records[0]
        fmt = detect_format(first) if isinstance(first, dict) else None
        if fmt is None:
            normalise(first, "auto", where)  # raises the descriptive error
    return [normalise(r, fmt, where, system_prompt) for where, r in records]
