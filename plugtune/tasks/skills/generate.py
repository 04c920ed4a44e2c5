"""Built-in generated skills with exactly checkable answers, used by the demos, the router and the tests.

Each skill maps a random input to an answer that depends on it in a fixed format, so exact match
is a fair score. `build_split` makes a fixed train/test split (seeded) in which no test input
appears in training. The shipped files in plugtune/tasks/skills/ are its output; a test checks
that regenerating them gives the same bytes.

Wording. `dates`, `reverse`, `prices` and `units` are asked in many phrasings (`TEMPLATES`):
questions and imperatives, with or without the output format spelled out, the input before or
after the instruction, casual and formal. Each has at least 20 training templates and a disjoint
set of held-out templates used only by the test file, so a test prompt is a wording the adapter
(and the router) never saw, not only an unseen input. The answer's form is part of the skill and
does not vary (dates: YYYY-MM-DD; prices: two decimals; units: "<value> <unit>"; reverse: the words
comma-separated). `arith` keeps its one fixed wording: it is the task of `plugtune compare arith`,
whose measured figures depend on these exact files.

    python -m plugtune.tasks.skills.generate          # rewrite the shipped files
"""
from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Callable

SKILLS_DIR = Path(__file__).parent  # the shipped JSONL files sit beside this module
MONTHS = ["January", "February", "March", "April", "May", "June", "July", "August", "September",
          "October", "November", "December"]
_DAYS_IN = [31, 29, 31, 30, 31, 30, 31, 31, 30, 31, 30, 31]
_WORDS = ("apple river stone cloud tiger lemon piano candle forest rocket silver garden mirror castle "
          "window pepper orange violet marble planet bridge camera dragon falcon hammer island jacket "
          "kettle ladder magnet needle pillow rabbit saddle tunnel wallet yellow zipper anchor basket").split()


def _ordinal(n: int) -> str:
    suffix = "th" if 10 <= n % 100 <= 20 else {1: "st", 2: "nd", 3: "rd"}.get(n % 10, "th")
    return f"{n}{suffix}"


# Wording templates per skill: (training templates, held-out templates); the two never share one.
# Placeholders: dates {d} (the date text); reverse {w} (the words, comma-separated); prices {s} (a
# sentence holding the price); units {a} {src} {dst}.
DATE_TEMPLATES = ([
    "Rewrite this date in ISO format (YYYY-MM-DD): {d}",
    "Convert {d} to ISO 8601.",
    "What is {d} in YYYY-MM-DD format?",
    "{d} -> ISO date please",
    "Please express the date {d} as YYYY-MM-DD.",
    "Can you turn {d} into an ISO date?",
    "ISO format for {d}?",
    "Normalize this date: {d}",
    "I need {d} written as year-month-day with dashes.",
    "Format the following date as ISO 8601 (YYYY-MM-DD). Date: {d}",
    "hey, what's {d} in ISO format?",
    "Give me the ISO 8601 form of {d}.",
    "Date: {d}. Output it in ISO format.",
    "Kindly convert the date {d} into the standard YYYY-MM-DD notation.",
    "Write {d} the way a computer would store it (YYYY-MM-DD).",
    "Change this to an ISO date: {d}",
    "{d}. How would you write that in ISO format?",
    "Turn the date '{d}' into YYYY-MM-DD.",
    "Express {d} as an ISO 8601 date string.",
    "Could you reformat {d} as YYYY-MM-DD for me?",
    "Standardize the date {d} to ISO.",
    "quick one: {d} in iso?",
    "Convert to ISO 8601 date format: {d}",
    "What would {d} look like as an ISO date?",
], [
    "ISO 8601 please: {d}",
    "How do I write {d} in ISO format?",
    "Reformat the date {d} as year-month-day.",
    "{d}: give me the ISO version.",
    "Please rewrite {d} using the YYYY-MM-DD format.",
    "Transform {d} into an ISO-formatted date.",
    "In ISO notation, what is {d}?",
    "Need this date as YYYY-MM-DD: {d}",
    "Could you convert the date {d} to ISO 8601?",
    "Put {d} into ISO date form.",
])

REVERSE_TEMPLATES = ([
    "Reverse the order of these words: {w}",
    "Write these words backwards (last one first): {w}",
    "Flip the order of this list: {w}",
    "{w}. Now list them in reverse order.",
    "Can you reverse this word list? {w}",
    "Put these words in the opposite order: {w}",
    "Reverse: {w}",
    "List the following words from last to first: {w}",
    "Please reverse the sequence {w}",
    "What is {w} in reverse order?",
    "Give me these in reverse: {w}",
    "Read this list backwards: {w}",
    "Invert the order of the words {w}.",
    "Words: {w}. Reverse them.",
    "reverse these pls: {w}",
    "Rearrange {w} so the last word comes first and the first comes last.",
    "Return the words in reverse order, comma-separated: {w}",
    "Kindly reverse the following list of words: {w}",
    "Turn this list around: {w}",
    "Order these words backwards: {w}",
], [
    "Backwards, please: {w}",
    "Could you write the list {w} in reverse?",
    "Reverse the sequence of the words below.\n{w}",
    "{w}: reversed order?",
    "Take these words and reverse their order: {w}",
    "Show {w} from the end to the start.",
    "I need this list reversed: {w}",
    "Start from the last word and go back: {w}",
])

PRICE_TEMPLATES = ([
    "Extract the price as a number with two decimals: {s}",
    "What does it cost? {s}",
    "{s} How much is that, as a plain number?",
    "Pull the price out of this sentence: {s}",
    "How much money is mentioned here? {s}",
    "Give me just the amount, two decimal places: {s}",
    "Find the price in: \"{s}\"",
    "What's the price in this text? {s}",
    "Read this and tell me the cost as a decimal number: {s}",
    "Please identify the monetary amount in the following sentence. {s}",
    "{s} What's the amount?",
    "Amount only, please: {s}",
    "Return the price (format 0.00) from: {s}",
    "Get the dollar value from this: {s}",
    "Sentence: {s}\nPrice:",
    "how much did it cost? {s}",
    "What number is the price? Answer with two decimals. {s}",
    "Extract the cost from the sentence below.\n{s}",
    "Tell me the price mentioned: {s}",
    "I need the price from this line as a number: {s}",
    "Parse the dollar amount: {s}",
    "What is the cost stated in \"{s}\"?",
], [
    "Pull out the amount from: '{s}'",
    "How much does this say it cost? {s}",
    "{s} What's the price, as a number?",
    "Price as a decimal number, please: {s}",
    "Can you extract the dollar figure from this sentence? {s}",
    "What amount of money appears in the following? {s}",
    "Identify the price: {s}",
    "Read the sentence and report the price with two decimals. {s}",
    "Which amount is mentioned here: {s}",
])
# The sentences that hold a price: some only in training, some only in the held-out set.
PRICE_SENTENCES = ([
    "The {item} costs ${p} after the discount.", "I paid ${p} for a {item} yesterday.",
    "A new {item} sells for ${p} at the market.", "Our {item} was ${p}, tax included.", "Total due: ${p}",
    "The {item} is on sale for ${p} this week.", "She bought the {item} for ${p}.",
], [
    "They want ${p} for that old {item}.", "Price of the {item}: ${p}", "Total for one {item}: ${p}",
])
_PRICE_ITEMS = ["jacket", "lamp", "ticket", "bicycle", "book", "kettle", "chair", "watch", "rug"]

UNIT_TEMPLATES = ([
    "Convert {a} {src} to {dst}.",
    "How many {dst} are in {a} {src}?",
    "{a} {src} in {dst}?",
    "What is {a} {src} expressed in {dst}?",
    "Please convert {a} {src} into {dst}.",
    "Change {a} {src} to {dst}.",
    "{a} {src} = ? {dst}",
    "I have {a} {src}. How many {dst} is that?",
    "Express {a} {src} in {dst}.",
    "Can you turn {a} {src} into {dst}?",
    "Unit conversion: {a} {src} to {dst}",
    "what's {a} {src} in {dst}",
    "Give {a} {src} in {dst}, with the unit.",
    "Convert the quantity {a} {src} to {dst}, please.",
    "How much is {a} {src} in {dst}?",
    "Rewrite {a} {src} using {dst}.",
    "From {src} to {dst}: {a} {src}",
    "{a} {src} converted to {dst} is how much?",
    "Kindly express the measurement {a} {src} in {dst}.",
    "Quick conversion: {a} {src} -> {dst}",
    "Tell me {a} {src} in {dst}.",
], [
    "If something measures {a} {src}, what is that in {dst}?",
    "Turn {a} {src} into {dst} for me.",
    "{a} {src}: how many {dst}?",
    "Please give the value of {a} {src} in {dst}.",
    "What do you get converting {a} {src} to {dst}?",
    "Work out {a} {src} in {dst}.",
    "Could you change {a} {src} to {dst}?",
    "Translate {a} {src} into {dst}.",
])

TEMPLATES: dict[str, tuple[list[str], list[str]]] = {
    "dates": DATE_TEMPLATES, "reverse": REVERSE_TEMPLATES, "prices": PRICE_TEMPLATES, "units": UNIT_TEMPLATES}


def date_text(rng: random.Random) -> tuple[str, str]:
    """(a date written in one of five styles, its ISO form)."""
    year, month = rng.randint(1950, 2049), rng.randint(1, 12)
    day = rng.randint(1, _DAYS_IN[month - 1] if month != 2 else 28)
    name = MONTHS[month - 1]
    style = rng.randrange(5)
    text = [f"{name} {day}, {year}", f"{day} {name} {year}", f"the {_ordinal(day)} of {name}, {year}",
            f"{name[:3]} {day} {year}", f"{_ordinal(day)} {name} {year}"][style]
    return text, f"{year:04d}-{month:02d}-{day:02d}"


def make_date(rng: random.Random, held_out: bool = False) -> tuple[str, str]:
    text, answer = date_text(rng)
    return rng.choice(DATE_TEMPLATES[held_out]).format(d=text), answer


def make_reverse(rng: random.Random, held_out: bool = False) -> tuple[str, str]:
    words = rng.sample(_WORDS, rng.randint(3, 6))
    return rng.choice(REVERSE_TEMPLATES[held_out]).format(w=", ".join(words)), ", ".join(reversed(words))


def make_price(rng: random.Random, held_out: bool = False) -> tuple[str, str]:
    cents = rng.randint(100, 99_999)
    value = cents / 100
    shown = f"{value:.2f}".rstrip("0").rstrip(".") if rng.random() < 0.5 else f"{value:.2f}"
    sentence = rng.choice(PRICE_SENTENCES[held_out]).format(item=rng.choice(_PRICE_ITEMS), p=shown)
    return rng.choice(PRICE_TEMPLATES[held_out]).format(s=sentence), f"{value:.2f}"


_UNITS = [("km", "m", 1000), ("m", "cm", 100), ("kg", "g", 1000), ("l", "ml", 1000), ("h", "min", 60), ("min", "s", 60)]


def make_unit(rng: random.Random, held_out: bool = False) -> tuple[str, str]:
    src, dst, factor = rng.choice(_UNITS)
    amount = rng.randint(2, 950) / (10 if rng.random() < 0.5 else 1)
    result = round(amount * factor, 6)
    return rng.choice(UNIT_TEMPLATES[held_out]).format(a=f"{amount:g}", src=src, dst=dst), f"{result:g} {dst}"


# arith: 2-3 step word problems. A problem is structured data (start value + steps) rendered by one
# of several scenes, so a test can recompute the answer without parsing the text.
# (subject, how the question names it, pronoun, possessive, items, add verbs, remove verbs, packs)
_ARITH_SCENES = [
    ("A shop", "the shop", "It", "its", "apples", ("buys", "receives"), ("sells", "throws away"), "boxes"),
    ("A library", "the library", "It", "its", "books", ("buys", "receives"), ("lends out", "gives away"), "crates"),
    ("A farmer", "the farmer", "He", "his", "eggs", ("collects", "buys"), ("sells", "breaks"), "trays"),
    ("A baker", "the baker", "She", "her", "cookies", ("bakes", "buys"), ("sells", "gives away"), "trays"),
    ("A school", "the school", "It", "its", "pencils", ("orders", "receives"), ("hands out", "loses"), "packs"),
    ("A zoo", "the zoo", "It", "its", "bananas", ("buys", "receives"), ("uses", "throws away"), "crates"),
    ("A florist", "the florist", "She", "her", "roses", ("buys", "grows"), ("sells", "throws away"), "bunches"),
    ("A cafe", "the cafe", "It", "its", "cups", ("buys", "receives"), ("breaks", "gives away"), "boxes"),
]
_ARITH_PEOPLE = [("Maria", "She", "her"), ("Tom", "He", "his"), ("Aisha", "She", "her"), ("Leo", "He", "his"),
                 ("Priya", "She", "her"), ("Sam", "He", "his"), ("Nina", "She", "her"), ("Omar", "He", "his")]
_ARITH_COLLECTIONS = [("marbles", "bags"), ("stamps", "packs"), ("stickers", "sheets"), ("cards", "packs"),
                      ("shells", "jars"), ("coins", "bags"), ("beads", "boxes"), ("buttons", "tins")]
_ARITH_MAX = 999  # every intermediate and final value stays in 0..999


def _arith_step(rng: random.Random, value: int, used_mul: bool) -> tuple | None:
    """One random step, or None when the drawn kind does not fit the current value."""
    kind = rng.choice(["add", "sub", "add_packs", "sub_packs", "mul"])
    if kind in ("add", "sub"):
        return (kind, rng.randint(2, 49)) if kind == "add" or value > 3 else None
    if kind in ("add_packs", "sub_packs"):
        return (kind, rng.randint(2, 6), rng.randint(2, 12))
    # Doubling or tripling only a two-digit amount, once: the hard part should be chaining
    # the steps, not three-digit multiplication, which a 135M model will not learn here.
    return None if used_mul or value > 99 else ("mul", rng.choice([2, 3]))


def arith_problem(rng: random.Random) -> tuple[str, int, list[tuple]]:
    """(prompt, start, steps); steps are ("add", n), ("sub", n), ("add_packs", k, m),
    ("sub_packs", k, m) meaning k packs of m, or ("mul", f) for doubles/triples."""
    if rng.random() < 0.5:
        subject, ref, pron, poss, items, adds, subs, packs = rng.choice(_ARITH_SCENES)
    else:
        (subject, pron, poss), (items, packs) = rng.choice(_ARITH_PEOPLE), rng.choice(_ARITH_COLLECTIONS)
        ref, adds, subs = subject, ("buys", "finds", "wins", "gets"), ("gives away", "loses", "trades away", "sells")
    # Mostly three-digit starts with small changes: answers spread over ~900 values (a model
    # cannot guess a common one) while each step stays small-number arithmetic.
    start = value = rng.randint(10, 60) if rng.random() < 0.3 else rng.randint(100, 950)
    steps: list[tuple] = []
    phrases: list[str] = []
    n_steps = rng.choice([2, 3])
    while len(steps) < n_steps:
        step = _arith_step(rng, value, any(s[0] == "mul" for s in steps))
        if step is None:
            continue
        new = _apply_steps(value, [step])
        if not 0 < new <= _ARITH_MAX:
            continue
        kind = step[0]
        if kind == "mul":
            text = f"{'doubles' if step[1] == 2 else 'triples'} {poss} {items}"
        elif kind in ("add", "sub"):
            text = f"{rng.choice(adds if kind == 'add' else subs)} {step[1]} {items}"
        else:
            text = f"{rng.choice(adds if kind == 'add_packs' else subs)} {step[1]} {packs} of {step[2]} {items}"
        steps.append(step)
        phrases.append(text)
        value = new
    done = ", ".join(phrases[:-1]) + " and then " + phrases[-1]
    opening = rng.choice([f"{subject} has {start} {items}.", f"{subject} starts with {start} {items}."])
    prompt = f"{opening} {pron} {done}. How many {items} does {ref} have now?"
    return prompt, start, steps


def _apply_steps(start: int, steps: list[tuple]) -> int:
    value = start
    for op, *args in steps:
        if op == "add":
            value += args[0]
        elif op == "sub":
            value -= args[0]
        elif op == "add_packs":
            value += args[0] * args[1]
        elif op == "sub_packs":
            value -= args[0] * args[1]
        else:
            value *= args[0]
    return value


def arith_working(start: int, steps: list[tuple]) -> str:
    """The worked answer: one equation per operation, then the result, e.g.
    "820 - 46 = 774, 2 * 8 = 16, 774 - 16 = 758. Answer: 758". A 135M model does not carry two or
    three operations in its head (answer-only, every method stays at 0% after 200 examples); written
    out, each step is one small operation (chain of thought, Wei et al. 2022), and exact match still
    checks every step and the result."""
    value, parts = start, []
    for op, *args in steps:
        if op in ("add_packs", "sub_packs"):
            amount = args[0] * args[1]
            parts.append(f"{args[0]} * {args[1]} = {amount}")
            op = op[:3]
        else:
            amount = args[0]
        new = _apply_steps(value, [(op, amount)])
        parts.append(f"{value} {dict(add='+', sub='-', mul='*')[op]} {amount} = {new}")
        value = new
    return ", ".join(parts) + f". Answer: {value}"


def make_arith(rng: random.Random) -> tuple[str, str]:
    # Redraw when the result's digits occur in the prompt ("17" in "has 170"), so copying a
    # number from the question never gives the result.
    while True:
        prompt, start, steps = arith_problem(rng)
        if str(_apply_steps(start, steps)) not in prompt:
            return prompt, arith_working(start, steps)


SKILLS: dict[str, Callable[..., tuple[str, str]]] = {
    "dates": make_date, "reverse": make_reverse, "prices": make_price, "units": make_unit,
    "arith": make_arith,
}


def build_split(skill: str, n_train: int = 2000, n_test: int = 100, seed: int = 1234) -> tuple[list[dict], list[dict]]:
    """Distinct prompts, the first n_test drawn for test; training never contains a test prompt.

    A skill with wording templates draws its test rows from the held-out templates and its training
    rows from the training ones, and training also skips every test answer (so no test input, e.g.
    a date, is seen in training in another wording). `arith` keeps its original single stream."""
    make = SKILLS[skill]
    rng = random.Random(f"{skill}-{seed}")
    if skill not in TEMPLATES:
        rows = _distinct_rows(skill, lambda: make(rng), n_train + n_test, set())
        return rows[n_test:], rows[:n_test]
    test = _distinct_rows(skill, lambda: make(rng, held_out=True), n_test, set())
    train = _distinct_rows(skill, lambda: make(rng), n_train, {r["messages"][1]["content"] for r in test})
    return train, test


def _distinct_rows(skill: str, draw: Callable[[], tuple[str, str]], n: int, banned_answers: set[str]) -> list[dict]:
    seen: set[str] = set()
    rows: list[dict] = []
    attempts = 0
    while len(rows) < n:
        attempts += 1
        if attempts > 50 * n:
            raise RuntimeError(f"skill '{skill}' cannot produce {n} distinct prompts")
        prompt, answer = draw()
        if prompt in seen or answer in banned_answers:
            continue
        seen.add(prompt)
        rows.append({"messages": [{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}],
                     "skill": skill})
    return rows


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
