"""Verifiable instructions: each checker on hand-written answers, the shipped split, the rewards."""
import json

import pytest

from plugtune.tasks.instructions.checkers import (CHECKERS, accuracy_by_type, check_response, compliance_reward,
                                                  count_words, strict_accuracy)
from plugtune.tasks.instructions.prompts import TYPES, build_split, load_records, split_files
from plugtune.tasks.skills.generate import dump_jsonl

# (type, kwargs, response, expected)
CASES = [
    ("bullets", {"n": 3}, "* drink early\n* carry a bottle\n* sip often", True),
    # a preamble and a closing line around the list
    ("bullets", {"n": 3}, "Here are my tips:\n- drink early\n- carry a bottle\n- sip often\nThat's it.", True),
    ("bullets", {"n": 3}, "  * one\n  * two\n* three  \n", True),  # indented, trailing whitespace
    ("bullets", {"n": 3}, "* one\n* two", False),
    ("bullets", {"n": 2}, "* one\n* two\n* three", False),
    ("bullets", {"n": 2}, "**Tips**\n* one\n* two\n---", True),  # bold line and rule are not bullets
    ("bullets", {"n": 2}, "1. one\n2. two", False),  # numbered lists do not count
    ("bullets", {"n": 2}, "*one\n*two", False),  # a space must follow the marker
    ("lowercase", {}, "drink water every day. it helps.\n", True),
    ("lowercase", {}, "drink water, it is good for nasa astronauts too.", True),
    ("lowercase", {}, "drink water, it is good for NASA astronauts too.", False),  # acronym
    ("lowercase", {}, "i think Water helps.", False),
    ("lowercase", {}, "123 ...", False),  # no letters at all
    ("uppercase", {}, "DRINK WATER. IT HELPS 3 TIMES OVER!", True),
    ("uppercase", {}, "DRINK WATER. It HELPS.", False),
    ("uppercase", {}, "", False),
    ("max_words", {"n": 5}, "Drink water every day.", True),  # 4 words
    ("max_words", {"n": 4}, "Drink water every day.", False),  # 4 is not fewer than 4
    ("max_words", {"n": 5}, "Don't skip water   \n", True),  # "don't" is one word
    ("max_words", {"n": 5}, "   ", False),  # no words follows nothing
    ("min_words", {"n": 4}, "Drink water every day.", True),
    ("min_words", {"n": 5}, "Drink water every day.", False),
    ("min_words", {"n": 5}, "Well-being needs water daily.", True),  # "well-being" is two words
    ("json_keys", {"keys": ["topic", "tip"]}, '{"topic": "water", "tip": "sip often"}', True),
    ("json_keys", {"keys": ["topic", "tip"]}, '  {"topic": "water", "tip": "sip", "extra": 1}\n', True),
    ("json_keys", {"keys": ["topic", "tip"]}, '```json\n{"topic": "water", "tip": "sip often"}\n```', True),
    ("json_keys", {"keys": ["topic", "tip"]}, '```\n{"topic": "water", "tip": "sip often"}\n```', True),
    ("json_keys", {"keys": ["topic", "tip"]}, 'Sure! ```json\n{"topic": "water", "tip": "sip often"}\n```', False),
    ("json_keys", {"keys": ["topic", "tip"]}, 'Here it is: {"topic": "water", "tip": "sip often"}', False),
    ("json_keys", {"keys": ["topic", "tip"]}, '{"topic": "water"}', False),  # a key missing
    ("json_keys", {"keys": ["topic", "tip"]}, '{"topic": "water", "tip": ""}', False),  # empty value
    ("json_keys", {"keys": ["answer"]}, '["answer"]', False),  # not an object
    ("json_keys", {"keys": ["answer"]}, "{'answer': 'single quotes'}", False),  # not JSON
    ("ends_with", {"phrase": "Any other questions?"}, "Drink water. Any other questions?\n\n", True),
    ("ends_with", {"phrase": "Any other questions?"}, "drink water. any other questions?", True),  # case-insensitive
    ("ends_with", {"phrase": "Any other questions?"}, "Drink water. Any other questions? Bye.", False),
    ("ends_with", {"phrase": "Any other questions?"}, "Drink water. Any other questions", False),
    ("keyword", {"word": "water", "count": 3}, "Water first. Then water. Then more WATER.", True),
    ("keyword", {"word": "water", "count": 3}, "Water first. Then water. Then waters and waterfalls.", False),
    ("keyword", {"word": "water", "count": 2}, "The water's cold; drink water.", True),
    ("no_commas", {}, "Drink water. Sleep well.", True),
    ("no_commas", {}, "Drink water, sleep well.", False),
    ("no_commas", {}, "\n", False),
    ("title", {}, "<<Why Water Matters>>\nDrink it daily.", True),
    ("title", {}, "Drink it daily. <<water>>", True),  # anywhere, as in IFEval
    ("title", {}, "<<  >> Drink it daily.", False),
    ("title", {}, "<<Why\nWater>> Drink it daily.", False),
    ("title", {}, "<Why Water> Drink it daily.", False),
]


@pytest.mark.parametrize("kind,kwargs,response,expected", CASES)
def test_checker_on_handwritten_answers(kind, kwargs, response, expected):
    assert CHECKERS[kind](response, **kwargs) is expected


def test_every_type_has_a_positive_and_a_negative_case():
    for kind in TYPES:
        assert {expected for k, _, _, expected in CASES if k == kind} == {True, False}, kind


def test_word_count_rules():
    assert count_words("Don't stop: well-being, 3 * tips <<title>>") == 7  # don't stop well being 3 tips title


def test_check_response_takes_a_record_or_its_constraints():
    constraints = [{"type": "lowercase", "kwargs": {}}, {"type": "max_words", "kwargs": {"n": 5}}]
    record = {"prompt": "p", "constraints": constraints, "id": "x", "topic": "t"}
    assert check_response(record, "drink water daily") == (True, [True, True])
    assert check_response(constraints, "Drink water daily") == (False, [False, True])
    assert check_response(record, "drink water daily and then drink more") == (False, [True, False])
    with pytest.raises(KeyError, match="unknown constraint type 'haiku'"):
        check_response([{"type": "haiku", "kwargs": {}}], "x")
    with pytest.raises(ValueError, match="no constraints"):
        check_response({"prompt": "p", "constraints": []}, "x")


def test_rewards_and_accuracies():
    two = {"constraints": [{"type": "lowercase", "kwargs": {}}, {"type": "no_commas", "kwargs": {}}]}
    one = {"constraints": [{"type": "title", "kwargs": {}}]}
    records = [two, two, two, one, one]
    responses = ["all good here", "all good, here", "All good, here", "<<t>> x", "no title"]
    assert compliance_reward(records, responses, graded=False) == [1.0, 0.25, 0.0, 1.0, 0.0]
    # graded: "all good, here" holds lowercase (1) and has 1 comma (0.9 x 4/5); "All good, here": 10 of 11
    # letters lowercase (0.9 x 10/11) and the comma; "no title": no "<<" (0)
    assert compliance_reward(records, responses) == pytest.approx(
        [1.0, 0.5 * (1 + 0.9 * 0.8) / 2, 0.5 * (0.9 * 10 / 11 + 0.9 * 0.8) / 2, 1.0, 0.0])
    assert strict_accuracy(records, responses) == pytest.approx(2 / 5)
    by_type = accuracy_by_type(records, responses)
    assert by_type == pytest.approx({"lowercase": 2 / 3, "no_commas": 1 / 3, "title": 1 / 2})
    with pytest.raises(ValueError):
        compliance_reward(records, responses[:2])


@pytest.mark.parametrize("kind,kwargs,close,far", [
    ("bullets", {"n": 3}, "* a\n* b", "no list"),
    ("lowercase", {}, "mostly lowercase Text", "SHOUTING TEXT"),
    ("uppercase", {}, "MOSTLY UPPER text", "quiet text"),
    ("max_words", {"n": 5}, "one two three four five six", "one two three four five six seven eight nine"),
    ("min_words", {"n": 10}, "one two three four five six seven", "one"),
    ("json_keys", {"keys": ["a", "b"]}, '{"a": "x"}', "plain text"),
    ("ends_with", {"phrase": "the end"}, "the end is near", "nothing here"),
    ("keyword", {"word": "water", "count": 3}, "water and water", "no keyword"),
    ("no_commas", {}, "one, two", "a, b, c, d, e, f"),
    ("title", {}, "<<not closed", "no title"),
])
def test_partial_credit_orders_failing_answers(kind, kwargs, close, far):
    record = {"constraints": [{"type": kind, "kwargs": kwargs}]}
    assert not check_response(record, close)[0] and not check_response(record, far)[0]
    near, away = compliance_reward([record, record], [close, far])
    assert 0.45 >= near > away >= 0.0  # below 0.5: any compliant answer (1.0) beats it


def test_shipped_files_are_the_generator_output():
    train, test = build_split()
    train_file, test_file = split_files()
    assert train_file.read_text(encoding="utf-8") == dump_jsonl(train)
    assert test_file.read_text(encoding="utf-8") == dump_jsonl(test)


def test_split_holds_out_topics_and_prompts():
    train, test = load_records("train"), load_records("test")
    assert len(train) == 640 and len(test) == 128
    assert not {r["topic"] for r in train} & {r["topic"] for r in test}
    assert not {r["prompt"] for r in train} & {r["prompt"] for r in test}
    assert all(r["topic"] not in t["prompt"] for r in test for t in train)
    assert len({r["id"] for r in train + test}) == len(train) + len(test)
    for split in (train, test):
        assert len({r["prompt"] for r in split}) == len(split)
        # Every type is asked for in each split, and most prompts carry one constraint.
        assert {c["type"] for r in split for c in r["constraints"]} == set(TYPES)
        assert 0.6 < sum(len(r["constraints"]) == 1 for r in split) / len(split) < 0.8


def test_records_are_rl_prompt_records():
    for r in load_records("test"):
        assert isinstance(r["prompt"], str) and set(r) == {"prompt", "constraints", "id", "topic"}
        assert all(set(c) == {"type", "kwargs"} and c["type"] in CHECKERS for c in r["constraints"])


def _compliant_answer(record: dict) -> str:
    """A hand-built answer meeting every constraint of the record (proves it satisfiable)."""
    cs = {c["type"]: c["kwargs"] for c in record["constraints"]}
    if "json_keys" in cs:
        assert len(cs) == 1, "JSON must stand alone"
        return json.dumps({k: f"a note about {record['topic']}" for k in cs["json_keys"]["keys"]})
    lines = ["Here is my answer"]
    if "title" in cs:
        lines.insert(0, "<<A short title>>")
    if "keyword" in cs:
        lines.append(" ".join([cs["keyword"]["word"]] * cs["keyword"]["count"]))
    if "bullets" in cs:
        lines += [f"* point {i}" for i in range(cs["bullets"]["n"])]
    if "min_words" in cs:
        lines.append(" ".join(["more"] * cs["min_words"]["n"]))
    if "ends_with" in cs:
        lines.append(cs["ends_with"]["phrase"])
    text = "\n".join(lines)
    if "lowercase" in cs:
        text = text.lower()
    if "uppercase" in cs:
        text = text.upper()
    return text


@pytest.mark.parametrize("split", ["train", "test"])
def test_every_shipped_prompt_is_satisfiable_and_states_its_constraints(split):
    for record in load_records(split):
        response = _compliant_answer(record)
        assert check_response(record, response) == (True, [True] * len(record["constraints"])), (record, response)
        prompt = record["prompt"]
        for c in record["constraints"]:
            kw = c["kwargs"]
            # The prompt names every parameter the checker uses.
            for value in [kw.get("n"), kw.get("phrase"), kw.get("word"), kw.get("count"), *kw.get("keys", [])]:
                if value is not None:
                    assert str(value) in prompt, (c, prompt)


def test_a_plain_answer_fails_the_format_constraints():
    # What an untuned model typically writes: capitalised prose with commas, no list, no title.
    plain = "Drinking water keeps you healthy, focused and energetic. Try to drink a glass with every meal."
    for kind, kwargs in [("bullets", {"n": 3}), ("lowercase", {}), ("uppercase", {}),
                         ("json_keys", {"keys": ["answer"]}), ("ends_with", {"phrase": "That is all."}),
                         ("no_commas", {}), ("title", {}), ("max_words", {"n": 15}), ("min_words", {"n": 20}),
                         ("keyword", {"word": "water", "count": 2})]:
        assert not CHECKERS[kind](plain, **kwargs), kind
