"""Built-in generated skills with exactly checkable answers, used by the demo and the tests.

Each skill maps a random input to an answer that depends on it in a fixed format, so exact match
is a fair score. `build_split` makes a fixed train/test split (seeded) in which no test input
appears in training. The shipped files in plugtune/data/skills/ are its output; a test checks
that regenerating them gives the same bytes.

    python -m plugtune.data.skills          # rewrite the shipped files
"""
from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Callable

SKILLS_DIR = Path(__file__).parent / "skills"
MONTHS = ["January", "February", "March", "April", "May", "June", "July", "August", "September",
          "October", "November", "December"]
_DAYS_IN = [31, 29, 31, 30, 31, 30, 31, 31, 30, 31, 30, 31]
_WORDS = ("apple river stone cloud tiger lemon piano candle forest rocket silver garden mirror castle "
          "window pepper orange violet marble planet bridge camera dragon falcon hammer island jacket "
          "kettle ladder magnet needle pillow rabbit saddle tunnel wallet yellow zipper anchor basket").split()


def _ordinal(n: int) -> str:
    suffix = "th" if 10 <= n % 100 <= 20 else {1: "st", 2: "nd", 3: "rd"}.get(n % 10, "th")
    return f"{n}{suffix}"


def make_date(rng: random.Random) -> tuple[str, str]:
    year, month = rng.randint(1950, 2049), rng.randint(1, 12)
    day = rng.randint(1, _DAYS_IN[month - 1] if month != 2 else 28)
    name = MONTHS[month - 1]
    style = rng.randrange(5)
    text = [f"{name} {day}, {year}", f"{day} {name} {year}", f"the {_ordinal(day)} of {name}, {year}",
            f"{name[:3]} {day} {year}", f"{_ordinal(day)} {name} {year}"][style]
    return f"Rewrite this date in ISO format (YYYY-MM-DD): {text}", f"{year:04d}-{month:02d}-{day:02d}"


def make_reverse(rng: random.Random) -> tuple[str, str]:
    words = rng.sample(_WORDS, rng.randint(3, 6))
    return f"Reverse the order of these words: {', '.join(words)}", ", ".join(reversed(words))


def make_price(rng: random.Random) -> tuple[str, str]:
    cents = rng.randint(100, 99_999)
    value = cents / 100
    shown = f"{value:.2f}".rstrip("0").rstrip(".") if rng.random() < 0.5 else f"{value:.2f}"
    item = rng.choice(["jacket", "lamp", "ticket", "bicycle", "book", "kettle", "chair", "watch", "rug"])
    sentence = rng.choice([f"The {item} costs ${shown} after the discount.", f"I paid ${shown} for a {item} yesterday.",
                           f"A new {item} sells for ${shown} at the market.", f"Our {item} was ${shown}, tax included."])
    return f"Extract the price as a number with two decimals: {sentence}", f"{value:.2f}"


_UNITS = [("km", "m", 1000), ("m", "cm", 100), ("kg", "g", 1000), ("l", "ml", 1000), ("h", "min", 60), ("min", "s", 60)]


def make_unit(rng: random.Random) -> tuple[str, str]:
    src, dst, factor = rng.choice(_UNITS)
    amount = rng.randint(2, 950) / (10 if rng.random() < 0.5 else 1)
    amount_text = f"{amount:g}"
    result = round(amount * factor, 6)
    return f"Convert {amount_text} {src} to {dst}.", f"{result:g} {dst}"


SKILLS: dict[str, Callable[[random.Random], tuple[str, str]]] = {
    "dates": make_date, "reverse": make_reverse, "prices": make_price, "units": make_unit,
}


def build_split(skill: str, n_train: int = 2000, n_test: int = 100, seed: int = 1234) -> tuple[list[dict], list[dict]]:
    """Distinct prompts, the first n_test for test; training never contains a test prompt."""
    make = SKILLS[skill]
    rng = random.Random(f"{skill}-{seed}")
    seen: set[str] = set()
    rows: list[dict] = []
    attempts = 0
    while len(rows) < n_train + n_test:
        attempts += 1
        if attempts > 50 * (n_train + n_test):
            raise RuntimeError(f"skill '{skill}' cannot produce {n_train + n_test} distinct prompts")
        prompt, answer = make(rng)
        if prompt in seen:
            continue
        seen.add(prompt)
        rows.append({"messages": [{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}],
                     "skill": skill})
    return rows[n_test:], rows[:n_test]


def skill_files(skill: str) -> tuple[Path, Path]:
    if skill not in SKILLS:
        raise KeyError(f"unknown skill '{skill}' (built-in: {', '.join(SKILLS)})")
    return SKILLS_DIR / f"{skill}_train.jsonl", SKILLS_DIR / f"{skill}_test.jsonl"


def dump_jsonl(rows: list[dict]) -> str:
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)


def write_all() -> None:
    SKILLS_DIR.mkdir(exist_ok=True)
    for skill in SKILLS:
        train, test = build_split(skill)
        train_file, test_file = skill_files(skill)
        train_file.write_text(dump_jsonl(train))
        test_file.write_text(dump_jsonl(test))
        print(f"{skill}: {len(train)} train -> {train_file}, {len(test)} test -> {test_file}")


if __name__ == "__main__":
    write_all()
