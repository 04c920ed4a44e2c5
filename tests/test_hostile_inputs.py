"""Inputs as users really feed them (the corpus in tests/data/bad/, plus broken weights, model
directories, configs and huge records made here): each is an error naming the file and the line or
field with the fix, the CLI prints it as one line and exits 2, and nothing is written over outputs."""
import json
import shutil
import time
from pathlib import Path

import pytest
import torch

from plugtune.cli import main
from plugtune.data import DataError, load_examples, tokenize_dataset
from plugtune.data.preference import load_preferences

BAD = Path(__file__).parent / "data" / "bad"

# file in tests/data/bad -> (loader, the error message it must give)
CORPUS = {
    "latin1.jsonl": (load_examples, r"latin1\.jsonl:2: byte 0xe9 at column 16 is not valid UTF-8; .*"
                                    r"`iconv -f latin1 -t utf-8 \S*latin1\.jsonl > \S*latin1\.utf8\.jsonl`"),
    "utf16.jsonl": (load_examples, r"utf16\.jsonl: the file is UTF-16 .*`iconv -f utf-16 -t utf-8 "),
    "array.jsonl": (load_examples, r"array\.jsonl:1: this file holds a JSON array, not JSON Lines; name it \.json, "
                                   r"or write one JSON object per line"),
    "lines.json": (load_examples, r"lines\.json:2: several JSON objects one after another: this is JSON Lines; "
                                  r"name it \.jsonl"),
    "object.json": (load_examples, r"object\.json: a \.json data file must hold one array of records, got a dict "
                                   r"\(it is one object; are the records under 'data'\?"),
    "truncated.json": (load_examples, r"truncated\.json:1: not valid JSON at column 70 \(Unterminated string.*\); "
                                      r"the file is cut short or malformed"),
    "pretty.jsonl": (load_examples, r"pretty\.jsonl:1: not valid JSON at column 2 .*must be one complete JSON "
                                    r"object \(pretty-printed JSON belongs in a \.json file\)"),
    "null_field.jsonl": (load_examples, r"null_field\.jsonl:2: field 'prompt' is null \(or an empty cell\); give it "
                                        r"text or remove the record"),
    "unknown_role.jsonl": (load_examples, r"unknown_role\.jsonl:2: messages\[1\]: unknown role 'bot' \(expected one "
                                          r"of system, user, assistant\); rename it or remove the turn"),
    "role_not_string.jsonl": (load_examples, r"role_not_string\.jsonl:2: messages\[0\]: field 'role' must be a "
                                             r"string, got int"),
    "empty_assistant.jsonl": (load_examples, r"empty_assistant\.jsonl:2: messages\[1\]: the assistant turn's "
                                             r"'content' is empty; .*fill it in or remove the record"),
    # Its empty system turn (messages[0]) is allowed; the blank user turn is not.
    "empty_user.jsonl": (load_examples, r"empty_user\.jsonl:2: messages\[1\]: the user turn's 'content' is empty"),
    "no_assistant.jsonl": (load_examples, r"no_assistant\.jsonl:2: the conversation has no assistant turn, .*add "
                                          r"the answer as an assistant turn"),
    "content_parts.jsonl": (load_examples, r"content_parts\.jsonl:2: messages\[0\]: 'content' is a list \(content "
                                           r"parts\?\); give the turn's text as one string"),
    "bad_cells.csv": (load_examples, r"bad_cells\.csv:5: 3 cells but the header has 2 columns; quote cells"),
    "bad_messages.csv": (load_examples, r"bad_messages\.csv:3: column 'messages' must hold a JSON list of turns"),
    "same_pair.jsonl": (load_preferences, r"same_pair\.jsonl:2: 'chosen' is identical to 'rejected'; the pair "
                                          r"carries no preference: fix one of them or remove the record"),
}
ACCEPTED = {"ends_with_user.jsonl", "alternation.jsonl"}  # loaded; what happens to them is tested below


def test_the_corpus_is_all_covered():
    assert {p.name for p in BAD.iterdir()} == set(CORPUS) | ACCEPTED | {"README.md"}


@pytest.mark.parametrize("name", sorted(CORPUS))
def test_corpus_case_names_file_line_and_fix(name):
    loader, message = CORPUS[name]
    with pytest.raises(DataError, match=message):
        loader(BAD / name)


def run_cli(capsys, *argv):
    """(exit code, the one line on stderr); anything but one line is a failure."""
    code = main([str(a) for a in argv])
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err and "\n" not in err, err
    return code, err


def test_cli_prints_one_line_and_exits_2(capsys, tmp_path, tiny_model_dir):
    code, err = run_cli(capsys, "eval", "--model", tiny_model_dir, "--data", BAD / "latin1.jsonl")
    assert code == 2 and err.startswith("plugtune eval: error: ") and "latin1.jsonl:2: byte 0xe9" in err
    code, err = run_cli(capsys, "eval", "--model", tiny_model_dir, "--data", tmp_path)
    assert code == 2 and f"{tmp_path}: a directory, not a data file" in err
    code, err = run_cli(capsys, "generate", "--model", tiny_model_dir, "--prompts-file", tmp_path)
    assert code == 2 and "Is a directory" in err and str(tmp_path) in err
    weights = tiny_model_dir / "model.safetensors"
    code, err = run_cli(capsys, "generate", "--model", weights, "--prompt", "hi")
    assert code == 2 and f"{weights} is a file; pass the model's directory (the one that holds config.json)" in err
    code, err = run_cli(capsys, "generate", "--model", tiny_model_dir, "--adapter", weights, "--prompt", "hi")
    assert code == 2 and f"adapter {weights} is a file, not a directory" in err


def test_conversation_ending_with_a_user_turn_is_trimmed_and_counted(tokenizer):
    examples = load_examples(BAD / "ends_with_user.jsonl")
    assert [e.unanswered_turns for e in examples] == [0, 1, 0]
    assert examples[1].messages == [{"role": "system", "content": ""}, {"role": "user", "content": "what is 2"},
                                    {"role": "assistant", "content": "2"}]
    assert examples[1].prompt_messages()[-1]["content"] == "what is 2" and examples[1].reference == "2"
    items, stats = tokenize_dataset(tokenizer, examples, max_length=256)
    assert (stats.kept, stats.unanswered) == (3, 1)
    assert stats.summary().endswith(f"; 1 conversation ended with a user turn that has no answer; that turn was "
                                    f"dropped (the first at {BAD / 'ends_with_user.jsonl'}:2)")
    assert "and 3?" not in tokenizer.decode(items[1].input_ids)


def test_a_template_that_refuses_a_conversation_names_the_record():
    from plugtune.models.tiny import CHATML_TEMPLATE, build_tokenizer

    strict = ("{% for m in messages %}{% if loop.index0 > 0 and m['role'] == messages[loop.index0 - 1]['role'] %}"
              "{{ raise_exception('Conversation roles must alternate') }}{% endif %}{% endfor %}" + CHATML_TEMPLATE)
    examples = load_examples(BAD / "alternation.jsonl")
    with pytest.raises(DataError, match=r"alternation\.jsonl:2: the tokenizer's chat template cannot render this "
                                        r"conversation \(Conversation roles must alternate\); reorder or merge"):
        tokenize_dataset(build_tokenizer(strict), examples, max_length=256)


# ---------------------------------------------------------------- a 100 MB single line


def huge_line(path: Path, prefix: bytes, suffix: bytes, mb: int = 100) -> Path:
    with open(path, "wb") as f:
        f.write(prefix)
        f.write(b"a" * (mb * 2**20))
        f.write(suffix)
    return path


def test_a_100_mb_line_is_refused_at_once(tmp_path):
    path = huge_line(tmp_path / "huge.jsonl", b'{"prompt": "hi", "completion": "ok"}\n{"text": "', b'"}\n')
    t0 = time.perf_counter()
    with pytest.raises(DataError, match=r"huge\.jsonl:2: the line is over the 16 MB limit for one record \(not read "
                                        r"further\).*raise PLUGTUNE_MAX_RECORD_MB"):
        load_examples(path)
    csv_path = huge_line(tmp_path / "huge.csv", b'prompt,completion\nhi,"', b'"\n')
    with pytest.raises(DataError, match=r"huge\.csv:2: the line is over the 16 MB limit"):
        load_examples(csv_path)
    assert time.perf_counter() - t0 < 20  # reads 16 MB of each, never the whole line


def test_a_100_mb_field_in_a_json_array_is_refused_and_the_limit_can_be_raised(tmp_path, monkeypatch):
    path = huge_line(tmp_path / "huge.json", b'[{"prompt": "hi", "completion": "', b'"}]')
    t0 = time.perf_counter()
    with pytest.raises(DataError, match=r"huge\.json record 0: field 'completion' holds 100\.0 M characters, over "
                                        r"the 16 MB limit for one record; split it"):
        load_examples(path)
    monkeypatch.setenv("PLUGTUNE_MAX_RECORD_MB", "128")
    (example,) = load_examples(path)
    assert len(example.reference) == 100 * 2**20
    assert time.perf_counter() - t0 < 40


# ---------------------------------------------------------------- adapter weights


@pytest.fixture
def saved_adapter(tiny_model_dir, tmp_path):
    """(adapter directory, the adapted model's logits on a fixed input)."""
    from plugtune.adapters import adapter_state, attach_adapter, save_adapter
    from plugtune.models import load_base

    model = load_base(str(tiny_model_dir), device="cpu").model
    attach_adapter(model, "lora", {"r": 4})
    with torch.no_grad():
        for p in adapter_state(model, "default").values():
            p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(0)) * 0.5)
        logits = model(IDS).logits
    return save_adapter(model, tmp_path / "adapter"), logits


IDS = torch.tensor([[5, 17, 42, 9, 100]])


def fresh_base(tiny_model_dir):
    from plugtune.models import load_base

    return load_base(str(tiny_model_dir), device="cpu").model


def test_truncated_adapter_weights(saved_adapter, tiny_model_dir, capsys):
    from plugtune.adapters import adapter_names, load_adapter
    from plugtune.adapters.io import AdapterFileError

    path, _ = saved_adapter
    weights = path / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    model = fresh_base(tiny_model_dir)
    with pytest.raises(AdapterFileError, match=rf"{weights} is not a readable safetensors file \(.*\): it is "
                                               r"truncated or damaged\. Save the adapter again, or copy"):
        load_adapter(model, path)
    assert adapter_names(model) == []
    code, err = run_cli(capsys, "generate", "--model", tiny_model_dir, "--adapter", path, "--prompt", "hi")
    assert code == 2 and f"{weights} is not a readable safetensors file" in err


def test_a_pickle_named_safetensors_is_never_unpickled(saved_adapter, tiny_model_dir, monkeypatch):
    from safetensors.torch import load_file

    from plugtune.adapters import load_adapter
    from plugtune.adapters.io import AdapterFileError

    path, _ = saved_adapter
    weights = path / "adapter_model.safetensors"
    state = {k: v.clone() for k, v in load_file(weights).items()}  # off the file's memory map, then overwrite it
    torch.save(state, weights)
    monkeypatch.setattr(torch, "load", lambda *a, **k: pytest.fail("torch.load was called"))
    with pytest.raises(AdapterFileError, match=r"is a PyTorch pickle, not a safetensors file; plugtune never "
                                               r"unpickles a \.safetensors file"):
        load_adapter(fresh_base(tiny_model_dir), path)


def test_pickles_are_told_from_safetensors_by_their_bytes(tmp_path):
    from safetensors.torch import load_file, save_file

    from plugtune.models.loading import is_pickle

    # A safetensors file starts with its header's length: here 128, whose first byte (0x80) is also how a
    # raw pickle starts. The header may be padded with spaces (the safetensors format allows it).
    header = json.dumps({"w": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}).encode().ljust(128)
    padded = tmp_path / "padded.safetensors"
    padded.write_bytes((128).to_bytes(8, "little") + header + torch.tensor([1.5]).numpy().tobytes())
    assert padded.read_bytes()[:1] == b"\x80" and load_file(padded)["w"].item() == 1.5
    save_file({"w": torch.ones(2)}, tmp_path / "plain.safetensors")
    torch.save({"w": torch.ones(2)}, tmp_path / "zip.pt")
    torch.save({"w": torch.ones(2)}, tmp_path / "legacy.pt", _use_new_zipfile_serialization=False)
    assert [is_pickle(tmp_path / n) for n in ("padded.safetensors", "plain.safetensors", "zip.pt", "legacy.pt")] == [
        False, False, True, True]


def test_peft_bin_weights_load_with_weights_only(saved_adapter, tiny_model_dir, monkeypatch):
    from safetensors.torch import load_file

    from plugtune.adapters import load_adapter

    path, expected = saved_adapter
    weights = path / "adapter_model.safetensors"
    torch.save(load_file(weights), path / "adapter_model.bin")
    weights.unlink()
    calls, real_load = [], torch.load
    monkeypatch.setattr(torch, "load", lambda *a, **k: calls.append(k) or real_load(*a, **k))
    model = load_adapter(fresh_base(tiny_model_dir), path)
    assert [c.get("weights_only") for c in calls] == [True]
    with torch.no_grad():
        torch.testing.assert_close(model(IDS).logits, expected)


class _Payload:
    """Unpickling this object would create `marker`: proof that code in a pickle ran."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return open, (str(self.marker), "w")


def test_a_bin_with_objects_is_refused_without_running_them(saved_adapter, tiny_model_dir, tmp_path):
    from plugtune.adapters import load_adapter
    from plugtune.adapters.io import AdapterFileError

    path, _ = saved_adapter
    (path / "adapter_model.safetensors").unlink()
    marker = tmp_path / "code-ran"
    torch.save({"w": _Payload(marker)}, path / "adapter_model.bin")
    with pytest.raises(AdapterFileError, match=r"adapter_model\.bin holds Python objects other than tensors, so "
                                               r"plugtune will not load it \(torch\.load with weights_only=True "
                                               r"refused: .*\)\. .*re-save the tensors with safetensors"):
        load_adapter(fresh_base(tiny_model_dir), path)
    assert not marker.exists()
    (path / "adapter_model.bin").unlink()
    with pytest.raises(FileNotFoundError, match=r"the adapter's weights are missing \(neither "
                                                r"adapter_model\.safetensors nor adapter_model\.bin\)"):
        load_adapter(fresh_base(tiny_model_dir), path)


# ---------------------------------------------------------------- model directories


def broken_model_dir(tiny_model_dir, tmp_path, keep):
    path = tmp_path / "model"
    path.mkdir()
    for name in keep:
        shutil.copy(tiny_model_dir / name, path / name)
    return path


def test_model_directory_without_a_tokenizer(tiny_model_dir, tmp_path, capsys):
    from plugtune.models.loading import load_tokenizer

    path = broken_model_dir(tiny_model_dir, tmp_path, ["config.json", "model.safetensors"])
    message = rf"{path} has no tokenizer \(none of tokenizer\.json, tokenizer_config\.json, \.\.\.\): copy"
    with pytest.raises(FileNotFoundError, match=message):
        load_tokenizer(path)
    code, err = run_cli(capsys, "generate", "--model", path, "--prompt", "hi")
    assert code == 2 and f"{path} has no tokenizer" in err


def test_model_weights_missing_pickled_or_truncated(tiny_model_dir, tmp_path):
    from safetensors.torch import load_file

    from plugtune.models import load_base

    path = broken_model_dir(tiny_model_dir, tmp_path, ["config.json", "tokenizer.json", "tokenizer_config.json"])
    with pytest.raises(FileNotFoundError, match=rf"{path} has no weights \(model\.safetensors or "):
        load_base(str(path), device="cpu")
    torch.save(load_file(tiny_model_dir / "model.safetensors"), path / "model.safetensors")
    with pytest.raises(ValueError, match=r"model\.safetensors is a PyTorch pickle, not a safetensors file"):
        load_base(str(path), device="cpu")
    data = (tiny_model_dir / "model.safetensors").read_bytes()
    (path / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match=rf"{path}: a weights file is not readable safetensors \(.*\): it is "
                                         r"truncated or damaged"):
        load_base(str(path), device="cpu")


def test_max_length_beyond_the_model_context(tiny_model_dir):
    from plugtune.config import ConfigError
    from plugtune.models.loading import check_max_length, context_length

    assert context_length(tiny_model_dir) == 256  # max_position_embeddings of the tiny Llama
    check_max_length(tiny_model_dir, 256)
    check_max_length(tiny_model_dir, 512, longest=200)  # no example reaches past the context
    message = (r"data\.max_length=512 is larger than the model's context \(256 positions, from .*config\.json\) and "
               r"the longest example has 300 tokens; set data\.max_length=256 or less")
    with pytest.raises(ConfigError, match=message):
        check_max_length(tiny_model_dir, 512, longest=300)


# ---------------------------------------------------------------- configs


@pytest.mark.parametrize("override,message", [
    ("training.lr=abc", r"lora_sft\.yaml: training\.lr: expected a number, got 'abc' \(a str\)"),
    ("training.batch_size=2.5", r"yaml: training\.batch_size: expected an integer, got 2\.5"),
    ("training.lr=[1, 2]", r"yaml: training\.lr: expected a number, got \[1, 2\] \(a list\)"),
    ("training.lr=null", r"yaml: training\.lr: expected a number, got null \(this key needs a value\)"),
    ("training.lr=.inf", r"yaml: training\.lr: expected a finite number, got inf"),
    ("training.betas=[0.9]", r"yaml: training\.betas: expected a list of 2 values, got \[0\.9\]"),
    ("training.betas=[0.9, x]", r"yaml: training\.betas\[1\]: expected a number, got 'x'"),
    ("training=3", r"yaml: training: expected a mapping of keys \(a section\), got 3"),
    ("data.train=[a, b]", r"yaml: data\.train: expected a string, got \['a', 'b'\]"),
    ("adapter.r=-1", r"adapter \(lora\): LoRA rank r must be >= 1, got -1"),
    ("adapter.r=abc", r"adapter \(lora\)\.r: expected an integer, got 'abc'"),
    ("adapters.x.rows=abc", r"yaml: adapters\.x\.rows: expected an integer, got 'abc'"),
])
def test_ill_typed_config_values_name_key_value_and_type(override, message):
    from plugtune.config import ConfigError, load_run_config

    with pytest.raises(ConfigError, match=message):
        load_run_config("lora_sft", [override])


# ---------------------------------------------------------------- nothing written over outputs


def test_merge_with_a_broken_adapter_leaves_the_output_alone(saved_adapter, tiny_model_dir, tmp_path, capsys):
    path, _ = saved_adapter
    (path / "adapter_model.safetensors").write_bytes(b"\x00" * 10)
    out = tmp_path / "merged"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    code, err = run_cli(capsys, "merge", "--model", tiny_model_dir, "--adapter", path, "--out", out)
    assert code == 2 and "truncated or damaged" in err
    assert [p.name for p in out.iterdir()] == ["keep.txt"] and (out / "keep.txt").read_text() == "mine"


def test_train_with_bad_data_leaves_the_output_directory_alone(tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    (out / "config.yaml").write_text("the previous run's config\n")
    code, err = run_cli(capsys, "train", "lora_sft", f"model.name={tiny_model_dir}",
                        f"data.train={BAD / 'latin1.jsonl'}", f"output.dir={out}")
    assert code == 2 and "latin1.jsonl:2" in err
    assert [p.name for p in out.iterdir()] == ["config.yaml"]
    assert (out / "config.yaml").read_text() == "the previous run's config\n"
