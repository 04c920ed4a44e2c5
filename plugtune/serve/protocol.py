"""The OpenAI wire format: request bodies (validated with pydantic), response and stream-chunk
shapes, and the error body every 4xx/5xx answer carries:

    {"error": {"message": "...", "type": "invalid_request_error", "param": "messages", "code": null}}

Unknown request fields are ignored (as vLLM does); fields whose meaning we cannot honour (tools,
logprobs, penalties...) are refused with a 400 that names them, rather than silently dropped.
"""
from __future__ import annotations

import time
import uuid
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

FINGERPRINT = "plugtune-0.1.0"


class APIError(Exception):
    """An error answered as OpenAI's error body with this HTTP status."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def validation_error(exc: ValidationError) -> APIError:
    """The first pydantic problem as one clear 400 (OpenAI words for a missing field)."""
    err = exc.errors()[0]
    loc = [str(x) for x in err.get("loc", ())]
    param = ".".join(loc) or None
    if err.get("type") == "missing":
        return APIError(400, f"Missing required parameter: '{param}'.", param=param, code="missing_required_parameter")
    got = err.get("input")
    shown = repr(got)[:80] if not isinstance(got, dict) else "an object"
    return APIError(400, f"Invalid value for '{param}': {err.get('msg', 'invalid')} (got {shown}).", param=param,
                    code="invalid_value")


class _Body(BaseModel):
    model_config = ConfigDict(extra="ignore")


class StreamOptions(_Body):
    include_usage: bool = False


class ContentPart(_Body):
    type: str
    text: str | None = None


class ChatMessage(_Body):
    role: str
    content: str | list[ContentPart] | None = None


class SamplingFields(_Body):
    """What chat and completion requests share."""

    model: str
    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    top_k: int | None = Field(None, ge=-1)  # vLLM's extra; 0 or -1 = off
    n: int = Field(1, ge=1, le=16)
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None  # vLLM's extra
    ignore_eos: bool = False  # vLLM's extra: generate exactly max_tokens (benchmarks)
    seed: int | None = None
    user: str | None = None
    # Accepted only at their neutral values: we cannot honour the others.
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: dict | None = None
    logprobs: Any = None
    top_logprobs: int | None = None

    def refuse_unsupported(self) -> None:
        checks = {
            "presence_penalty": self.presence_penalty not in (None, 0, 0.0),
            "frequency_penalty": self.frequency_penalty not in (None, 0, 0.0),
            "logit_bias": bool(self.logit_bias),
            "logprobs": self.logprobs not in (None, False, 0),
            "top_logprobs": self.top_logprobs not in (None, 0),
        }
        checks.update(self._more_unsupported())
        for name, bad in checks.items():
            if bad:
                raise APIError(400, f"'{name}' is not supported by this server; leave it unset.", param=name,
                               code="unsupported_parameter")
        stops = self.stop_list()
        if len(stops) > 16 or any(len(s) > 256 for s in stops):
            raise APIError(400, "'stop' takes at most 16 strings of at most 256 characters each.", param="stop")

    def _more_unsupported(self) -> dict:
        return {}

    def stop_list(self) -> list[str]:
        return [self.stop] if isinstance(self.stop, str) else list(self.stop or [])


class ChatCompletionRequest(SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    tools: list | None = None
    tool_choice: Any = None
    response_format: dict | None = None

    def _more_unsupported(self) -> dict:
        return {"tools": bool(self.tools), "tool_choice": self.tool_choice not in (None, "none", "auto"),
                "response_format": (self.response_format or {}).get("type", "text") != "text"}


class CompletionRequest(SamplingFields):
    prompt: str | list[str] | list[int] | list[list[int]]
    echo: bool = False
    suffix: str | None = None
    best_of: int | None = None

    def _more_unsupported(self) -> dict:
        return {"echo": self.echo, "suffix": bool(self.suffix), "best_of": self.best_of not in (None, 1, self.n)}


CHAT_ROLES = {"system", "user", "assistant", "developer"}


def chat_messages(messages: list[ChatMessage]) -> list[dict]:
    """Plain {role, content} dicts for the chat template; text parts are joined."""
    out = []
    for i, m in enumerate(messages):
        if m.role not in CHAT_ROLES:
            raise APIError(400, f"messages[{i}].role '{m.role}' is not supported (use system, user or assistant; "
                                "this server has no tool calling).", param=f"messages.{i}.role")
        content = m.content
        if isinstance(content, list):
            parts = []
            for j, part in enumerate(content):
                if part.type != "text" or part.text is None:
                    raise APIError(400, f"messages[{i}].content[{j}] has type '{part.type}'; only text parts are "
                                        "supported.", param=f"messages.{i}.content")
                parts.append(part.text)
            content = "".join(parts)
        # The OpenAI 'developer' role is the newer name of 'system'.
        out.append({"role": "system" if m.role == "developer" else m.role, "content": content or ""})
    return out


# Responses ------------------------------------------------------------------------------------------
def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def usage(prompt: int, completion: int) -> dict:
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def envelope(kind: Literal["chat", "completion"], rid: str, model: str, adapter: str | None, created: int,
             chunk: bool) -> dict:
    """The fields every response and stream chunk carries. `adapter` names the adapter that
    answered (null: the base); `model` is that adapter's name too, or the base's."""
    obj = {"chat": "chat.completion", "completion": "text_completion"}[kind]
    if chunk and kind == "chat":
        obj += ".chunk"
    return {"id": rid, "object": obj, "created": created, "model": model, "adapter": adapter,
            "system_fingerprint": FINGERPRINT}


def chat_delta(index: int, delta: dict, finish: str | None = None) -> dict:
    return {"index": index, "delta": delta, "logprobs": None, "finish_reason": finish}


def now() -> int:
    return int(time.time())
