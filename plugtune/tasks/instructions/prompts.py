"""The verifiable-instruction prompts: everyday requests (a topic, a kind of request) with one or two
constraints of the types checkers.py checks, as RL prompt records (JSONL, one per line):

    {"prompt": "<user message>", "constraints": [{"type": "lowercase", "kwargs": {}}, ...],
     "id": "train-0000", "topic": "drinking water"}

Used by the alignment demo: strict compliance before/after, DPO pairs picked by the checker, the
checker as GRPO's reward.

The split holds out whole topics: no test topic (nor therefore any test prompt) occurs in training.
Constraint types and their parameter pools are shared, so the test measures compliance on new
requests, not on unseen kinds of constraints.

    python -m plugtune.tasks.instructions.prompts     # rewrite plugtune/tasks/instructions/{train,test}.jsonl
"""
from __future__ import annotations

import json
import random
from pathlib import Path

from plugtune.tasks.skills.generate import dump_jsonl

INSTRUCTIONS_DIR = Path(__file__).parent  # train.jsonl / test.jsonl beside this module


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

# type -> phrasings; {n}, {keys}, {phrase}, {word}, {count} are filled from the kwargs.
PHRASINGS = {
    "bullets": ['Answer with exactly {n} bullet points, each line starting with "* ".',
                'Use exactly {n} markdown bullet points such as "* point".',
                "Format your answer as exactly {n} bullet points."],
    "lowercase": ["Answer in all lowercase letters.",
                  "Write your entire answer in lowercase letters; no capital letters are allowed.",
                  "Use only lowercase letters in your reply."],
    "uppercase": ["Answer in all capital letters.",
                  "Write your entire answer in uppercase letters.",
                  "Use only CAPITAL letters in your reply."],
    "max_words": ["Answer in fewer than {n} words.", "Keep your answer under {n} words.", "Use fewer than {n} words."],
    "min_words": ["Answer with at least {n} words.", "Write at least {n} words.",
                  "Your answer must be at least {n} words long."],
    "json_keys": ["Reply only with a JSON object with {keys}.",
                  "Format your entire answer as JSON with {keys}.",
                  "Wrap your whole answer in JSON: an object with {keys}."],
    "ends_with": ['End your answer with the exact phrase "{phrase}" and nothing after it.',
                  'Finish your reply with the exact phrase "{phrase}" with no other words after it.'],
    "keyword": ['Use the word "{word}" at least {count} times.',
                'Mention the word "{word}" at least {count} times in your answer.'],
    "no_commas": ["Do not use any commas in your answer.", "Your reply must not contain any commas.",
                  "Avoid commas entirely."],
    "title": ["Give your answer a title wrapped in double angular brackets, such as <<my title>>.",
              "Include a title in double angular brackets, like <<title>>."],
}
TYPES = list(PHRASINGS)
_JSON_KEYS = [["answer"], ["topic", "tip"], ["title", "summary"], ["reason", "example"]]
_END_PHRASES = ["Any other questions?", "Hope this helps!", "That is all.", "Thank you for reading."]
# Pairs never combined. JSON must be the whole answer, so it goes alone. Uppercase text costs ~2x
# the tokens (30 words: 57 SmolLM2 tokens vs 34), so it never also asks for a minimum length.
_CONFLICTS = {frozenset(("lowercase", "uppercase")), frozenset(("max_words", "min_words")),
              frozenset(("uppercase", "min_words"))}
SECOND_CONSTRAINT_RATE = 0.3  # IFEval mixes single and multi-constraint prompts; most stay single


def _kwargs(kind: str, keyword: str, rng: random.Random) -> dict:
    # Small numbers on purpose: answers must stay short (<= 64 new tokens) and learnable by 135M.
    if kind == "bullets":
        return {"n": rng.choice([2, 3, 4])}
    if kind == "max_words":
        return {"n": rng.choice([15, 20, 30])}
    if kind == "min_words":
        return {"n": rng.choice([20, 25, 30])}
    if kind == "json_keys":
        return {"keys": list(rng.choice(_JSON_KEYS))}
    if kind == "ends_with":
        return {"phrase": rng.choice(_END_PHRASES)}
    if kind == "keyword":
        return {"word": keyword, "count": rng.choice([2, 3])}
    return {}


def _phrase(kind: str, kwargs: dict, rng: random.Random) -> str:
    fill = dict(kwargs)
    if kind == "json_keys":
        names = " and ".join(f'"{k}"' for k in kwargs["keys"])
        fill["keys"] = f"the key{'s' if len(kwargs['keys']) > 1 else ''} {names}"
    return rng.choice(PHRASINGS[kind]).format(**fill)


def _second_type(first: str, rng: random.Random) -> str | None:
    if first == "json_keys" or rng.random() >= SECOND_CONSTRAINT_RATE:
        return None
    options = [t for t in TYPES if t not in (first, "json_keys") and frozenset((first, t)) not in _CONFLICTS]
    return rng.choice(options)


def _records(topics: list[tuple[str, str]], per_topic: int, split: str, rng: random.Random) -> list[dict]:
    rows: list[dict] = []
    seen: set[str] = set()
    for ti, (topic, keyword) in enumerate(topics):
        made = 0
        while made < per_topic:
            # Primary types cycle so every type is equally frequent in each split.
            first = TYPES[(ti * per_topic + made) % len(TYPES)]
            kinds = [first] + [t for t in [_second_type(first, rng)] if t]
            constraints = [{"type": k, "kwargs": _kwargs(k, keyword, rng)} for k in kinds]
            prompt = " ".join([rng.choice(REQUESTS).format(t=topic)]
                              + [_phrase(c["type"], c["kwargs"], rng) for c in constraints])
            if prompt in seen:
                continue
            seen.add(prompt)
            rows.append({"prompt": prompt, "constraints": constraints, "id": f"{split}-{len(rows):04d}",
                         "topic": topic})
            made += 1
    return rows


def build_split(seed: int = 1234, train_per_topic: int = 10, test_per_topic: int = 8) -> tuple[list[dict], list[dict]]:
    """(train, test): N_TEST_TOPICS topics are held out whole for the test split."""
    rng = random.Random(f"instructions-{seed}")
    topics = list(TOPICS)
    rng.shuffle(topics)
    test = _records(topics[:N_TEST_TOPICS], test_per_topic, "test", rng)
    train = _records(topics[N_TEST_TOPICS:], train_per_topic, "train", rng)
    return train, test


def split_files() -> tuple[Path, Path]:
    return INSTRUCTIONS_DIR / "train.jsonl", INSTRUCTIONS_DIR / "test.jsonl"


def load_records(split: str) -> list[dict]:
    """The shipped records of "train" or "test"."""
    path = dict(zip(("train", "test"), split_files()))[split]
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def write_files() -> None:
    INSTRUCTIONS_DIR.mkdir(exist_ok=True)
    train, test = build_split()
    train_file, test_file = split_files()
    train_file.write_text(dump_jsonl(train), encoding="utf-8")
    test_file.write_text(dump_jsonl(test), encoding="utf-8")
    print(f"instructions: {len(train)} train -> {train_file}, {len(test)} test -> {test_file}")


if __name__ == "__main__":
    write_files()
