"""Preference data: formats, errors naming file:line and field, SFT-identical masking, the (2B, T) layout."""
import json
from pathlib import Path

import pytest
import torch

from plugtune.data import DataError, Tokenized
from plugtune.data.preference import (
    PreferencePair, TokenizedPair, collate_pairs, load_preferences, load_prompts, tokenize_pair, tokenize_preferences,
)
from plugtune.data.templates import render
from plugtune.data.tokenize import prompt_ids
from tests.references import micro_batch, micro_batch_pairs

torch.set_num_threads(1)
DATA = Path(__file__).parent / "data" / "preference"
# CI checks out the shared bench data beside the repository: ../shared/bench-data/.
BENCH = Path(__file__).resolve().parents[1].parent / "shared" / "bench-data" / "prefs.jsonl"


def user(text):
    return {"role": "user", "content": text}


def bot(text):
    return {"role": "assistant", "content": text}


def runs(tok, ids, labels):
    """Decoded text of the labelled tokens, one string per contiguous run."""
    out, current = [], []
    for i, lab in zip(ids, labels):
        if lab == -100:
            if current:
                out.append(tok.decode(current))
            current = []
        else:
            assert lab == i
            current.append(i)
    return out + ([tok.decode(current)] if current else [])


# ---------------------------------------------------------------- formats


def test_paired_strings_and_message_lists():
    pairs = load_preferences(DATA / "paired.jsonl")
    assert pairs[0] == PreferencePair([user("what is the date")], [bot("May 1")], [bot("hello world")], None,
                                      f"{DATA / 'paired.jsonl'}:1")
    assert pairs[1].prompt == [{"role": "system", "content": "be brief"}, user("hello"), bot("hello world"),
                               user("convert date May 1")]
    assert (pairs[1].chosen, pairs[1].rejected) == ([bot("2024-05-01")], [bot("the lazy dog")])


def test_implicit_prompt_is_the_longest_common_prefix():
    first, second = load_preferences(DATA / "implicit.jsonl")
    assert first.prompt == [user("what color is the sky")]
    assert (first.chosen, first.rejected) == ([bot("blue")], [bot("green")])
    assert second.prompt == [{"role": "system", "content": "be brief"}, user("hello"), bot("hello world"),
                             user("convert date May 1")]
    assert second.chosen == [bot("2024-05-01")]
    assert second.rejected == [bot("May 1"), bot("I mean 2024-05-01")]  # completions may hold several turns


def test_implicit_split_matches_trl_extract_prompt():
    data_utils = pytest.importorskip("trl.data_utils")
    records = [json.loads(line) for line in (DATA / "implicit.jsonl").read_text().splitlines()]
    for record, pair in zip(records, load_preferences(DATA / "implicit.jsonl")):
        assert data_utils.maybe_extract_prompt(record) == {"prompt": pair.prompt, "chosen": pair.chosen,
                                                           "rejected": pair.rejected}
    # An explicit conversational prompt is left as it is by TRL, and by us.
    record = json.loads((DATA / "paired.jsonl").read_text().splitlines()[1])
    pair = load_preferences(DATA / "paired.jsonl")[1]
    assert data_utils.maybe_extract_prompt(record) == record
    assert pair.prompt == [{"role": "system", "content": record["system"]}, *record["prompt"]]


def test_margins_are_read_as_numbers(tmp_path):
    path = write(tmp_path, ['{"prompt": "a", "chosen": "b", "rejected": "c", "margin": 2}',
                            '{"prompt": "a", "chosen": "b", "rejected": "d", "margin": 0.5}'])
    assert [p.margin for p in load_preferences(path)] == [2.0, 0.5]


def write(tmp_path, lines):
    path = tmp_path / "data.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


GOOD = '{"prompt": "a", "chosen": "b", "rejected": "c"}'
IMPLICIT = json.dumps({"chosen": [user("q"), bot("yes")], "rejected": [user("q"), bot("no")]})
UNPAIRED = '{"prompt": "a", "completion": "b", "label": true}'


@pytest.mark.parametrize("lines,message", [
    ([GOOD, '{"prompt": "a", "chosen": "b"}'], "data.jsonl:2: missing field 'rejected'"),
    ([GOOD, '{"prompt": "", "chosen": "b", "rejected": "c"}'], "data.jsonl:2: field 'prompt' is empty"),
    ([GOOD, '{"prompt": [], "chosen": "b", "rejected": "c"}'], "data.jsonl:2: field 'prompt' must be a non-empty"),
    ([GOOD, '{"prompt": "a", "chosen": "b", "rejected": "b"}'], "data.jsonl:2: 'chosen' is identical to 'rejected'"),
    ([GOOD, json.dumps({"prompt": [user("a"), bot("b")], "chosen": "c", "rejected": "d"})],
     "data.jsonl:2: the last turn of field 'prompt' is 'assistant'; a prompt must end with a user turn"),
    ([GOOD, json.dumps({"prompt": [{"role": "system", "content": "s"}], "chosen": "c", "rejected": "d"})],
     "data.jsonl:2: field 'prompt' has no user turn"),
    ([GOOD, json.dumps({"prompt": "a", "chosen": [bot("b"), user("c")], "rejected": "d"})],
     r"data.jsonl:2: chosen\[1\] is a 'user' turn; a completion holds assistant turns only"),
    ([GOOD, json.dumps({"prompt": "a", "chosen": "b", "rejected": [{"role": "robot", "content": "c"}]})],
     r"data.jsonl:2: rejected\[0\]: unknown role 'robot'"),
    ([GOOD, json.dumps({"prompt": "a", "chosen": [{"role": "assistant"}], "rejected": "c"})],
     r"data.jsonl:2: chosen\[0\]: missing field 'content'"),
    ([GOOD, json.dumps({"prompt": "a", "chosen": [bot(" ")], "rejected": "c"})],
     r"data.jsonl:2: chosen\[0\] has empty content"),
    ([IMPLICIT, json.dumps({"chosen": [user("q"), bot("a")], "rejected": [user("r"), bot("a")]})],
     "data.jsonl:2: implicit pair: 'chosen' and 'rejected' share no first turn"),
    ([IMPLICIT, json.dumps({"chosen": [user("q"), bot("a"), user("x"), bot("y")],
                            "rejected": [user("q"), bot("a"), user("z"), bot("y")]})],
     r"data.jsonl:2: implicit pair: the shared prefix .* \(turns 0..1\) ends with a 'assistant' turn"),
    ([IMPLICIT, json.dumps({"chosen": [user("q"), bot("a")], "rejected": [user("q"), bot("a")]})],
     "data.jsonl:2: 'chosen' is identical to 'rejected'"),
    ([IMPLICIT, json.dumps({"chosen": [user("q"), bot("a"), user("more"), bot("b")],
                            "rejected": [user("q"), bot("c")]})], r"data.jsonl:2: chosen\[1\] is a 'user' turn"),
    (['{"chosen": "b", "rejected": "c"}'], "data.jsonl:1: an implicit pair needs 'chosen' and 'rejected' as message"),
    ([UNPAIRED], r"data.jsonl:1: unpaired \(KTO-style\) examples .* are not supported; give preference pairs "
                 r"instead: 'prompt' \+ 'chosen' \+ 'rejected'"),
    ([GOOD, UNPAIRED], r"data.jsonl:2: unpaired \(KTO-style\) examples"),
    ([GOOD, IMPLICIT], "data.jsonl:2: this record is 'implicit' but the file's first record is 'paired'"),
    (['{"question": "a"}'], "data.jsonl:1: cannot tell the preference format"),
    (['{"prompt": "a", "chosen": "b", "rejected": "c", "margin": "big"}'], "data.jsonl:1: field 'margin' must be"),
    (['{"prompt": "a", "chosen": "b", "rejected": "c", "margin": 1}', GOOD], "data.jsonl:2: missing field 'margin'"),
    ([json.dumps({"system": "s", "prompt": [{"role": "system", "content": "t"}, user("a")], "chosen": "b",
                  "rejected": "c"})], "data.jsonl:1: both a 'system' field and a system turn"),
    ([GOOD, '[1]'], "data.jsonl:2: expected a JSON object"),
])
def test_malformed_preference_data_names_file_line_and_field(tmp_path, lines, message):
    with pytest.raises(DataError, match=message):
        load_preferences(write(tmp_path, lines))


# ---------------------------------------------------------------- tokenising


def test_labels_are_exactly_the_completion_and_prompt_is_what_generation_sees(tokenizer):
    pair = load_preferences(DATA / "paired.jsonl")[1]  # history with an assistant turn that must stay unlabelled
    tok = tokenize_pair(tokenizer, pair)
    prompt = prompt_ids(tokenizer, pair.prompt)
    end, newline = tokenizer.convert_tokens_to_ids("<|im_end|>"), tokenizer("\n", add_special_tokens=False)["input_ids"]
    for ids, labels, completion in ((tok.chosen_ids, tok.chosen_labels, "2024-05-01"),
                                    (tok.rejected_ids, tok.rejected_labels, "the lazy dog")):
        assert tok.prompt_len == len(prompt) and ids[:tok.prompt_len] == prompt
        assert ids == prompt + tokenizer(completion, add_special_tokens=False)["input_ids"] + [end] + newline
        assert runs(tokenizer, ids, labels) == [f"{completion}<|im_end|>"]
    assert tokenizer.decode(tok.chosen_ids) == render(tokenizer, pair.prompt + pair.chosen)


def test_multi_turn_completion_labels_every_completion_turn(tokenizer):
    pair = load_preferences(DATA / "implicit.jsonl")[1]
    tok = tokenize_pair(tokenizer, pair)
    assert runs(tokenizer, tok.chosen_ids, tok.chosen_labels) == ["2024-05-01<|im_end|>"]
    assert runs(tokenizer, tok.rejected_ids, tok.rejected_labels) == ["May 1<|im_end|>", "I mean 2024-05-01<|im_end|>"]
    assert tok.chosen_ids[:tok.prompt_len] == tok.rejected_ids[:tok.prompt_len] == prompt_ids(tokenizer, pair.prompt)


def test_template_that_renders_the_prompt_differently_is_refused():
    from plugtune.models.tiny import build_tokenizer

    # Like Qwen3: the generation prompt opens a think block that the rendered conversation does not have.
    thinking = ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}"
                "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n<think>\\n' }}{% endif %}")
    tok = build_tokenizer(chat_template=thinking)
    with pytest.raises(ValueError, match="x:3: the chat template renders the prompt differently"):
        tokenize_pair(tok, PreferencePair([user("hi")], [bot("yes")], [bot("no")], None, "x:3"))


def test_length_policy_keeps_prompt_tail_and_completion_start(tokenizer):
    long_prompt = PreferencePair([user("the quick brown fox " * 10)], [bot("May 1")], [bot("hello world")], None, "x:1")
    long_answer = PreferencePair([user("hi")], [bot("jumps over the lazy dog " * 10)], [bot("no")], None, "x:2")
    full_p, full_a = tokenize_pair(tokenizer, long_prompt), tokenize_pair(tokenizer, long_answer)
    (p, a), stats = tokenize_preferences(tokenizer, [long_prompt, long_answer], max_length=60, max_prompt_length=40)
    assert (stats.kept, stats.truncated, stats.examples) == (2, 2, 2)
    # The prompt lost its start: what remains is the last 40 tokens, ending on the assistant header.
    assert p.prompt_len == 40 and p.chosen_ids == full_p.chosen_ids[full_p.prompt_len - 40:]
    assert p.chosen_ids[:40] == p.rejected_ids[:40] == prompt_ids(tokenizer, long_prompt.prompt)[-40:]
    # The long answer lost its end; the short rejected one is untouched.
    assert a.prompt_len == full_a.prompt_len < 40
    assert a.chosen_ids == full_a.chosen_ids[:60] and a.chosen_labels == full_a.chosen_labels[:60]
    assert a.rejected_ids == full_a.rejected_ids
    assert stats.max_tokens == max(len(full_p.chosen_ids), len(full_a.chosen_ids))
    _, stats = tokenize_preferences(tokenizer, [long_prompt, long_answer], max_length=60, max_prompt_length=40,
                                    overflow="drop")
    assert (stats.kept, stats.dropped_too_long) == (0, 2)
    # Without a prompt cap the prompt fills max_length: nothing of the completion is left, so the pair goes.
    _, stats = tokenize_preferences(tokenizer, [long_prompt, long_answer], max_length=60)
    assert (stats.kept, stats.dropped_no_labels, stats.truncated) == (1, 1, 1)


def test_pairs_made_identical_by_truncation_are_dropped(tokenizer):
    pair = PreferencePair([user("hi")], [bot("the quick brown fox jumps")], [bot("the quick brown fox sleeps")])
    n = tokenize_pair(tokenizer, pair).prompt_len
    kept, stats = tokenize_preferences(tokenizer, [pair], max_length=n + 3)
    assert kept == [] and stats.dropped_no_labels == 1 and "identical after truncation" in stats.notes[0]


# ---------------------------------------------------------------- batching


def test_collate_pairs_layout(tokenizer):
    pad = tokenizer.pad_token_id
    a = TokenizedPair([5, 6, 7], [-100, 6, 7], [5, 8], [-100, 8], 1, 1.5)
    b = TokenizedPair([5, 9], [-100, 9], [5, 10, 11, 12], [-100, 10, 11, 12], 1, 0.0)
    batch = collate_pairs([a, b], pad)
    assert batch["input_ids"].tolist() == [[5, 6, 7, pad], [5, 9, pad, pad], [5, 8, pad, pad], [5, 10, 11, 12]]
    assert batch["labels"].tolist() == [[-100, 6, 7, -100], [-100, 9, -100, -100], [-100, 8, -100, -100],
                                        [-100, 10, 11, 12]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 0], [1, 1, 0, 0], [1, 1, 0, 0], [1, 1, 1, 1]]
    assert batch["margin"].tolist() == [1.5, 0.0]
    assert "margin" not in collate_pairs([TokenizedPair([1], [1], [2], [2], 0)], pad)
    with pytest.raises(ValueError, match="margin"):
        collate_pairs([a, TokenizedPair([1], [1], [2], [2], 0)], pad)


def test_pair_micro_batches_follow_the_sft_schedule_and_resume():
    """DPO and reward-model batches (pair_source): micro-batch i holds the pairs SFT's schedule picks."""
    from plugtune.config import load_run_config
    from plugtune.training.recipes.common import pair_source

    pairs = [TokenizedPair([i, i + 1], [-100, i + 1], [i, i + 2, i + 3], [-100, i + 2, i + 3], 1) for i in range(10)]
    sft = [Tokenized(p.chosen_ids, p.chosen_labels) for p in pairs]
    cfg = load_run_config(None, ["training.batch_size=2", "training.seed=3"])
    for index in (0, 3, 4, 9):  # 5 batches of 2 per epoch: indices 4 and 9 end epochs 0 and 1
        batch = pair_source(pairs, cfg, collate_pairs, 0).make_batch(index)
        fresh = pair_source(pairs, cfg, collate_pairs, 0).make_batch(index)  # a resumed run: a new source
        assert torch.equal(batch["input_ids"], fresh["input_ids"])
        assert torch.equal(batch["input_ids"], micro_batch_pairs(pairs, index, 2, seed=3, pad_id=0)["input_ids"])
        # Same pairs as SFT's micro_batch would take; rejected rows follow their chosen rows.
        assert torch.equal(batch["input_ids"][:2, :2], micro_batch(sft, index, 2, seed=3, pad_id=0)["input_ids"])
        assert torch.equal(batch["input_ids"][2:, 0], batch["input_ids"][:2, 0])
    assert not torch.equal(pair_source(pairs, cfg, collate_pairs, 0).make_batch(0)["input_ids"],
                           pair_source(pairs, cfg, collate_pairs, 0).make_batch(1)["input_ids"])


def test_load_prompts_tokenises_like_generation_and_keeps_extra_fields(tokenizer):
    a, b = load_prompts(DATA / "prompts.jsonl", tokenizer)
    assert a.prompt_ids == prompt_ids(tokenizer, [user("convert date May 1")])
    assert a.meta == {"answer": "2024-05-01", "id": 7}
    assert b.prompt_ids == prompt_ids(tokenizer, [{"role": "system", "content": "be brief"}, user("what is 2 + 3")])
    assert b.meta == {"answer": "5"}


@pytest.mark.skipif(not BENCH.is_file(), reason="shared bench data not present")
def test_bench_preference_file_loads_and_tokenises(tokenizer):
    pairs = load_preferences(BENCH)
    assert len(pairs) == 64 and all(isinstance(p, PreferencePair) and p.prompt[-1]["role"] == "user" for p in pairs)
    items, stats = tokenize_preferences(tokenizer, pairs, max_length=100_000)
    assert (stats.kept, stats.truncated) == (64, 0)
    for pair, tok in zip(pairs, items):
        expected_prompt = prompt_ids(tokenizer, pair.prompt)
        assert tok.chosen_ids[:tok.prompt_len] == tok.rejected_ids[:tok.prompt_len] == expected_prompt
        # Segment-wise tokenisation gives the same ids as tokenising the whole rendered conversation (TRL's way).
        whole = tokenizer(render(tokenizer, pair.prompt + pair.chosen), add_special_tokens=False)["input_ids"]
        assert tok.chosen_ids == whole
        assert tok.rejected_ids == tokenizer(render(tokenizer, pair.prompt + pair.rejected),
                                             add_special_tokens=False)["input_ids"]
        assert runs(tokenizer, tok.chosen_ids, tok.chosen_labels) == [pair.chosen[0]["content"] + "<|im_end|>"]
