"""Assistant-only labels, checked by hand on the SmolLM2 ChatML template, for every data format."""
import json

import pytest

from plugtune.data import DataError, load_examples, tokenize_dataset, tokenize_example
from plugtune.data.formats import normalise
from plugtune.data.templates import FALLBACK_TEMPLATE

SYSTEM = "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"


def supervised_text(tok, ex, train_on="responses"):
    """The decoded text of labelled tokens, as a list of contiguous runs."""
    t = tokenize_example(tok, ex, train_on)
    runs, current = [], []
    for i, lab in zip(t.input_ids, t.labels):
        if lab == -100:
            if current:
                runs.append(tok.decode(current))
                current = []
        else:
            assert lab == i
            current.append(i)
    if current:
        runs.append(tok.decode(current))
    return runs, tok.decode(t.input_ids)


RECORDS = {
    "alpaca": {"instruction": "convert date", "input": "May 1", "output": "answer"},
    "alpaca_no_input": {"instruction": "convert date", "output": "answer"},
    "messages": {"messages": [{"role": "user", "content": "convert date"}, {"role": "assistant", "content": "answer"}]},
    "sharegpt": {"conversations": [{"from": "human", "value": "convert date"}, {"from": "gpt", "value": "answer"}]},
    "prompt_completion": {"prompt": "convert date", "completion": "answer"},
}


@pytest.mark.parametrize("name", list(RECORDS))
def test_single_turn_masks_prompt_and_keeps_end_of_turn(tokenizer, name):
    ex = normalise(RECORDS[name], "auto", "x")
    runs, full = supervised_text(tokenizer, ex)
    user = "convert date\n\nMay 1" if name == "alpaca" else "convert date"
    assert full == f"{SYSTEM}<|im_start|>user\n{user}<|im_end|>\n<|im_start|>assistant\nanswer<|im_end|>\n"
    # Only the answer and its end-of-turn token are trained; the newline after <|im_end|> is not.
    assert runs == ["answer<|im_end|>"]


def test_multi_turn_conversation_trains_every_assistant_turn(tokenizer):
    ex = normalise({"messages": [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": "hello"}, {"role": "assistant", "content": "hello world"},
        {"role": "user", "content": "what date"}, {"role": "assistant", "content": "May 1"},
    ]}, "auto", "x")
    runs, full = supervised_text(tokenizer, ex)
    assert full.startswith("<|im_start|>system\nbe brief<|im_end|>\n")
    assert runs == ["hello world<|im_end|>", "May 1<|im_end|>"]


def test_exact_label_positions_by_hand(tokenizer):
    ex = normalise(RECORDS["messages"], "auto", "x")
    t = tokenize_example(tokenizer, ex)
    prompt = tokenizer(f"{SYSTEM}<|im_start|>user\nconvert date<|im_end|>\n<|im_start|>assistant\n",
                       add_special_tokens=False)["input_ids"]
    answer = tokenizer("answer", add_special_tokens=False)["input_ids"]
    end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    newline = tokenizer("\n", add_special_tokens=False)["input_ids"]
    assert t.input_ids == prompt + answer + [end] + newline
    assert t.labels == [-100] * len(prompt) + answer + [end] + [-100] * len(newline)


def test_train_on_all_and_plain_text(tokenizer):
    ex = normalise(RECORDS["messages"], "auto", "x")
    t = tokenize_example(tokenizer, ex, train_on="all")
    assert t.labels == t.input_ids
    text = normalise({"text": "the quick brown fox"}, "auto", "x")
    t = tokenize_example(tokenizer, text)
    assert t.labels == t.input_ids and t.input_ids[-1] == tokenizer.eos_token_id


def test_fallback_template_for_tokenizer_without_one(tokenizer):
    from plugtune.models.tiny import build_tokenizer

    tok = build_tokenizer(chat_template=None)
    runs, full = supervised_text(tok, normalise(RECORDS["messages"], "auto", "x"))
    assert tok.chat_template == FALLBACK_TEMPLATE
    assert full == "### user:\nconvert date<|im_end|>\n### assistant:\nanswer<|im_end|>\n"
    assert runs == ["answer<|im_end|>"]


def test_non_chatml_template_with_different_end_token(tokenizer):
    from plugtune.models.tiny import build_tokenizer

    llama3_like = ("{% for m in messages %}{{ '<|endoftext|>' + m['role'] + ': ' + m['content'] + eos_token }}"
                   "{% endfor %}{% if add_generation_prompt %}{{ '<|endoftext|>assistant: ' }}{% endif %}")
    tok = build_tokenizer(chat_template=llama3_like)
    ex = normalise({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"},
                                 {"role": "user", "content": "again"}, {"role": "assistant", "content": "ok"}]}, "auto", "x")
    runs, _ = supervised_text(tok, ex)
    assert runs == ["yo<|im_end|>", "ok<|im_end|>"]


def test_overlong_examples_are_truncated_or_dropped_and_counted(tokenizer):
    long = normalise({"prompt": "the quick brown fox " * 20, "completion": "answer"}, "auto", "x")
    short = normalise(RECORDS["messages"], "auto", "x")
    items, stats = tokenize_dataset(tokenizer, [long, short], max_length=60, overflow="drop")
    assert (stats.kept, stats.dropped_too_long) == (1, 1)
    items, stats = tokenize_dataset(tokenizer, [long, short], max_length=60, overflow="truncate")
    # The truncated example lost its whole answer, so it has nothing to learn and is dropped too.
    assert (stats.truncated, stats.dropped_no_labels, stats.kept) == (1, 1, 1)
    assert all(len(i.input_ids) <= 60 for i in items)


def write(tmp_path, lines):
    path = tmp_path / "data.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.mark.parametrize("first,line,message", [
    ("alpaca", '{"instruction": "x", "output": 3}', "data.jsonl:2: field 'output' must be a string"),
    ("alpaca", '{"instruction": "x"}', "data.jsonl:2: missing field 'output'"),
    ("messages", '{"messages": [{"role": "user"}]}', "data.jsonl:2: messages[0]: missing field 'content'"),
    ("messages", '{"messages": [{"role": "robot", "content": "a"}]}', "unknown role 'robot'"),
    ("sharegpt", '{"conversations": [{"from": "human", "value": "a"}]}', "no assistant turn"),
    (None, '{"question": "a"}', "data.jsonl:1: cannot tell the format"),
    ("alpaca", '{"instruction": "x", "output": "y"', "data.jsonl:2: not valid JSON"),
    ("alpaca", '[1, 2]', "data.jsonl:2: expected a JSON object"),
])
def test_malformed_input_names_file_line_and_field(tmp_path, first, line, message):
    path = write(tmp_path, [json.dumps(RECORDS[first]), line] if first else [line])
    with pytest.raises(DataError, match=message.replace("[", r"\[").replace("]", r"\]")):
        load_examples(path)


def test_missing_file_and_json_array(tmp_path):
    with pytest.raises(DataError, match="file not found"):
        load_examples(tmp_path / "nope.jsonl")
    path = tmp_path / "data.json"
    path.write_text(json.dumps([RECORDS["alpaca"], RECORDS["alpaca_no_input"]]))
    assert len(load_examples(path)) == 2
