"""Verifiable instructions: each checker on hand-written answers, the shipped split, the rewards."""
import json
from collections import Counter

import pytest

from plugtune.tasks.instructions.checkers import (BULLETS, CHECKERS, END_CHECKER, JSON_FORMAT, KEYWORD_FREQUENCY,
                                                  HIGHLIGHTS, LOWERCASE, NO_COMMA, NUMBER_WORDS, POSTSCRIPT, QUOTATION,
                                                  RELATIONS, TITLE, UPPERCASE, accuracy_by_type, canonical,
                                                  check_response, compliance_reward, count_words, strict_accuracy)
from plugtune.tasks.instructions.prompts import (TYPES, UNSEEN_TYPES, build_split, build_unseen, load_records,
                                                 split_files, split_path)
from plugtune.tasks.skills.generate import dump_jsonl


def fewer(n: int) -> dict:
    return {"relation": "less than", "num_words": n}


def at_least(n: int) -> dict:
    return {"relation": "at least", "num_words": n}


def keyword(word: str, k: int) -> dict:
    return {"keyword": word, "frequency": k, "relation": "at least"}

# (type, kwargs, response, expected)
CASES = [
    (BULLETS, {"num_bullets": 3}, "* drink early\n* carry a bottle\n* sip often", True),
    # a preamble and a closing line around the list
    (BULLETS, {"num_bullets": 3}, "Here are my tips:\n- drink early\n- carry a bottle\n- sip often\nThat's it.", True),
    (BULLETS, {"num_bullets": 3}, "  * one\n  * two\n* three  \n", True),  # indented, trailing whitespace
    (BULLETS, {"num_bullets": 3}, "* one\n* two", False),
    (BULLETS, {"num_bullets": 2}, "* one\n* two\n* three", False),
    (BULLETS, {"num_bullets": 2}, "**Tips**\n* one\n* two\n---", True),  # bold line and rule are not bullets
    (BULLETS, {"num_bullets": 2}, "1. one\n2. two", False),  # numbered lists do not count
    (BULLETS, {"num_bullets": 2}, "*one\n*two", False),  # a space must follow the marker
    (LOWERCASE, {}, "drink water every day. it helps.\n", True),
    (LOWERCASE, {}, "drink water, it is good for nasa astronauts too.", True),
    (LOWERCASE, {}, "drink water, it is good for NASA astronauts too.", False),  # acronym
    (LOWERCASE, {}, "i think Water helps.", False),
    (LOWERCASE, {}, "123 ...", False),  # no letters at all
    (UPPERCASE, {}, "DRINK WATER. IT HELPS 3 TIMES OVER!", True),
    (UPPERCASE, {}, "DRINK WATER. It HELPS.", False),
    (UPPERCASE, {}, "", False),
    (NUMBER_WORDS, fewer(5), "Drink water every day.", True),  # 4 words
    (NUMBER_WORDS, fewer(4), "Drink water every day.", False),  # 4 is not fewer than 4
    (NUMBER_WORDS, fewer(5), "Don't skip water   \n", True),  # "don't" is one word
    (NUMBER_WORDS, fewer(5), "   ", False),  # no words follows nothing
    (NUMBER_WORDS, at_least(4), "Drink water every day.", True),
    (NUMBER_WORDS, at_least(5), "Drink water every day.", False),
    (NUMBER_WORDS, at_least(5), "Well-being needs water daily.", True),  # "well-being" is two words
    (JSON_FORMAT, {"keys": ["topic", "tip"]}, '{"topic": "water", "tip": "sip often"}', True),
    (JSON_FORMAT, {"keys": ["topic", "tip"]}, '  {"topic": "water", "tip": "sip", "extra": 1}\n', True),
    (JSON_FORMAT, {"keys": ["topic", "tip"]}, '```json\n{"topic": "water", "tip": "sip often"}\n```', True),
    (JSON_FORMAT, {"keys": ["topic", "tip"]}, '```\n{"topic": "water", "tip": "sip often"}\n```', True),
    (JSON_FORMAT, {"keys": ["topic", "tip"]}, 'Sure! ```json\n{"topic": "water", "tip": "sip often"}\n```', False),
    (JSON_FORMAT, {"keys": ["topic", "tip"]}, 'Here it is: {"topic": "water", "tip": "sip often"}', False),
    (JSON_FORMAT, {"keys": ["topic", "tip"]}, '{"topic": "water"}', False),  # a key missing
    (JSON_FORMAT, {"keys": ["topic", "tip"]}, '{"topic": "water", "tip": ""}', False),  # empty value
    (JSON_FORMAT, {"keys": ["answer"]}, '["answer"]', False),  # not an object
    (JSON_FORMAT, {"keys": ["answer"]}, "{'answer': 'single quotes'}", False),  # not JSON
    (END_CHECKER, {"end_phrase": "Any other questions?"}, "Drink water. Any other questions?\n\n", True),
    (END_CHECKER, {"end_phrase": "Any other questions?"}, "drink water. any other questions?", True),  # case-insensitive
    (END_CHECKER, {"end_phrase": "Any other questions?"}, "Drink water. Any other questions? Bye.", False),
    (END_CHECKER, {"end_phrase": "Any other questions?"}, "Drink water. Any other questions", False),
    (KEYWORD_FREQUENCY, keyword("water", 3), "Water first. Then water. Then more WATER.", True),
    (KEYWORD_FREQUENCY, keyword("water", 3), "Water first. Then water. Then waters and waterfalls.", False),
    (KEYWORD_FREQUENCY, keyword("water", 2), "The water's cold; drink water.", True),
    (NO_COMMA, {}, "Drink water. Sleep well.", True),
    (NO_COMMA, {}, "Drink water, sleep well.", False),
    (NO_COMMA, {}, "\n", False),
    (TITLE, {}, "<<Why Water Matters>>\nDrink it daily.", True),
    (TITLE, {}, "Drink it daily. <<water>>", True),  # anywhere, as in IFEval
    (TITLE, {}, "<<  >> Drink it daily.", False),
    (TITLE, {}, "<<Why\nWater>> Drink it daily.", False),
    (TITLE, {}, "<Why Water> Drink it daily.", False),
]


@pytest.mark.parametrize("kind,kwargs,response,expected", CASES)
def test_checker_on_handwritten_answers(kind, kwargs, response, expected):
    assert CHECKERS[kind](response, **kwargs) is expected


def test_every_type_has_a_positive_and_a_negative_case():
    for kind in TYPES:
        assert {expected for k, _, _, expected in CASES if k == kind} == {True, False}, kind


def test_word_count_rules():
    assert count_words("Don't stop: well-being, 3 * tips <<title>>") == 7  # don't stop well being 3 tips title


def test_former_type_names_are_read_as_ifeval_ids():
    # Records and rollout buffers written before the rename keep working, with their kwargs translated.
    old = {"bullets": {"n": 3}, "lowercase": {}, "uppercase": {}, "max_words": {"n": 20}, "min_words": {"n": 25},
           "json_keys": {"keys": ["tip"]}, "ends_with": {"phrase": "That is all."}, "keyword": {"word": "tea", "count": 2},
           "no_commas": {}, "title": {}}
    new = [(BULLETS, {"num_bullets": 3}), (LOWERCASE, {}), (UPPERCASE, {}), (NUMBER_WORDS, fewer(20)),
           (NUMBER_WORDS, at_least(25)), (JSON_FORMAT, {"keys": ["tip"]}), (END_CHECKER, {"end_phrase": "That is all."}),
           (KEYWORD_FREQUENCY, keyword("tea", 2)), (NO_COMMA, {}), (TITLE, {})]
    assert [canonical({"type": t, "kwargs": kw}) for t, kw in old.items()] == [{"type": t, "kwargs": kw} for t, kw in new]
    assert canonical({"type": TITLE, "kwargs": {}}) == {"type": TITLE, "kwargs": {}}
    text = "tea and tea, that is all."
    assert check_response({"constraints": [{"type": "keyword", "kwargs": {"word": "tea", "count": 2}},
                                           {"type": "ends_with", "kwargs": {"phrase": "That is all."}},
                                           {"type": "no_commas", "kwargs": {}}]}, text) == (False, [True, True, False])


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
    by_type = accuracy_by_type(records, responses)  # former names in, IFEval ids out
    assert by_type == pytest.approx({LOWERCASE: 2 / 3, NO_COMMA: 1 / 3, TITLE: 1 / 2})
    with pytest.raises(ValueError):
        compliance_reward(records, responses[:2])


@pytest.mark.parametrize("kind,kwargs,close,far", [
    (BULLETS, {"num_bullets": 3}, "* a\n* b", "no list"),
    (LOWERCASE, {}, "mostly lowercase Text", "SHOUTING TEXT"),
    (UPPERCASE, {}, "MOSTLY UPPER text", "quiet text"),
    (NUMBER_WORDS, fewer(5), "one two three four five six", "one two three four five six seven eight nine"),
    (NUMBER_WORDS, at_least(10), "one two three four five six seven", "one"),
    (JSON_FORMAT, {"keys": ["a", "b"]}, '{"a": "x"}', "plain text"),
    (END_CHECKER, {"end_phrase": "the end"}, "the end is near", "nothing here"),
    (KEYWORD_FREQUENCY, keyword("water", 3), "water and water", "no keyword"),
    (NO_COMMA, {}, "one, two", "a, b, c, d, e, f"),
    (TITLE, {}, "<<not closed", "no title"),
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
    assert split_path("unseen").read_text(encoding="utf-8") == dump_jsonl(build_unseen())


def test_split_holds_out_topics_and_prompts():
    train, test = load_records("train"), load_records("test")
    assert len(train) == 640 and len(test) == 256
    assert not {r["topic"] for r in train} & {r["topic"] for r in test}
    assert not {r["prompt"] for r in train} & {r["prompt"] for r in test}
    assert all(r["topic"] not in t["prompt"] for r in test for t in train)
    assert len({r["id"] for r in train + test}) == len(train) + len(test)
    for split in (train, test):
        assert len({r["prompt"] for r in split}) == len(split)
        # Every type is asked for in each split, and most prompts carry one constraint.
        assert {c["type"] for r in split for c in r["constraints"]} == set(TYPES)
        assert 0.6 < sum(len(r["constraints"]) == 1 for r in split) / len(split) < 0.8
    per_type = Counter(c["type"] for r in test for c in r["constraints"])
    assert min(per_type.values()) >= 20, per_type
    words = Counter(c["kwargs"]["relation"] for r in test for c in r["constraints"] if c["type"] == NUMBER_WORDS)
    assert min(words[rel] for rel in RELATIONS) >= 10, words


def test_unseen_types_never_occur_in_training():
    train, test, unseen = load_records("train"), load_records("test"), load_records("unseen")
    assert len(UNSEEN_TYPES) >= 3 and not set(UNSEEN_TYPES) & set(TYPES)
    assert not {c["type"] for r in train for c in r["constraints"]} & set(UNSEEN_TYPES)
    assert len(unseen) >= 48 and len({r["prompt"] for r in unseen}) == len(unseen)
    per_type = Counter(c["type"] for r in unseen for c in r["constraints"])
    assert set(per_type) == set(UNSEEN_TYPES) and min(per_type.values()) >= 16, per_type
    assert all(len(r["constraints"]) == 1 for r in unseen)  # a pass is that type's pass
    # Topics held out of training too: only the kind of constraint is new, never the topic for training.
    assert not {r["topic"] for r in unseen} & {r["topic"] for r in train}
    assert not {r["id"] for r in unseen} & {r["id"] for r in train + test}


def test_records_are_rl_prompt_records():
    for r in load_records("test") + load_records("unseen"):
        assert isinstance(r["prompt"], str) and set(r) == {"prompt", "constraints", "id", "topic"}
        assert all(set(c) == {"type", "kwargs"} and c["type"] in CHECKERS for c in r["constraints"])


def _compliant_answer(record: dict) -> str:
    """A hand-built answer meeting every constraint of the record (proves it satisfiable)."""
    cs = {c["type"]: c["kwargs"] for c in record["constraints"]}
    if JSON_FORMAT in cs:
        assert len(cs) == 1, "JSON must stand alone"
        return json.dumps({k: f"a note about {record['topic']}" for k in cs[JSON_FORMAT]["keys"]})
    lines = ["Here is my answer"]
    if TITLE in cs:
        lines.insert(0, "<<A short title>>")
    if KEYWORD_FREQUENCY in cs:
        lines.append(" ".join([cs[KEYWORD_FREQUENCY]["keyword"]] * cs[KEYWORD_FREQUENCY]["frequency"]))
    if BULLETS in cs:
        lines += [f"* point {i}" for i in range(cs[BULLETS]["num_bullets"])]
    if HIGHLIGHTS in cs:
        lines += [f"*part {i}*" for i in range(cs[HIGHLIGHTS]["num_highlights"])]
    if NUMBER_WORDS in cs and cs[NUMBER_WORDS]["relation"] == "at least":
        lines.append(" ".join(["more"] * cs[NUMBER_WORDS]["num_words"]))
    if POSTSCRIPT in cs:
        lines.append(f"{cs[POSTSCRIPT]['postscript_marker']} see you")
    if END_CHECKER in cs:
        lines.append(cs[END_CHECKER]["end_phrase"])
    text = "\n".join(lines)
    if LOWERCASE in cs:
        text = text.lower()
    if UPPERCASE in cs:
        text = text.upper()
    if QUOTATION in cs:
        text = f'"{text}"'
    return text


@pytest.mark.parametrize("split", ["train", "test", "unseen"])
def test_every_shipped_prompt_is_satisfiable_and_states_its_constraints(split):
    for record in load_records(split):
        response = _compliant_answer(record)
        assert check_response(record, response) == (True, [True] * len(record["constraints"])), (record, response)
        prompt = record["prompt"]
        for c in record["constraints"]:
            kw = c["kwargs"]
            # The prompt names every parameter the checker uses.
            for value in [kw.get("num_bullets"), kw.get("num_words"), kw.get("end_phrase"), kw.get("keyword"),
                          kw.get("frequency"), kw.get("num_highlights"), kw.get("postscript_marker"),
                          *kw.get("keys", []), *kw.get("forbidden_words", [])]:
                if value is not None:
                    assert str(value) in prompt, (c, prompt)


def test_a_plain_answer_fails_the_format_constraints():
    # What an untuned model typically writes: capitalised prose with commas, no list, no title.
    plain = "Drinking water keeps you healthy, focused and energetic. Try to drink a glass with every meal."
    for kind, kwargs in [(BULLETS, {"num_bullets": 3}), (LOWERCASE, {}), (UPPERCASE, {}),
                         (JSON_FORMAT, {"keys": ["answer"]}), (END_CHECKER, {"end_phrase": "That is all."}),
                         (NO_COMMA, {}), (TITLE, {}), (NUMBER_WORDS, fewer(15)), (NUMBER_WORDS, at_least(20)),
                         (KEYWORD_FREQUENCY, keyword("water", 2))]:
        assert not CHECKERS[kind](plain, **kwargs), kind
