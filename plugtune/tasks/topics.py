"""Topic classification from chatterbot-corpus (PyPI package `chatterbot-corpus`, offline YAML files).

Each file data/english/<category>.yml holds `conversations`: lists of turns [question, answer, ...].
One example per conversation: text = "question answer" (the first two turns), label = the file's
category (21 of them: ai, botprofile, coding, ... trivia).

Why deduplicate: the 2,026 English conversations hold only 855 distinct (question, answer) pairs;
tech_support alone repeats 10 pairs 1,050 times. Duplicates would put test texts in training.
Why split by question: a question asked with several answers ("tell me a joke": 30 jokes) goes wholly
to train or wholly to test, so the test measures topics of unseen questions. The split is stratified
by category and seeded: the same split everywhere.
"""
from __future__ import annotations

import importlib.metadata
import random
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import yaml

_DIST = "chatterbot-corpus"
_INSTALL_HINT = "pip install --no-deps chatterbot-corpus   (it needs only pyyaml)"


@dataclass
class TopicSplit:
    train_texts: list[str]
    train_labels: list[int]
    test_texts: list[str]
    test_labels: list[int]
    label_names: list[str]  # label id -> category (the YAML file's name)


def corpus_dir(language: str = "english") -> Path:
    # Located through the package's metadata: importing chatterbot_corpus is not needed.
    try:
        dist = importlib.metadata.distribution(_DIST)
    except importlib.metadata.PackageNotFoundError as exc:
        raise FileNotFoundError(f"the topic data ships in the package '{_DIST}', which is not installed. "
                                f"Install it with: {_INSTALL_HINT}") from exc
    path = Path(dist.locate_file(f"chatterbot_corpus/data/{language}"))
    if not path.is_dir():
        raise FileNotFoundError(f"{path} is missing; reinstall with: {_INSTALL_HINT} --force-reinstall")
    return path


def load_conversations(language: str = "english") -> dict[str, list[list[str]]]:
    """category -> conversations (lists of turns as strings), categories sorted by name."""
    out = {}
    for file in sorted(corpus_dir(language).glob("*.yml")):
        data = yaml.safe_load(file.read_text(encoding="utf-8")) or {}
        convs = [[str(t).strip() for t in c if t is not None] for c in data.get("conversations") or []]
        out[file.stem] = [c for c in convs if c and c[0]]
    return out


def topic_examples(language: str = "english", with_answer: bool = True) -> tuple[list[tuple[str, str, int]], list[str]]:
    """Distinct examples (question, text, label) and the label names. A text filed under two
    categories (e.g. 'hello' in greetings and conversations) is ambiguous and dropped."""
    convs = load_conversations(language)
    label_names = sorted(convs)
    by_text: dict[str, set[int]] = defaultdict(set)
    question_of: dict[str, str] = {}
    for label, name in enumerate(label_names):
        for turns in convs[name]:
            text = " ".join(turns[:2]) if with_answer else turns[0]
            by_text[text].add(label)
            question_of[text] = turns[0].lower()
    examples = [(question_of[t], t, next(iter(ls))) for t, ls in sorted(by_text.items()) if len(ls) == 1]
    return examples, label_names


def split_by_question(examples: list[tuple[str, str, int]], fraction: float, rng: random.Random):
    """(kept, held out): per category, whole question groups (in a seeded random order) are held out
    while they fit in `fraction` of the category's examples; at least one group is kept."""
    groups: dict[int, dict[str, list[tuple[str, str, int]]]] = defaultdict(lambda: defaultdict(list))
    for example in examples:
        groups[example[2]][example[0]].append(example)
    kept, held = [], []
    for label in sorted(groups):
        questions = sorted(groups[label])
        rng.shuffle(questions)
        want, taken = round(fraction * sum(len(groups[label][q]) for q in questions)), 0
        for i, q in enumerate(questions):
            size = len(groups[label][q])
            hold = taken + size <= want and i < len(questions) - 1  # a group never splits nor overshoots
            (held if hold else kept).extend(groups[label][q])
            taken += size if hold else 0
    rng.shuffle(kept)
    return kept, held


def topic_split(test_fraction: float = 0.2, seed: int = 0, language: str = "english", with_answer: bool = True,
                validation_fraction: float = 0.0) -> TopicSplit:
    """The fixed train/test split (stratified by category, by question group, seeded).

    validation_fraction > 0: split the TRAIN part again and return (train minus validation, validation)
    in the train/test fields, to choose hyperparameters without looking at the test set."""
    examples, label_names = topic_examples(language, with_answer)
    rng = random.Random(seed)
    train, test = split_by_question(examples, test_fraction, rng)
    if validation_fraction > 0:
        train, test = split_by_question(train, validation_fraction, rng)
    return TopicSplit([t for _, t, _ in train], [lab for _, _, lab in train], [t for _, t, _ in test],
                      [lab for _, _, lab in test], label_names)
