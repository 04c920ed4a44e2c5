"""The demo data: reproducible, answers depend on the input, no test prompt in training."""
import json
import re

import pytest

from plugtune.tasks.skills.confusable import (CONFUSABLE_TEMPLATES, build_confusable, chat_prompts, confusable_file,
                                              confusable_prompts)
from plugtune.tasks.skills.generate import SKILLS, TEMPLATES, build_split, dump_jsonl, skill_files


@pytest.mark.parametrize("skill", list(SKILLS))
def test_shipped_files_are_the_generator_output(skill):
    train, test = build_split(skill)
    train_file, test_file = skill_files(skill)
    assert train_file.read_text() == dump_jsonl(train)
    assert test_file.read_text() == dump_jsonl(test)


@pytest.mark.parametrize("skill", list(SKILLS))
def test_split_is_clean_and_answers_vary(skill):
    train_file, test_file = skill_files(skill)
    train = [json.loads(l) for l in train_file.read_text().splitlines()]
    test = [json.loads(l) for l in test_file.read_text().splitlines()]
    prompt = lambda r: r["messages"][0]["content"]
    answer = lambda r: r["messages"][1]["content"]
    assert len(test) == 100 and len(train) == 2000
    assert not {prompt(r) for r in test} & {prompt(r) for r in train}
    assert len({answer(r) for r in test}) >= 90  # not a constant the model could echo
    if skill == "prices":  # the answer is the price in the prompt, always with two decimals
        shown = [re.search(r"\$(\d+(?:\.\d+)?)", prompt(r)).group(1) for r in test]
        assert [answer(r) for r in test] == [f"{float(p):.2f}" for p in shown]
        assert sum(p != answer(r) for p, r in zip(shown, test)) > 0  # some are not a copy: "12.5" -> "12.50"
    else:
        assert all(answer(r) not in prompt(r) for r in test)


_FIELDS = {"a": r"\d+(?:\.\d+)?", "src": "[a-z]+", "dst": "[a-z]+", "unit": "[a-z]+", "w": "[a-z]+(?:, [a-z]+)*",
           "d": "[A-Za-z0-9 ,]+", "date": "[A-Za-z0-9 ,]+", "year": r"\d{4}", "month": "[A-Z][a-z]+", "item": "[a-z]+",
           "p": r"\d+(?:\.\d+)?", "city": "[A-Z][a-z]+", "city2": "[A-Z][a-z]+", "event": "[A-Za-z' ]+", "s": ".+"}


def _template_of(prompt: str, templates: list[str]) -> list[str]:
    """The templates that could have produced `prompt` (each placeholder matched by its kind of text)."""
    def pattern(t):
        parts = re.split(r"\{(\w+)\}", t)  # text, field, text, field, ...
        return "".join(re.escape(x) if i % 2 == 0 else f"(?:{_FIELDS[x]})" for i, x in enumerate(parts))
    return [t for t in templates if re.fullmatch(pattern(t), prompt, re.S)]


@pytest.mark.parametrize("skill", list(TEMPLATES))
def test_wording_templates_are_many_and_the_splits_never_share_one(skill):
    train_templates, held_out = TEMPLATES[skill]
    assert len(train_templates) >= 20 and len(held_out) >= 8
    assert not set(train_templates) & set(held_out)
    train_file, test_file = skill_files(skill)
    rows = {f: [json.loads(l)["messages"][0]["content"] for l in f.read_text().splitlines()] for f in (train_file, test_file)}
    # Every prompt comes from a template of its own split only, and every template is used.
    used = {}
    for f, own, other in ((train_file, train_templates, held_out), (test_file, held_out, train_templates)):
        used[f] = set()
        for prompt in rows[f]:
            mine = _template_of(prompt, own)
            assert mine and not _template_of(prompt, other), (skill, prompt)
            used[f].update(mine)
    assert used[train_file] == set(train_templates) and used[test_file] == set(held_out)
    # No test input in training under another wording: no test answer is a training answer.
    answers = {f: {json.loads(l)["messages"][1]["content"] for l in f.read_text().splitlines()}
               for f in (train_file, test_file)}
    assert not answers[train_file] & answers[test_file]


def test_arith_keeps_its_one_fixed_wording():
    assert "arith" not in TEMPLATES  # plugtune compare arith's measured figures depend on its exact files


def test_confusable_files_are_the_generator_output_with_disjoint_templates():
    train, test = build_confusable()
    assert confusable_file("train").read_text() == dump_jsonl(train)
    assert confusable_file("test").read_text() == dump_jsonl(test)
    train_t, held_t = CONFUSABLE_TEMPLATES
    assert not set(train_t) & set(held_t)
    for prompts, own, other in ((confusable_prompts("train"), train_t, held_t), (confusable_prompts("test"), held_t, train_t)):
        for prompt in prompts:
            assert _template_of(prompt, own) and not _template_of(prompt, other), prompt
    assert len(confusable_prompts("train")) == 300 and len(confusable_prompts("test")) == 150


def test_chat_parts_are_disjoint_and_cover_the_corpus():
    parts = [chat_prompts(p) for p in ("fit", "calibrate", "measure")]
    assert all(len(p) > 200 for p in parts)
    assert sum(len(p) for p in parts) == len(set().union(*map(set, parts)))
    with pytest.raises(ValueError, match="part must be one of"):
        chat_prompts("test")


def test_date_answers_are_correct():
    import datetime

    from plugtune.tasks.skills.generate import MONTHS, make_date
    import random

    def ordinal(n):
        return f"{n}{'th' if n in (11, 12, 13) else {1: 'st', 2: 'nd', 3: 'rd'}.get(n % 10, 'th')}"

    rng = random.Random(0)
    for _ in range(200):
        prompt, answer = make_date(rng)
        day = datetime.date.fromisoformat(answer)
        d, y, name = day.day, day.year, MONTHS[day.month - 1]
        # The whole date text, in one of the five styles the prompt may use: day, month and year each
        # in their own place (a bare `str(day) in prompt` would also match digits of the year).
        styles = {f"{name} {d}, {y}", f"{d} {name} {y}", f"the {ordinal(d)} of {name}, {y}", f"{name[:3]} {d} {y}",
                  f"{ordinal(d)} {name} {y}"}
        # The date text sits inside a wording template: it must be one of the styles, not part of a
        # longer number ("5 May 2020" inside "15 May 2020").
        assert any(re.search(rf"(?<![\w]){re.escape(style)}(?![\d])", prompt) for style in styles), prompt


def _recompute_arith(start, steps):
    # Written out again, independently of skills._apply_steps: what each structured step means.
    value = start
    for op, *args in steps:
        if op == "add":
            value = value + args[0]
        elif op == "sub":
            value = value - args[0]
        elif op == "add_packs":
            value = value + args[0] * args[1]
        elif op == "sub_packs":
            value = value - args[0] * args[1]
        elif op == "mul":
            value = value * args[0]
        else:
            raise AssertionError(op)
        assert 0 < value <= 999
    return value


def test_arith_shipped_answers_are_recomputed_from_the_structured_problems():
    import random

    from plugtune.tasks.skills.generate import arith_problem

    # build_split draws every problem with arith_problem from one seeded rng (make_arith only
    # renders it and redraws some): replaying that rng gives the structure behind each shipped row.
    train_file, test_file = skill_files("arith")
    rows = [json.loads(l) for f in (test_file, train_file) for l in f.read_text().splitlines()]  # generation order
    rng = random.Random("arith-1234")
    for row in rows:
        prompt, answer = row["messages"][0]["content"], row["messages"][1]["content"]
        for _ in range(100):
            s_prompt, start, steps = arith_problem(rng)
            if s_prompt == prompt:
                break
        else:
            raise AssertionError(f"replay lost track at {prompt!r}")
        result = _recompute_arith(start, steps)
        working, final = answer.split(". Answer: ")
        assert final == str(result)
        assert 2 <= len(steps) <= 3 and sum(s[0] == "mul" for s in steps) <= 1
        assert f" {start} " in prompt and final not in prompt
        # the working: every equation true, one per operation, chained from the start to the result
        equations = iter(e.split(" ") for e in working.split(", "))
        value = start
        for op, *args in steps:
            if op.endswith("_packs"):
                assert next(equations) == [str(args[0]), "*", str(args[1]), "=", str(args[0] * args[1])]
                args = [args[0] * args[1]]
            x, sign, y, eq, z = next(equations)
            assert (x, sign, y, eq) == (str(value), {"add": "+", "sub": "-", "mul": "*"}[op[:3]], str(args[0]), "=")
            value = {"+": value + args[0], "-": value - args[0], "*": value * args[0]}[sign]
            assert z == str(value)
        assert next(equations, None) is None and value == result
        for step in steps:
            if step[0] == "mul":
                assert {2: "doubles", 3: "triples"}[step[1]] in prompt
            elif step[0].endswith("_packs"):
                assert f" {step[1]} " in prompt and f" of {step[2]} " in prompt, (step, prompt)
            else:
                assert f" {step[1]} " in prompt, (step, prompt)


def test_arith_shipped_split():
    train_file, test_file = skill_files("arith")
    train = [json.loads(l) for l in train_file.read_text().splitlines()]
    test = [json.loads(l) for l in test_file.read_text().splitlines()]
    assert len(train) == 2000 and len(test) == 100
    prompts = lambda rows: [r["messages"][0]["content"] for r in rows]
    assert not set(prompts(train)) & set(prompts(test))
    assert len(set(prompts(train) + prompts(test))) == 2100
    for row in train + test:
        final = row["messages"][1]["content"].rsplit(". Answer: ", 1)[1]
        assert final.isdigit() and 0 < int(final) <= 999 and row["skill"] == "arith"
    # Short prompts: at most 55 SmolLM2 tokens when generated (37 words); a word bound guards it here.
    assert max(len(p.split()) for p in prompts(train + test)) <= 38
