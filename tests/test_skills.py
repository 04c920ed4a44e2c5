"""The demo data: reproducible, answers depend on the input, no test prompt in training."""
import json

import pytest

from plugtune.data.skills import SKILLS, build_split, dump_jsonl, skill_files


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
    assert all(answer(r) not in prompt(r) for r in test) or skill == "prices"


def test_date_answers_are_correct():
    import datetime

    from plugtune.data.skills import MONTHS, make_date
    import random

    rng = random.Random(0)
    for _ in range(200):
        prompt, answer = make_date(rng)
        day = datetime.date.fromisoformat(answer)
        assert MONTHS[day.month - 1][:3] in prompt and str(day.year) in prompt and str(day.day) in prompt
