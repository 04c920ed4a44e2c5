"""The verifiable-instruction prompts: everyday requests (a topic, a kind of request) with one or two
constraints of the types checkers.py checks (IFEval's instruction ids and kwargs), as RL prompt records
(JSONL, one per line):

    {"prompt": "<user message>", "constraints": [{"type": "change_case:english_lowercase", "kwargs": {}}, ...],
     "id": "train-0000", "topic": "drinking water"}

Used by the alignment demo and pipeline: compliance before/after, demonstrations and DPO pairs picked by
the checker, the checker as GRPO's reward.

Three splits:
- train (640): 64 topics x 10 prompts over the nine training types (TYPES);
- test (256): the other 16 topics, held out whole (no test topic, nor therefore any test prompt, occurs
  in training), 16 prompts each, every training type asked for; it measures compliance on new requests;
- unseen (64): the test topics again, one prompt per topic for each of four types that never occur in
  training (UNSEEN_TYPES): does what was learnt carry over to kinds of constraints never trained on
  (the question of IFBench, Pyatkin et al. 2025)?

    python -m plugtune.tasks.instructions.prompts     # rewrite plugtune/tasks/instructions/{train,test,unseen}.jsonl
"""
from __future__ import annotations

import json
import random
from pathlib import Path

from plugtune.tasks.instructions.checkers import (BULLETS, END_CHECKER, FORBIDDEN_WORDS, HIGHLIGHTS, JSON_FORMAT,
                                                  KEYWORD_FREQUENCY, LOWERCASE, NO_COMMA, NUMBER_WORDS, POSTSCRIPT,
                                                  QUOTATION, TITLE, UPPERCASE)
from plugtune.data.readers import DataError, read_records, resolve_data_path
from plugtune.tasks.skills.generate import dump_jsonl

INSTRUCTIONS_DIR = Path(__file__).parent  # train.jsonl / test.jsonl / unseen.jsonl beside this module


# (topic as a gerund phrase, a word of it for the keyword constraint)
TOPICS = [
    ("drinking water", "water"), ("getting enough sleep", "sleep"), ("learning a new language", "language"),
    ("cooking at home", "cooking"), ("walking every day", "walking"), ("reading books", "books"),
    ("saving money", "money"), ("planting a garden", "garden"), ("recycling plastic", "plastic"),
    ("riding a bicycle", "bicycle"), ("learning to swim", "swim"), ("keeping a journal", "journal"),
    ("visiting a museum", "museum"), ("playing chess", "chess"), ("brushing teeth twice a day", "teeth"),
    ("taking a short nap", "nap"), ("baking bread", "bread"), ("stretching in the morning", "morning"),
    ("keeping a budget", "budget"), ("volunteering at an animal shelter", "shelter"),
    ("camping in the woods", "camping"), ("playing the piano", "piano"), ("painting with watercolors", "watercolors"),
    ("practicing yoga", "yoga"), ("learning to code", "code"), ("studying for exams", "exams"),
    ("drinking green tea", "tea"), ("eating more vegetables", "vegetables"), ("going for a run", "run"),
    ("watching birds", "birds"), ("visiting the library", "library"), ("taking photos", "photos"),
    ("composting food scraps", "composting"), ("fixing a flat tire", "tire"), ("making new friends", "friends"),
    ("traveling by train", "train"), ("growing tomatoes", "tomatoes"), ("practicing meditation", "meditation"),
    ("listening to music", "music"), ("owning a dog", "dog"), ("adopting a cat", "cat"),
    ("keeping a tidy room", "room"), ("packing for a trip", "trip"), ("planning a birthday party", "party"),
    ("writing a letter by hand", "letter"), ("hiking in the mountains", "mountains"), ("fishing at a lake", "lake"),
    ("building a birdhouse", "birdhouse"), ("playing football", "football"), ("learning to dance", "dance"),
    ("singing in a choir", "choir"), ("knitting a scarf", "scarf"), ("learning to drive", "drive"),
    ("shopping for groceries", "groceries"), ("wearing sunscreen", "sunscreen"), ("washing hands often", "hands"),
    ("taking the stairs", "stairs"), ("eating less sugar", "sugar"), ("turning off unused lights", "lights"),
    ("carrying a reusable bag", "bag"), ("planting trees", "trees"), ("visiting grandparents", "grandparents"),
    ("practicing math every day", "math"), ("drawing cartoons", "cartoons"), ("flying a kite", "kite"),
    ("watching the stars", "stars"), ("keeping houseplants", "houseplants"), ("making a to-do list", "list"),
    ("waking up early", "early"), ("eating breakfast", "breakfast"), ("learning the guitar", "guitar"),
    ("doing jigsaw puzzles", "puzzles"), ("baking cookies", "cookies"), ("going to the beach", "beach"),
    ("sharing a meal with family", "family"), ("limiting screen time", "screen"), ("writing short poems", "poems"),
    ("learning to ice skate", "skate"), ("going to the dentist", "dentist"), ("learning first aid", "aid"),
]
N_TEST_TOPICS = 16

# Requests that invite a short answer: compliant answers fit in ~48-64 new tokens.
REQUESTS = [
    "Briefly describe the benefits of {t}.", "Give a few quick tips for {t}.",
    "Briefly explain why {t} matters.", "What should a beginner know about {t}? Keep it short.",
    "Write a short note encouraging a friend to try {t}.", "Summarize why {t} is worth the effort.",
    "In a few sentences, explain how to get started with {t}.", "Describe a common mistake people make when {t}.",
]

# type -> phrasings (NUMBER_WORDS: per relation); the {fields} are filled from the kwargs.
PHRASINGS = {
    BULLETS: ['Answer with exactly {num_bullets} bullet points, each line starting with "* ".',
              'Use exactly {num_bullets} markdown bullet points such as "* point".',
              "Format your answer as exactly {num_bullets} bullet points."],
    LOWERCASE: ["Answer in all lowercase letters.",
                "Write your entire answer in lowercase letters; no capital letters are allowed.",
                "Use only lowercase letters in your reply."],
    UPPERCASE: ["Answer in all capital letters.",
                "Write your entire answer in uppercase letters.",
                "Use only CAPITAL letters in your reply."],
    NUMBER_WORDS: {"less than": ["Answer in fewer than {num_words} words.", "Keep your answer under {num_words} words.",
                                 "Use fewer than {num_words} words."],
                   "at least": ["Answer with at least {num_words} words.", "Write at least {num_words} words.",
                                "Your answer must be at least {num_words} words long."]},
    JSON_FORMAT: ["Reply only with a JSON object with {keys}.",
                  "Format your entire answer as JSON with {keys}.",
                  "Wrap your whole answer in JSON: an object with {keys}."],
    END_CHECKER: ['End your answer with the exact phrase "{end_phrase}" and nothing after it.',
                  'Finish your reply with the exact phrase "{end_phrase}" with no other words after it.'],
    KEYWORD_FREQUENCY: ['Use the word "{keyword}" at least {frequency} times.',
                        'Mention the word "{keyword}" at least {frequency} times in your answer.'],
    NO_COMMA: ["Do not use any commas in your answer.", "Your reply must not contain any commas.",
               "Avoid commas entirely."],
    TITLE: ["Give your answer a title wrapped in double angular brackets, such as <<my title>>.",
            "Include a title in double angular brackets, like <<title>>."],
    # Held out: never in training.
    POSTSCRIPT: ["At the end of your response, add a postscript starting with {postscript_marker}",
                 'After your answer, add a short postscript that starts with "{postscript_marker}".'],
    QUOTATION: ["Wrap your entire response with double quotation marks.",
                "Put your whole answer inside double quotation marks."],
    FORBIDDEN_WORDS: ["Do not use the words {forbidden} anywhere in your answer.",
                      "Avoid the words {forbidden} in your reply."],
    HIGHLIGHTS: ["Highlight at least {num_highlights} sections of your answer with markdown, i.e. *highlighted section*.",
                 "Use markdown to highlight at least {num_highlights} phrases, like *this one*."],
}
TYPES = [BULLETS, LOWERCASE, UPPERCASE, NUMBER_WORDS, JSON_FORMAT, END_CHECKER, KEYWORD_FREQUENCY, NO_COMMA, TITLE]
UNSEEN_TYPES = [POSTSCRIPT, QUOTATION, FORBIDDEN_WORDS, HIGHLIGHTS]  # never in the train split
_JSON_KEYS = [["answer"], ["topic", "tip"], ["title", "summary"], ["reason", "example"]]
_END_PHRASES = ["Any other questions?", "Hope this helps!", "That is all.", "Thank you for reading."]
_COMMON_WORDS = ["also", "very", "important", "good", "great", "really", "help", "easy"]  # forbidden-word pool
SECOND_CONSTRAINT_RATE = 0.3  # IFEval mixes single and multi-constraint prompts; most stay single


def _kwargs(kind: str, keyword: str, rng: random.Random) -> dict:
    # Small numbers on purpose: answers must stay short (<= 64 new tokens) and learnable by 135M.
    if kind == BULLETS:
        return {"num_bullets": rng.choice([2, 3, 4])}
    if kind == NUMBER_WORDS:
        relation = rng.choice(["less than", "at least"])
        return {"relation": relation, "num_words": rng.choice([15, 20, 30] if relation == "less than" else [20, 25, 30])}
    if kind == JSON_FORMAT:
        return {"keys": list(rng.choice(_JSON_KEYS))}
    if kind == END_CHECKER:
        return {"end_phrase": rng.choice(_END_PHRASES)}
    if kind == KEYWORD_FREQUENCY:
        return {"keyword": keyword, "frequency": rng.choice([2, 3]), "relation": "at least"}
    if kind == POSTSCRIPT:
        return {"postscript_marker": "P.S."}
    if kind == FORBIDDEN_WORDS:
        return {"forbidden_words": sorted(rng.sample(_COMMON_WORDS, 2))}
    if kind == HIGHLIGHTS:
        return {"num_highlights": rng.choice([2, 3])}
    return {}


def _phrase(kind: str, kwargs: dict, rng: random.Random) -> str:
    fill = dict(kwargs)
    if kind == JSON_FORMAT:
        names = " and ".join(f'"{k}"' for k in kwargs["keys"])
        fill["keys"] = f"the key{'s' if len(kwargs['keys']) > 1 else ''} {names}"
    if kind == FORBIDDEN_WORDS:
        fill["forbidden"] = " or ".join(f'"{w}"' for w in kwargs["forbidden_words"])
    options = PHRASINGS[kind][kwargs["relation"]] if kind == NUMBER_WORDS else PHRASINGS[kind]
    return rng.choice(options).format(**fill)


def _clash(a: dict, b: dict) -> bool:
    """Pairs never combined: both cases; uppercase with a minimum length (uppercase text costs ~2x the
    tokens: 30 words are 57 SmolLM2 tokens vs 34). JSON must be the whole answer, so it goes alone."""
    kinds = {a["type"], b["type"]}
    if kinds == {LOWERCASE, UPPERCASE} or JSON_FORMAT in kinds:
        return True
    words = a if a["type"] == NUMBER_WORDS else b if b["type"] == NUMBER_WORDS else None
    return UPPERCASE in kinds and words is not None and words["kwargs"]["relation"] == "at least"


def _second(first: dict, keyword: str, rng: random.Random) -> dict | None:
    if first["type"] == JSON_FORMAT or rng.random() >= SECOND_CONSTRAINT_RATE:
        return None
    while True:
        kind = rng.choice([t for t in TYPES if t not in (first["type"], JSON_FORMAT)])
        second = {"type": kind, "kwargs": _kwargs(kind, keyword, rng)}
        if not _clash(first, second):
            return second


def _records(topics: list[tuple[str, str]], per_topic: int, split: str, rng: random.Random, types: list[str],
             combine: bool = True) -> list[dict]:
    rows: list[dict] = []
    seen: set[str] = set()
    for ti, (topic, keyword) in enumerate(topics):
        made = 0
        while made < per_topic:
            # Primary types cycle so every type is equally frequent in each split.
            kind = types[(ti * per_topic + made) % len(types)]
            constraints = [{"type": kind, "kwargs": _kwargs(kind, keyword, rng)}]
            second = _second(constraints[0], keyword, rng) if combine else None
            constraints += [second] if second else []
            prompt = " ".join([rng.choice(REQUESTS).format(t=topic)]
                              + [_phrase(c["type"], c["kwargs"], rng) for c in constraints])
            if prompt in seen:
                continue
            seen.add(prompt)
            rows.append({"prompt": prompt, "constraints": constraints, "id": f"{split}-{len(rows):04d}",
                         "topic": topic})
            made += 1
    return rows


def _shuffled_topics(rng: random.Random) -> list[tuple[str, str]]:
    topics = list(TOPICS)
    rng.shuffle(topics)
    return topics


def build_split(seed: int = 1234, train_per_topic: int = 10, test_per_topic: int = 16) -> tuple[list[dict], list[dict]]:
    """(train, test): N_TEST_TOPICS topics are held out whole for the test split."""
    rng = random.Random(f"instructions-{seed}")
    topics = _shuffled_topics(rng)
    test = _records(topics[:N_TEST_TOPICS], test_per_topic, "test", rng, TYPES)
    train = _records(topics[N_TEST_TOPICS:], train_per_topic, "train", rng, TYPES)
    return train, test


def build_unseen(seed: int = 1234, per_topic: int = 4) -> list[dict]:
    """Prompts of the UNSEEN_TYPES on the test topics, one constraint each (so a pass is that type's)."""
    topics = _shuffled_topics(random.Random(f"instructions-{seed}"))[:N_TEST_TOPICS]
    return _records(topics, per_topic, "unseen", random.Random(f"instructions-unseen-{seed}"), UNSEEN_TYPES,
                    combine=False)


SPLITS = ("train", "test", "unseen")


def split_path(split: str) -> Path:
    if split not in SPLITS:
        raise ValueError(f"unknown instruction split {split!r} (known: {', '.join(SPLITS)})")
    return INSTRUCTIONS_DIR / f"{split}.jsonl"


def split_files() -> tuple[Path, Path]:
    return split_path("train"), split_path("test")


def load_records(split: str | Path) -> list[dict]:
    """The shipped records of "train", "test" or "unseen", or those of a file (JSONL, JSON, ...; also
    'plugtune:instructions/...'), each with a "prompt" and its "constraints" (former short type names
    are kept as written: the checkers translate them)."""
    if str(split) in SPLITS:
        text = split_path(split).read_text(encoding="utf-8")
        return [json.loads(line) for line in text.splitlines() if line.strip()]
    records = []
    for where, record in read_records(resolve_data_path(split)):
        if not (isinstance(record, dict) and isinstance(record.get("prompt"), str) and record.get("constraints")):
            raise DataError(f"{where}: an instruction record needs a \"prompt\" (text) and a non-empty "
                            f"\"constraints\" list")
        records.append(record)
    return records


def write_files() -> None:
    INSTRUCTIONS_DIR.mkdir(exist_ok=True)
    train, test = build_split()
    for split, rows in (("train", train), ("test", test), ("unseen", build_unseen())):
        split_path(split).write_text(dump_jsonl(rows), encoding="utf-8")
        print(f"instructions: {len(rows)} {split} -> {split_path(split)}")


if __name__ == "__main__":
    write_files()
