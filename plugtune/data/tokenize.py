"""Examples -> token ids + labels (IGNORE_INDEX where no loss is taken), with length policy and counts."""
from __future__ import annotations

from dataclasses import dataclass, field

from plugtune.data.formats import Example
from plugtune.data.templates import assistant_spans, ensure_chat_template, render, tokenize_segments
from plugtune.models.causal_lm import IGNORE_INDEX

__all__ = ["IGNORE_INDEX", "TokenizeStats", "Tokenized", "prompt_ids", "tokenize_dataset", "tokenize_example"]


@dataclass
class Tokenized:
    input_ids: list[int]
    labels: list[int]
    source: int = -1  # index of the example it came from (tokenize_dataset sets it)


@dataclass
class TokenizeStats:
    examples: int = 0
    kept: int = 0
    truncated: int = 0
    dropped_too_long: int = 0
    dropped_no_labels: int = 0
    max_tokens: int = 0
    supervised_tokens: int = 0
    unanswered: int = 0  # conversations that ended with a user turn; that turn was dropped (formats.normalise)
    notes: list[str] = field(default_factory=list)

    def summary(self) -> str:
        text = (f"{self.kept}/{self.examples} examples kept, {self.truncated} truncated, "
                f"{self.dropped_too_long} dropped as too long, {self.dropped_no_labels} dropped with no "
                f"trainable tokens; longest {self.max_tokens} tokens; {self.supervised_tokens} supervised tokens")
        return "; ".join([text, *self.notes])


def tokenize_example(tokenizer, example: Example, train_on: str = "responses") -> Tokenized:
    if example.text is not None:
        ids = tokenizer(example.text, add_special_tokens=True)["input_ids"]
        if tokenizer.eos_token_id is not None and (not ids or ids[-1] != tokenizer.eos_token_id):
            ids = ids + [tokenizer.eos_token_id]
        return Tokenized(ids, list(ids))
    ensure_chat_template(tokenizer)
    text, spans = assistant_spans(tokenizer, example.messages, example.where)
    ids, inside = tokenize_segments(tokenizer, text, spans)
    if train_on == "all":
        labels = list(ids)
    else:
        labels = [t if flag else IGNORE_INDEX for t, flag in zip(ids, inside)]
    return Tokenized(ids, labels)


def tokenize_dataset(tokenizer, examples: list[Example], max_length: int, overflow: str = "truncate",
                     train_on: str = "responses") -> tuple[list[Tokenized], TokenizeStats]:
    stats = TokenizeStats(examples=len(examples))
    out = []
    first_unanswered = None
    for index, ex in enumerate(examples):
        if ex.unanswered_turns:
            stats.unanswered += 1
            first_unanswered = first_unanswered or ex.where
        tok = tokenize_example(tokenizer, ex, train_on)
        tok.source = index
        stats.max_tokens = max(stats.max_tokens, len(tok.input_ids))
        if len(tok.input_ids) > max_length:
            if overflow == "drop":
                stats.dropped_too_long += 1
                continue
            tok = Tokenized(tok.input_ids[:max_length], tok.labels[:max_length], index)
            stats.truncated += 1
        # Label at position t is predicted from position t-1, so the first token never counts.
        n_supervised = sum(1 for lab in tok.labels[1:] if lab != IGNORE_INDEX)
        if n_supervised == 0:
            stats.dropped_no_labels += 1
            continue
        stats.supervised_tokens += n_supervised
        out.append(tok)
    stats.kept = len(out)
    if stats.unanswered:
        at = f" (the first at {first_unanswered})" if first_unanswered else ""
        n = stats.unanswered
        stats.notes.append(f"{n} conversation{'s' * (n != 1)} ended with a user turn that has no answer; that turn "
                           f"was dropped{at}")
    return out, stats


def prompt_ids(tokenizer, messages: list[dict]) -> list[int]:
    """Token ids of a prompt ending with the assistant header, exactly as in training."""
    ensure_chat_template(tokenizer)
    return tokenizer(render(tokenizer, messages, add_generation_prompt=True), add_special_tokens=False)["input_ids"]
