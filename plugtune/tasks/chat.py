"""General chat from chatterbot-corpus (read by tasks/topics.py): text no task trains on.

`general_chat` gives question -> answer examples, the forgetting probe (loss on the answers before
and after training: `plugtune compare`'s retention column, `plugtune demo --align`); `general_chat_prompts`
gives questions alone, the out-of-skill prompts a router should send to the base (`plugtune demo --skills`).
"""
from __future__ import annotations

from plugtune.data import Example
from plugtune.tasks.topics import load_conversations


def general_chat(n: int) -> list[Example]:
    """The first n distinct (question, answer) pairs, each the first two turns of a conversation."""
    pairs = [(c[0], c[1]) for convs in load_conversations().values() for c in convs if len(c) >= 2]
    pairs = list(dict.fromkeys(pairs))[:n]
    return [Example(messages=[{"role": "user", "content": q}, {"role": "assistant", "content": a}]) for q, a in pairs]


def general_chat_prompts(n: int) -> list[str]:
    """The first n distinct questions (the first turn of each conversation)."""
    questions = [c[0] for convs in load_conversations().values() for c in convs]
    return list(dict.fromkeys(questions))[:n]
