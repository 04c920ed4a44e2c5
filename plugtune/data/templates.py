"""Chat templates and assistant-token masking that works for any template.

Most stock templates (SmolLM2's included) have no `{% generation %}` markers, so we find the
assistant spans by rendering: for assistant turn i,
    prefix_i = render(messages[:i], add_generation_prompt=True)   # everything the model is given
    upto_i   = render(messages[:i+1])                             # ... plus the assistant's turn
and the span upto_i[len(prefix_i):] is that turn: its content and its end-of-turn token (e.g.
"<|im_end|>"), so the model learns to stop. Trailing whitespace after the end token is left out.
The rendered text is then tokenized segment by segment, so label boundaries are exact and the
prompt tokens are the same ones the model sees at generation time.
"""
from __future__ import annotations

from plugtune.data.readers import DataError

# Used when a tokenizer has no chat template of its own (e.g. GPT-2). Documented in README.
FALLBACK_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '### ' + message['role'] + ':\n' + message['content'] + eos_token + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '### assistant:\n' }}{% endif %}"
)


def ensure_chat_template(tokenizer) -> None:
    if not getattr(tokenizer, "chat_template", None):
        if tokenizer.eos_token is None:
            raise ValueError("the tokenizer has neither a chat template nor an eos token; set one of them")
        tokenizer.chat_template = FALLBACK_TEMPLATE


def render(tokenizer, messages: list[dict], add_generation_prompt: bool = False) -> str:
    if not messages:
        return ""
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)


def _end_of_turn(tokenizer) -> str | None:
    return tokenizer.eos_token


def assistant_spans(tokenizer, messages: list[dict], where: str = "") -> tuple[str, list[tuple[int, int]]]:
    """The rendered conversation and the (start, end) character spans of its assistant turns. A
    conversation the template refuses (e.g. "roles must alternate") is a DataError naming `where`."""
    from jinja2 import TemplateError  # transformers renders chat templates with jinja2

    try:
        return _assistant_spans(tokenizer, messages)
    except (TemplateError, ValueError) as exc:
        at = f"{where}: " if where else ""
        raise DataError(f"{at}the tokenizer's chat template cannot render this conversation ({exc}); reorder or "
                        "merge its turns as the template expects (often: system first, then user and assistant "
                        "alternating)") from exc


def _assistant_spans(tokenizer, messages: list[dict]) -> tuple[str, list[tuple[int, int]]]:
    full = render(tokenizer, messages)
    spans: list[tuple[int, int]] = []
    cursor = 0
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        prefix = render(tokenizer, messages[:i], add_generation_prompt=True)
        upto = render(tokenizer, messages[: i + 1])
        if upto.startswith(prefix) and full.startswith(upto) and len(prefix) >= cursor:
            start, end = len(prefix), len(upto)
        else:
            # Templates that rewrite earlier turns (e.g. strip reasoning): find the content itself.
            start = full.find(message["content"], cursor)
            if start < 0:
                raise ValueError(f"cannot locate assistant turn {i} in the rendered chat template")
            end = start + len(message["content"])
            eot = _end_of_turn(tokenizer)
            if eot and full.startswith(eot, end):
                end += len(eot)
        while end > start and full[end - 1] in " \n\t\r":
            end -= 1
        spans.append((start, end))
        cursor = end
    return full, spans


def tokenize_segments(tokenizer, text: str, spans: list[tuple[int, int]]) -> tuple[list[int], list[bool]]:
    """Token ids of `text` and, per token, whether it lies in one of `spans`."""
    ids: list[int] = []
    inside: list[bool] = []
    pos = 0
    for start, end in [*spans, (len(text), len(text))]:
        for seg, flag in ((text[pos:start], False), (text[start:end], True)):
            if seg:
                seg_ids = tokenizer(seg, add_special_tokens=False)["input_ids"]
                ids += seg_ids
                inside += [flag] * len(seg_ids)
        pos = end
    return ids, inside
