"""Requests a skill router should send to the base: they mention dates, prices or measurements
but do not ask for the skill's conversion ("What year did the war end?", "Is it cheaper to fly or
take the train?"). Generated from templates like the skills (generate.py), with training and
held-out templates disjoint: a router may use the training part as examples of "no skill", the
held-out part is only for measuring (`plugtune demo --skills`, bench/routing.py).

`chat_prompts(part)` splits the general-chat questions (chatterbot-corpus, tasks/chat.py) the same
way: `fit` (negatives a router may train on), `calibrate` (its abstain threshold), `measure` (only
for reporting), every third question, so the three parts are disjoint and cover every topic.

    python -m plugtune.tasks.skills.confusable        # rewrite the shipped files
"""
from __future__ import annotations

import json
import random
from pathlib import Path

from plugtune.tasks.chat import general_chat_prompts
from plugtune.tasks.skills.generate import SKILLS_DIR, _PRICE_ITEMS, date_text, dump_jsonl

# Placeholders: {date} a date text, {year}, {month}, {item}, {p} a price, {a} an amount, {unit}, {city}.
CONFUSABLE_TEMPLATES = ([
    "What year did the {event} end?",
    "What happened on {date}?",
    "My birthday is {date}. Any gift ideas?",
    "Was {year} a leap year?",
    "I have a dentist appointment on {date}; should I reschedule it?",
    "Write a short poem about {month}.",
    "What's the weather usually like in {month}?",
    "Why do so many people get married in {month}?",
    "Who was the most famous musician of {year}?",
    "Is it cheaper to fly or take the train?",
    "Is ${p} too much for a {item}?",
    "Why do {item}s cost so much these days?",
    "I spent ${p} on a {item}. Was that a good deal?",
    "How can I save money on groceries?",
    "What is inflation, in simple words?",
    "Should I buy a used {item} or a new one?",
    "Can you recommend a good {item} under ${p}?",
    "How do I ask my boss for a raise?",
    "How far is it from {city} to {city2}?",
    "Is {a} {unit} a long way to walk?",
    "Which is heavier, a kilogram of feathers or a kilogram of steel?",
    "How long should I boil an egg?",
    "Why is the metric system used in science?",
    "I ran {a} km today. Is that good for a beginner?",
    "How many people lived in {city} in {year}?",
], [
    "When did the {event} start?",
    "Do you remember what you were doing on {date}?",
    "Plan a small party for {date}.",
    "What's a sensible budget for a {item}?",
    "My friend paid ${p} for a {item}. Is that normal?",
    "Is it worth paying extra for a better {item}?",
    "Why are prices higher in {month}?",
    "How many hours of sleep do adults need?",
    "What is the fastest way to get from {city} to {city2}?",
    "Tell me a fun fact about the year {year}.",
    "Do you think a {item} makes a good present?",
    "Is {a} {unit} of water a day enough?",
    "What should I cook for dinner tonight?",
    "How did people keep track of dates before calendars?",
])
_EVENTS = ["war", "Cold War", "Space Race", "Great Depression", "gold rush", "Hundred Years' War", "Roman Empire",
           "French Revolution", "Industrial Revolution", "Renaissance"]
_CITIES = ["Paris", "Berlin", "Madrid", "Rome", "Lisbon", "Vienna", "Prague", "Oslo", "Dublin", "Warsaw", "Athens",
           "Boston", "Chicago", "Toronto", "Denver"]
_MONTHS = ["January", "February", "March", "April", "May", "June", "July", "August", "September", "October",
           "November", "December"]
_UNIT_WORDS = ["km", "miles", "liters", "kg", "hours"]


def make_confusable(rng: random.Random, held_out: bool = False) -> str:
    city, city2 = rng.sample(_CITIES, 2)
    cents = rng.randint(500, 99_999)
    fields = {"date": date_text(rng)[0], "year": rng.randint(1900, 2024), "month": rng.choice(_MONTHS),
              "item": rng.choice(_PRICE_ITEMS), "p": f"{cents / 100:.2f}".rstrip("0").rstrip("."),
              "a": rng.randint(2, 40), "unit": rng.choice(_UNIT_WORDS), "city": city, "city2": city2,
              "event": rng.choice(_EVENTS)}
    return rng.choice(CONFUSABLE_TEMPLATES[held_out]).format(**fields)


def build_confusable(n_train: int = 300, n_test: int = 150, seed: int = 1234) -> tuple[list[dict], list[dict]]:
    """Distinct prompts; test from the held-out templates, train from the others."""
    rng = random.Random(f"confusable-{seed}")
    split = []
    for held_out, n in ((True, n_test), (False, n_train)):
        prompts: list[str] = []
        for _ in range(100 * n):
            prompt = make_confusable(rng, held_out)
            if prompt not in prompts:
                prompts.append(prompt)
            if len(prompts) == n:
                break
        split.append([{"prompt": p, "expected": "base"} for p in prompts])
    test, train = split
    return train, test


def confusable_file(split: str) -> Path:
    return SKILLS_DIR / f"confusable_{split}.jsonl"


def confusable_prompts(split: str) -> list[str]:
    """The shipped confusable prompts: split 'train' (a router may fit on them) or 'test' (measure only)."""
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', not {split!r}")
    return [json.loads(line)["prompt"] for line in confusable_file(split).read_text().splitlines()]


CHAT_PARTS = ("fit", "calibrate", "measure")


def chat_prompts(part: str, n: int | None = None) -> list[str]:
    """General-chat questions, every third one: 'fit' (i % 3 == 0), 'calibrate' (1) or 'measure' (2)."""
    if part not in CHAT_PARTS:
        raise ValueError(f"part must be one of {CHAT_PARTS}, not {part!r}")
    questions = general_chat_prompts(100_000)[CHAT_PARTS.index(part)::3]
    return questions[:n] if n else questions


def write_all() -> None:
    train, test = build_confusable()
    confusable_file("train").write_text(dump_jsonl(train))
    confusable_file("test").write_text(dump_jsonl(test))
    print(f"confusable: {len(train)} train, {len(test)} test -> {SKILLS_DIR}")


if __name__ == "__main__":
    write_all()
