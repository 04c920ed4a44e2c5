"""Instruction-following evaluation: every checker strict and loose on hand-written answers, IFEval's four
scores, the paired bootstrap, programmatic repair, and `evaluate_instructions` / `plugtune eval --instructions`."""
import json

import pytest

from plugtune.tasks.instructions.checkers import (BULLETS, CHECKERS, END_CHECKER, FORBIDDEN_WORDS, HIGHLIGHTS,
                                                  JSON_FORMAT, KEYWORD_FREQUENCY, LOWERCASE, NO_COMMA, NUMBER_WORDS,
                                                  POSTSCRIPT, QUOTATION, TITLE, UPPERCASE, check_response,
                                                  compliance_reward, count_words, response_variants)
from plugtune.tasks.instructions.prompts import TYPES, UNSEEN_TYPES, load_records
from plugtune.tasks.instructions.repair import repair
from plugtune.tasks.instructions.scores import ifeval_scores, paired_bootstrap

FEWER = {"relation": "less than", "num_words": 5}
AT_LEAST = {"relation": "at least", "num_words": 5}
WATER_3 = {"keyword": "water", "frequency": 3, "relation": "at least"}
WATER_FEWER_2 = {"keyword": "water", "frequency": 2, "relation": "less than"}
ENDING = {"end_phrase": "That is all."}

# (type, kwargs, response, strict, loose)
CASES = [
    (BULLETS, {"num_bullets": 3}, "* drink early\n* carry a bottle\n* sip often", True, True),
    (BULLETS, {"num_bullets": 3}, "* one\n* two", False, False),
    # a closing line that looks like a bullet: strict 4, without the last line 3
    (BULLETS, {"num_bullets": 3}, "* drink early\n* carry a bottle\n* sip often\n- hope this helps", False, True),
    (LOWERCASE, {}, "drink water every day.", True, True),
    (LOWERCASE, {}, "Sure! Here is my answer:\ndrink water every day.", False, True),  # a preamble line
    (LOWERCASE, {}, "Drink water.\nEvery Day.", False, False),
    (UPPERCASE, {}, "DRINK WATER EVERY DAY.", True, True),
    (UPPERCASE, {}, "Here you go:\nDRINK WATER EVERY DAY.", False, True),
    (UPPERCASE, {}, "DRINK water.\nEVERY day.", False, False),
    (NUMBER_WORDS, FEWER, "Drink water daily.", True, True),
    (NUMBER_WORDS, FEWER, "Here is a short answer for you:\nDrink water daily.", False, True),
    (NUMBER_WORDS, FEWER, "Drink water daily and sleep well.", False, False),
    (NUMBER_WORDS, AT_LEAST, "Drink a glass of water daily.", True, True),
    (NUMBER_WORDS, AT_LEAST, "Drink water daily.", False, False),  # removing lines never adds words
    (NUMBER_WORDS, FEWER, "  \n ", False, False),  # blank: no words, no non-blank variant
    (JSON_FORMAT, {"keys": ["tip"]}, '{"tip": "sip often"}', True, True),
    (JSON_FORMAT, {"keys": ["tip"]}, 'Here it is:\n{"tip": "sip often"}', False, True),
    (JSON_FORMAT, {"keys": ["tip"]}, '{"tip": ""}', False, False),
    (JSON_FORMAT, {}, '["any", "json"]', True, True),  # without keys: any JSON, as IFEval
    (JSON_FORMAT, {}, "not json", False, False),
    (END_CHECKER, ENDING, "Drink water. That is all.", True, True),
    (END_CHECKER, ENDING, '"Drink water. That is all."', True, True),  # IFEval strips surrounding quotes
    (END_CHECKER, ENDING, "Drink water. That is all.\n(Hope it helps.)", False, True),
    (END_CHECKER, ENDING, "That is all. Drink water.", False, False),
    (KEYWORD_FREQUENCY, WATER_3, "Water first. Then **water**. Then more water.", True, True),
    (KEYWORD_FREQUENCY, WATER_3, "Water first.\nThen waters and waterfalls.", False, False),
    (KEYWORD_FREQUENCY, WATER_FEWER_2, "Drink water.", True, True),
    (KEYWORD_FREQUENCY, WATER_FEWER_2, "Water facts:\nDrink water.", False, True),
    (KEYWORD_FREQUENCY, WATER_FEWER_2, "Drink water. Water helps.", False, False),
    (NO_COMMA, {}, "Drink water. Sleep well.", True, True),
    (NO_COMMA, {}, "Sure, here you go:\nDrink water. Sleep well.", False, True),
    (NO_COMMA, {}, "Drink water, sleep well.", False, False),
    (TITLE, {}, "<<Why Water>>\nDrink it daily.", True, True),
    (TITLE, {}, "Why Water\nDrink it daily.", False, False),
    # held-out types
    (POSTSCRIPT, {"postscript_marker": "P.S."}, "Drink water.\nP.S. Bring a bottle.", True, True),
    (POSTSCRIPT, {"postscript_marker": "P.S."}, "Drink water.\np. s. bring a bottle.", True, True),
    (POSTSCRIPT, {"postscript_marker": "P.S."}, "Drink water.\n**P.S.** Bring a bottle.", False, True),  # bold
    (POSTSCRIPT, {"postscript_marker": "P.S."}, "Drink water. PS bring a bottle.", False, False),
    (QUOTATION, {}, '"Drink water daily."\n', True, True),
    (QUOTATION, {}, 'Here is my answer:\n"Drink water daily."', False, True),
    (QUOTATION, {}, '"Drink water daily.', False, False),
    (QUOTATION, {}, '"', False, False),
    (FORBIDDEN_WORDS, {"forbidden_words": ["very", "good"]}, "Drink water. It is goodness itself.", True, True),
    (FORBIDDEN_WORDS, {"forbidden_words": ["very", "good"]}, "Very well:\nDrink water daily.", False, True),
    (FORBIDDEN_WORDS, {"forbidden_words": ["very", "good"]}, "Water.\nIt is GOOD for you.\nBye.", False, False),
    (HIGHLIGHTS, {"num_highlights": 2}, "Drink *water* and **sleep** well.", True, True),
    (HIGHLIGHTS, {"num_highlights": 2}, "* a bullet\n* another\n*  * and * *", False, False),  # bullets, blank
    (HIGHLIGHTS, {"num_highlights": 2}, "Drink *water\nand* sleep.", False, False),  # a span stays on one line
]


@pytest.mark.parametrize("kind,kwargs,response,strict,loose", CASES)
def test_checker_strict_and_loose(kind, kwargs, response, strict, loose):
    record = {"constraints": [{"type": kind, "kwargs": kwargs}]}
    assert check_response(record, response) == (strict, [strict])
    assert check_response(record, response, loose=True) == (loose, [loose])


def test_every_checker_has_strict_and_loose_cases():
    assert set(CHECKERS) == set(TYPES) | set(UNSEEN_TYPES)
    for kind in CHECKERS:
        rows = [(s, lo) for k, _, _, s, lo in CASES if k == kind]
        assert {s for s, _ in rows} == {True, False} and {lo for _, lo in rows} == {True, False}, kind
        # where removing a line or the asterisks can rescue an answer, a case shows it
        assert any(lo and not s for s, lo in rows) or kind in (TITLE, HIGHLIGHTS), kind
        assert all(lo for s, lo in rows if s), kind  # loose never fails what strict passes


def test_loose_variants_are_ifevals_eight():
    assert response_variants("<<T>>\n**body**\nbye") == ["<<T>>\n**body**\nbye", "**body**\nbye", "<<T>>\n**body**",
                                                        "**body**", "<<T>>\nbody\nbye", "body\nbye", "<<T>>\nbody",
                                                        "body"]


def test_new_types_have_partial_credit_below_a_pass():
    for kind, kwargs, close, far in [
            (POSTSCRIPT, {"postscript_marker": "P.S."}, "Drink water, p.s. bring a bottle", "Drink water."),
            (QUOTATION, {}, '"Drink water.', "Drink water."),
            (FORBIDDEN_WORDS, {"forbidden_words": ["very", "good"]}, "Very nice.", "Very good."),
            (HIGHLIGHTS, {"num_highlights": 3}, "*one* and *two*", "none")]:
        record = {"constraints": [{"type": kind, "kwargs": kwargs}]}
        near, away = compliance_reward([record, record], [close, far])
        assert 0.45 >= near > away >= 0.0, kind


# ---- scores ----

def test_ifeval_scores_by_hand():
    records = [{"constraints": [{"type": LOWERCASE, "kwargs": {}}, {"type": NO_COMMA, "kwargs": {}}]},
               {"constraints": [{"type": "title", "kwargs": {}}]},  # a former name counts under its IFEval id
               {"constraints": [{"type": BULLETS, "kwargs": {"num_bullets": 2}}]}]
    # 1: fails both strictly, passes both without its first line; 2: passes; 3: fails both ways
    responses = ["Sure, here:\nall good here", "<<t>> x", "no list"]
    s = ifeval_scores(records, responses)
    assert (s["prompt_strict"], s["prompt_loose"]) == pytest.approx((1 / 3, 2 / 3))
    assert (s["instruction_strict"], s["instruction_loose"]) == pytest.approx((1 / 4, 3 / 4))
    assert s["by_type"] == {BULLETS: {"strict": 0.0, "loose": 0.0, "n": 1},
                            LOWERCASE: {"strict": 0.0, "loose": 1.0, "n": 1},
                            NO_COMMA: {"strict": 0.0, "loose": 1.0, "n": 1},
                            TITLE: {"strict": 1.0, "loose": 1.0, "n": 1}}
    assert s["n_prompts"] == 3
    assert s["passed_strict"] == [False, True, False] and s["passed_loose"] == [True, True, False]
    with pytest.raises(ValueError):
        ifeval_scores(records, responses[:2])


def test_instruction_level_weighs_constraints_not_prompts():
    two = {"constraints": [{"type": LOWERCASE, "kwargs": {}}, {"type": TITLE, "kwargs": {}}]}
    one = {"constraints": [{"type": UPPERCASE, "kwargs": {}}]}
    s = ifeval_scores([two, one], ["<<t>> all lower", "not upper"])
    assert s["prompt_strict"] == 0.5 and s["instruction_strict"] == pytest.approx(2 / 3)
    assert s["by_type"][UPPERCASE] == {"strict": 0.0, "loose": 0.0, "n": 1}


def test_paired_bootstrap_identical_and_all_flipped():
    same = [True, False, True, True, False] * 20
    assert paired_bootstrap(same, same) == {"gain": 0.0, "low": 0.0, "high": 0.0, "n": 100}
    assert paired_bootstrap([False] * 30, [True] * 30) == {"gain": 100.0, "low": 100.0, "high": 100.0, "n": 30}


def test_paired_bootstrap_interval_follows_the_binomial():
    # 10 of 100 prompts go from fail to pass, none the other way: each resample's gain is 100/100 x
    # Binomial(100, 0.1), whose 2.5% and 97.5% quantiles are 4 and 16. Unpaired, the same 50% -> 60%
    # would give an interval of about +-14 points around 10 and include 0; paired, it excludes 0.
    before = [True] * 50 + [False] * 50
    after = [True] * 60 + [False] * 40
    r = paired_bootstrap(before, after, samples=4000)
    assert r["gain"] == pytest.approx(10.0) and r["n"] == 100
    assert 3.0 <= r["low"] <= 5.0 and 15.0 <= r["high"] <= 17.0
    # 10 up, 10 down: no gain; interval about +-1.96 x sqrt(20) = +-8.8 points
    mixed = [False] * 10 + [True] * 10 + [True] * 80
    swapped = [True] * 10 + [False] * 10 + [True] * 80
    r = paired_bootstrap(mixed, swapped, samples=4000)
    assert r["gain"] == 0.0 and -11.0 <= r["low"] <= -7.0 and 7.0 <= r["high"] <= 11.0
    assert paired_bootstrap(mixed, swapped, samples=500, seed=3) == paired_bootstrap(mixed, swapped, samples=500, seed=3)
    with pytest.raises(ValueError, match="pair the same prompts"):
        paired_bootstrap([True], [True, False])


# ---- repair ----

ANSWER = ("Drinking water keeps you healthy, focused and energetic. It helps your body control its temperature. "
          "Carry a bottle with you during the day. Many people forget to drink when they are busy.")


def _record(*constraints, topic="drinking water"):
    return {"prompt": "p", "constraints": [{"type": t, "kwargs": kw} for t, kw in constraints], "topic": topic}


def _repaired(*constraints, answer=ANSWER):
    record = _record(*constraints)
    fixed = repair(record, answer)
    assert fixed is not None and check_response(record, fixed)[0], fixed
    return fixed


def test_repair_whole_text_edits_keep_the_answer():
    assert _repaired((LOWERCASE, {})) == ANSWER.lower()
    assert _repaired((UPPERCASE, {})) == ANSWER.upper()
    assert _repaired((END_CHECKER, {"end_phrase": "Any other questions?"})) == ANSWER + " Any other questions?"
    assert _repaired((TITLE, {})) == "<<Drinking Water>>\n" + ANSWER
    no_commas = _repaired((NO_COMMA, {}))
    assert no_commas == ANSWER.replace(",", "") and count_words(no_commas) == count_words(ANSWER)
    # an unfinished last sentence (generation hit its token limit) is dropped
    assert _repaired((LOWERCASE, {}), answer="Drink water daily. It helps. Also try to") == "drink water daily. it helps."
    # a layout survives: the bullets stay bullets
    assert _repaired((TITLE, {}), answer="* Drink early.\n* Sip often.") == "<<Drinking Water>>\n* Drink early.\n* Sip often."


def test_repair_restructures_the_answer():
    sentences = ["Drinking water keeps you healthy, focused and energetic.", "It helps your body control its temperature.",
                 "Carry a bottle with you during the day.", "Many people forget to drink when they are busy."]
    three = _repaired((BULLETS, {"num_bullets": 3}))
    assert three == f"* {sentences[0]} {sentences[1]}\n* {sentences[2]}\n* {sentences[3]}"
    six = _repaired((BULLETS, {"num_bullets": 6})).splitlines()  # sentences split at commas / conjunctions
    assert len(six) == 6 and six[0] == "* Drinking water keeps you healthy."
    listed = "Here are some tips:\n* Drink early\n* Sip often\n* Carry a bottle"  # the lead-in goes, every item stays
    assert _repaired((BULLETS, {"num_bullets": 2}), answer=listed) == "* Drink early. Sip often.\n* Carry a bottle."
    obj = json.loads(_repaired((JSON_FORMAT, {"keys": ["topic", "tip"]})))
    assert obj == {"topic": " ".join(sentences[:2]), "tip": " ".join(sentences[2:])}
    short = _repaired((NUMBER_WORDS, {"relation": "less than", "num_words": 15}))
    assert count_words(short) < 15 and short.startswith("Drinking water keeps you healthy")
    long = _repaired((NUMBER_WORDS, {"relation": "at least", "num_words": 60}))
    assert count_words(long) >= 60 and long.startswith(ANSWER)
    keyword = _repaired((KEYWORD_FREQUENCY, {"keyword": "water", "frequency": 3, "relation": "at least"}))
    assert keyword.startswith(ANSWER) and keyword.lower().count("water") == 3
    both = _repaired((TITLE, {}), (BULLETS, {"num_bullets": 2}), (END_CHECKER, {"end_phrase": "That is all."}))
    assert both.splitlines()[0] == "<<Drinking Water>>" and both.splitlines()[-1] == "That is all."
    lower_list = _repaired((LOWERCASE, {}), (BULLETS, {"num_bullets": 4}), (NUMBER_WORDS, {"relation": "less than",
                                                                                           "num_words": 20}))
    assert lower_list.count("\n* ") == 3 and lower_list == lower_list.lower()


def test_repair_passes_a_compliant_answer_through_and_reads_former_names():
    record = _record((LOWERCASE, {}))
    assert repair(record, "already fine.") == "already fine."
    old = {"constraints": [{"type": "bullets", "kwargs": {"n": 2}}, {"type": "no_commas", "kwargs": {}}]}
    fixed = repair(old, ANSWER)
    assert fixed is not None and check_response(old, fixed)[0] and "," not in fixed


def test_repair_gives_up_where_no_simple_edit_does():
    room = _record((TITLE, {}), (NUMBER_WORDS, {"relation": "less than", "num_words": 4}),
                   (END_CHECKER, {"end_phrase": "Thank you for reading."}))
    assert repair(room, ANSWER) is None  # the title and the end phrase alone are 5 words
    assert repair(_record((BULLETS, {"num_bullets": 4})), "Yes.") is None  # one word: no four bullets
    assert repair(_record((LOWERCASE, {})), "   ") is None
    assert repair(_record((JSON_FORMAT, {"keys": ["topic", "tip"]}), (NO_COMMA, {})), ANSWER) is None  # needs a comma
    assert repair(_record((QUOTATION, {})), ANSWER) is None  # held-out types are not repaired


def test_every_shipped_training_prompt_is_repairable_from_a_plain_answer():
    for record in load_records("train"):
        answer = (f"{record['topic'].capitalize()} is good for your health, mood and energy. It takes a few minutes "
                  "a day. Start small, be consistent and track your progress. Over time you will notice it.")
        fixed = repair(record, answer)
        assert fixed is not None and check_response(record, fixed)[0], record


# ---- evaluate_instructions and the CLI ----

@pytest.fixture(scope="module")
def tiny_lm(tiny_model_dir):
    import plugtune

    return plugtune.load(str(tiny_model_dir), device="cpu", dtype="float32")


def test_evaluate_instructions_on_the_tiny_model(tiny_lm):
    from plugtune.evaluation import evaluate_instructions

    records = load_records("test")[:6] + load_records("unseen")[:4]
    r = evaluate_instructions(tiny_lm, records, batch_size=4, max_new_tokens=4)
    assert r["n_prompts"] == 10 and len(r["responses"]) == 10 and all(isinstance(t, str) for t in r["responses"])
    assert len(r["passed_strict"]) == len(r["passed_loose"]) == 10 and r["ids"] == [x["id"] for x in records]
    kinds = [c["type"] for x in records for c in x["constraints"]]
    assert {t: v["n"] for t, v in r["by_type"].items()} == {t: kinds.count(t) for t in set(kinds)}
    assert ifeval_scores(records, r["responses"]) == {k: r[k] for k in ifeval_scores(records, r["responses"])}
    assert "gain" not in r


def test_evaluate_instructions_scores_forced_answers_and_the_gain(tiny_lm, monkeypatch):
    from plugtune.evaluation import evaluate_instructions

    records = [_record((LOWERCASE, {})), _record((TITLE, {})), _record((BULLETS, {"num_bullets": 2}))]
    for i, r in enumerate(records):
        r["id"] = f"r{i}"
    calls = []

    def forced(answers):
        def generate(prompts, adapters=None, cfg=None, batch_size=16, chat=True):
            calls.append((prompts, adapters, cfg.max_new_tokens, cfg.temperature, batch_size))
            return list(answers)
        return generate

    monkeypatch.setattr(tiny_lm, "generate", forced(["Fine.", "no title", "* a"]))
    base = evaluate_instructions(tiny_lm, records, max_new_tokens=7)
    assert (base["prompt_strict"], base["instruction_strict"]) == (0.0, 0.0)
    assert calls[0] == ([[{"role": "user", "content": "p"}]] * 3, None, 7, 0.0, 32)  # greedy, chat messages
    monkeypatch.setattr(tiny_lm, "generate", forced(["fine.", "<<t>> x", "* a\n* b"]))
    tuned = evaluate_instructions(tiny_lm, records, adapters="policy", baseline=base)
    assert calls[1][1] == "policy"
    assert tuned["prompt_strict"] == 1.0 and tuned["prompt_loose"] == 1.0 and tuned["instruction_loose"] == 1.0
    assert tuned["gain"] == {"gain": 100.0, "low": 100.0, "high": 100.0, "n": 3}
    assert tuned["gain_loose"]["gain"] == 100.0 and tuned["responses"] == ["fine.", "<<t>> x", "* a\n* b"]
    with pytest.raises(ValueError, match="same prompts"):
        evaluate_instructions(tiny_lm, records[:2], baseline=base)


def test_cli_eval_instructions(tiny_model_dir, tmp_path, capsys):
    from plugtune.cli import main

    out = tmp_path / "result.json"
    assert main(["eval", "--model", str(tiny_model_dir), "--device", "cpu", "--instructions", "unseen", "--limit", "8",
                 "--max-new-tokens", "3", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "prompt-level strict" in printed and "instruction-level strict" in printed
    assert all(t in printed for t in UNSEEN_TYPES)
    result = json.loads(out.read_text())
    assert result["instructions"] == "unseen" and result["n_prompts"] == 8 and len(result["responses"]) == 8
    assert sum(v["n"] for v in result["by_type"].values()) == 8
    # a file of records (former type names too)
    records = tmp_path / "mine.jsonl"
    records.write_text(json.dumps({"prompt": "Say hi in lowercase.", "constraints": [{"type": "lowercase",
                                                                                     "kwargs": {}}]}) + "\n")
    assert main(["eval", "--model", str(tiny_model_dir), "--device", "cpu", "--instructions", str(records),
                 "--max-new-tokens", "2"]) == 0
    assert LOWERCASE in capsys.readouterr().out
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"prompt": "no constraints"}) + "\n")
    assert main(["eval", "--model", str(tiny_model_dir), "--instructions", str(bad)]) == 2
    assert "constraints" in capsys.readouterr().err
