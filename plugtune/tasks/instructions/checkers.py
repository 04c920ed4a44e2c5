"""Verifiable instructions in the style of IFEval (Zhou et al. 2023, arXiv:2311.07911): short everyday
requests carrying one or two constraints that a few lines of Python check exactly.

Used by the alignment demo: strict compliance before/after, DPO pairs picked by the checker, the
checker as GRPO's reward. Records (JSONL, one per line) are RL prompt records:

    {"prompt": "<user message>", "constraints": [{"type": "lowercase", "kwargs": {}}, ...],
     "id": "train-0000", "topic": "drinking water"}

Checking rules (strict: the response is checked as given; only the surrounding whitespace that
generation leaves is ignored where stated):
- words: maximal runs of letters/digits, an apostrophe joining runs ("don't" is one word, "well-being"
  two, "3" one); markdown symbols are not words. No NLTK: the same regex everywhere.
- bullets: lines whose first non-blank characters are "* " or "- " (a space after the marker, so
  "**bold**" and "---" are not bullets). Other lines (a preamble, a closing line) are allowed, as in
  IFEval; numbered lists and "•" do not count. Exactly N.
- lowercase / uppercase: the response equals its lower()/upper() and contains a letter, so an
  acronym ("NASA") breaks lowercase and "I" breaks it too.
- fewer than N / at least N words: the word count above. An answer without words follows nothing.
- json_keys: the whole response, whitespace-stripped, is a JSON object holding each key with a
  non-empty value (extra keys allowed). One ```json fence around the whole answer is allowed: IFEval's
  own JSON checker strips it even in strict mode, and chat models fence JSON by habit; text outside
  the fence fails.
- ends_with: the response, trailing whitespace removed, ends with the phrase, compared
  case-insensitively as in IFEval (so it combines with lowercase/uppercase).
- keyword: the word, case-insensitive, as a whole word (\\b boundaries: "waters" does not count),
  at least k times.
- no_commas: no "," anywhere, and at least one word.
- title: a non-blank "<<...>>" on one line anywhere.

Scores: `strict_accuracy` is IFEval's prompt-level strict accuracy (all constraints or nothing).
`compliance_reward` is the shaped training reward: 1.0 when all hold, else 0.5 x the mean credit of
the constraints (1 for one that holds, 0.9 x a graded closeness for one that does not), so any fully
compliant answer beats every partial one while samples that all fail still differ in reward.

The split holds out whole topics: no test topic (nor therefore any test prompt) occurs in training.
Constraint types and their parameter pools are shared, so the test measures compliance on new
requests, not on unseen kinds of constraints.

    python -m plugtune.tasks.instructions.checkers     # rewrite plugtune/tasks/instructions/{train,test}.jsonl
"""
from __future__ import annotations

import json
import random
import re
from pathlib import Path

from plugtune.tasks.skills.generate import dump_jsonl

INSTRUCTIONS_DIR = Path(__file__).parent  # train.jsonl / test.jsonl beside this module
_WORD = re.compile(r"[^\W_]+(?:['’][^\W_]+)*")
_BULLET = re.compile(r"^[ \t]*[*-][ \t]+\S", re.MULTILINE)
_FENCE = re.compile(r"```(?:json)?\s*(.*?)\s*```", re.DOTALL | re.IGNORECASE)
_TITLE = re.compile(r"<<[^\n<>]*[^\s<>][^\n<>]*>>")


def count_words(text: str) -> int:
    return len(_WORD.findall(text))


# ---- checkers: check(response, **kwargs) -> bool ----

def check_bullets(response: str, n: int) -> bool:
    return len(_BULLET.findall(response)) == n


def check_lowercase(response: str) -> bool:
    return response == response.lower() and any(c.isalpha() for c in response)


def check_uppercase(response: str) -> bool:
    return response == response.upper() and any(c.isalpha() for c in response)


def check_max_words(response: str, n: int) -> bool:
    return 0 < count_words(response) < n  # "fewer than n"


def check_min_words(response: str, n: int) -> bool:
    return count_words(response) >= n


def check_json_keys(response: str, keys: list[str]) -> bool:
    text = response.strip()
    fenced = _FENCE.fullmatch(text)
    if fenced:
        text = fenced.group(1)
    try:
        obj = json.loads(text)
    except ValueError:
        return False
    # Non-empty values: {"tip": ""} would otherwise be a free reward.
    return isinstance(obj, dict) and all(obj.get(k) not in (None, "", [], {}) for k in keys)


def check_ends_with(response: str, phrase: str) -> bool:
    return response.rstrip().lower().endswith(phrase.lower())


def check_keyword(response: str, word: str, count: int) -> bool:
    return len(re.findall(rf"\b{re.escape(word)}\b", response, flags=re.IGNORECASE)) >= count


def check_no_commas(response: str) -> bool:
    return "," not in response and count_words(response) > 0


def check_title(response: str) -> bool:
    return _TITLE.search(response) is not None


CHECKERS = {
    "bullets": check_bullets, "lowercase": check_lowercase, "uppercase": check_uppercase,
    "max_words": check_max_words, "min_words": check_min_words, "json_keys": check_json_keys,
    "ends_with": check_ends_with, "keyword": check_keyword, "no_commas": check_no_commas,
    "title": check_title,
}


# ---- partial credit: how close a failing response came, in [0, 1] (for the shaped reward only) ----

def _letters_share(response: str, upper: bool) -> float:
    letters = [c for c in response if c.isalpha()]
    return sum(c.isupper() == upper for c in letters) / len(letters) if letters else 0.0


def _json_closeness(response: str, keys: list[str]) -> float:
    text = response.strip()
    fenced = _FENCE.fullmatch(text)
    try:
        obj = json.loads(fenced.group(1) if fenced else text)
    except ValueError:
        return 0.25 if text.startswith(("{", "```")) else 0.0
    if not isinstance(obj, dict):
        return 0.25
    return 0.5 + 0.5 * sum(obj.get(k) not in (None, "", [], {}) for k in keys) / len(keys)


PARTIAL = {
    "bullets": lambda r, n: max(0.0, 1 - abs(len(_BULLET.findall(r)) - n) / n),
    "lowercase": lambda r: _letters_share(r, upper=False),
    "uppercase": lambda r: _letters_share(r, upper=True),
    "max_words": lambda r, n: max(0.0, 1 - (count_words(r) - n + 1) / n) if count_words(r) else 0.0,
    "min_words": lambda r, n: min(1.0, count_words(r) / n),
    "json_keys": _json_closeness,
    "ends_with": lambda r, phrase: 0.5 if phrase.lower() in r.lower() else 0.0,
    "keyword": lambda r, word, count: min(1.0, len(re.findall(rf"\b{re.escape(word)}\b", r, flags=re.IGNORECASE)) / count),
    "no_commas": lambda r: max(0.0, 1 - r.count(",") / 5) if count_words(r) else 0.0,
    "title": lambda r: 0.5 if "<<" in r or ">>" in r else 0.0,
}


def _constraints(record_or_constraints: dict | list) -> list[dict]:
    if isinstance(record_or_constraints, dict):
        record_or_constraints = record_or_constraints["constraints"]
    if not record_or_constraints:
        raise ValueError("no constraints to check: a verifiable instruction carries at least one")
    return list(record_or_constraints)


def check_response(record_or_constraints: dict | list, response: str) -> tuple[bool, list[bool]]:
    """(all constraints hold, one bool per constraint). Accepts a record (or an RL prompt's meta
    dict) with a "constraints" field, or the list of constraints itself."""
    per = []
    for c in _constraints(record_or_constraints):
        if c["type"] not in CHECKERS:
            raise KeyError(f"unknown constraint type '{c['type']}' (known: {', '.join(CHECKERS)})")
        per.append(bool(CHECKERS[c["type"]](response, **c["kwargs"])))
    return all(per), per


def compliance_reward(prompts_meta: list, responses: list[str], graded: bool = True) -> list[float]:
    """Shaped reward per response: 1.0 if every constraint holds; else 0.5 x the mean over constraints
    of 1 (held) or, with `graded`, 0.9 x how close it came (PARTIAL: the share of lowercase letters, the
    distance to N bullets, ...). A fully compliant answer beats every partial one, and a sampler that
    never meets a constraint (a base model never answers in lowercase) still sees which of its samples
    came closer, which is what GRPO's group-relative advantages and the DPO pair choice need."""
    if len(prompts_meta) != len(responses):
        raise ValueError(f"{len(prompts_meta)} prompts but {len(responses)} responses")
    out = []
    for meta, response in zip(prompts_meta, responses):
        ok, per = check_response(meta, response)
        if ok:
            out.append(1.0)
            continue
        credit = [1.0 if held else (0.9 * PARTIAL[c["type"]](response, **c["kwargs"]) if graded else 0.0)
                  for c, held in zip(_constraints(meta), per)]
        out.append(0.5 * sum(credit) / len(credit))
    return out


def strict_accuracy(records: list, responses: list[str]) -> float:
    """IFEval's prompt-level strict accuracy: the fraction of responses meeting all their constraints."""
    if len(records) != len(responses):
        raise ValueError(f"{len(records)} records but {len(responses)} responses")
    return sum(check_response(r, s)[0] for r, s in zip(records, responses)) / max(len(records), 1)


def accuracy_by_type(records: list, responses: list[str]) -> dict[str, float]:
    """Instruction-level accuracy per constraint type (IFEval's instruction-level, split by type)."""
    held: dict[str, list[bool]] = {}
    for record, response in zip(records, responses):
        for c, ok in zip(_constraints(record), check_response(record, response)[1]):
            held.setdefault(c["type"], []).append(ok)
    return {t: sum(v) / len(v) for t, v in sorted(held.items())}


# ---- the generator ----

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
