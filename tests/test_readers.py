"""Every reader (JSONL, JSON, CSV, TSV, Parquet, a saved `datasets` dataset) gives the same examples and
preference pairs as JSONL, in every data format, and a bad row is an error naming its location."""
import csv
import json
import sys

import pytest

from plugtune.data import DataError, load_examples
from plugtune.data.preference import load_preferences
from plugtune.data.readers import read_records

u = lambda c: {"role": "user", "content": c}
a = lambda c: {"role": "assistant", "content": c}
s = lambda c: {"role": "system", "content": c}

# Two records per format; the second has every optional part the format allows.
FORMATS = {
    "alpaca": [{"instruction": "convert date", "output": "answer"},
               {"instruction": "convert date", "input": "May 1, 2020", "output": "2020-05-01", "id": "b"}],
    "messages": [{"messages": [u("hi, you"), a("yo")]},
                 {"messages": [s("be brief"), u("what is 2"), a("2"), u("and 3"), a("3")]}],
    "sharegpt": [{"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "yo"}]},
                 {"conversations": [{"from": "system", "value": "be brief"}, {"from": "human", "value": "what\nis 2"},
                                    {"from": "gpt", "value": "2"}]}],
    "prompt_completion": [{"prompt": "what is 2", "completion": "2"},
                          {"prompt": "say \"x\", then y", "completion": "x y"}],
    "text": [{"text": "the quick brown fox"}, {"text": "line one\nline two, with a comma"}],
}
PREFERENCES = {
    # A Parquet column holds one type: prompts are all lists here.
    "paired": [{"prompt": [u("hi")], "chosen": "hello", "rejected": "go away", "margin": 1.5},
               {"prompt": [u("what is 2"), a("2"), u("and 3")], "chosen": "3", "rejected": "4", "margin": 0.5}],
    "implicit": [{"chosen": [u("hi"), a("hello")], "rejected": [u("hi"), a("go away")]},
                 {"chosen": [s("be kind"), u("what is 2"), a("2")],
                  "rejected": [s("be kind"), u("what is 2"), a("5")]}],
}


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def write_json(path, rows):
    path.write_text(json.dumps(rows, indent=2))


def write_csv(path, rows, delimiter=","):
    columns = list(dict.fromkeys(k for r in rows for k in r))
    cell = lambda v: json.dumps(v) if isinstance(v, (list, dict)) else ("true" if v is True else "false" if v is False
                                                                      else "" if v is None else str(v))
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f, delimiter=delimiter)
        writer.writerow(columns)
        writer.writerows([[cell(r.get(c)) for c in columns] for r in rows])


def write_tsv(path, rows):
    write_csv(path, rows, "\t")


def all_columns(rows):
    """Both libraries take the columns from the first row only: give every row every key (None: missing)."""
    columns = list(dict.fromkeys(k for r in rows for k in r))
    return [{c: r.get(c) for c in columns} for r in rows]


def write_parquet(path, rows):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist(all_columns(rows)), path)


def write_saved(path, rows):
    import datasets

    datasets.Dataset.from_list(all_columns(rows)).save_to_disk(str(path))


WRITERS = {".json": write_json, ".csv": write_csv, ".tsv": write_tsv, ".parquet": write_parquet, "": write_saved}
LOCATION = {".json": "{} record 1", ".csv": "{}:3", ".tsv": "{}:3", ".parquet": "{} row 1", "": "{} row 1"}


def written(tmp_path, suffix, rows, name="data"):
    path = tmp_path / f"{name}{suffix}"
    WRITERS[suffix](path, rows)
    reference = tmp_path / f"{name}_reference.jsonl"
    write_jsonl(reference, rows)
    return path, reference


@pytest.mark.parametrize("suffix", list(WRITERS))
@pytest.mark.parametrize("fmt", list(FORMATS))
def test_every_reader_gives_the_examples_jsonl_gives(tmp_path, suffix, fmt):
    path, reference = written(tmp_path, suffix, FORMATS[fmt])
    got, want = load_examples(path), load_examples(reference)
    assert [(e.messages, e.text) for e in got] == [(e.messages, e.text) for e in want]
    last = {"alpaca": "2020-05-01", "messages": "3", "sharegpt": "2", "prompt_completion": "x y",
            "text": "line one\nline two, with a comma"}[fmt]  # the reference is not empty either
    assert len(want) == 2 and (want[1].text or want[1].reference) == last
    assert got[1].where == LOCATION[suffix].format(path)


@pytest.mark.parametrize("suffix", list(WRITERS))
@pytest.mark.parametrize("fmt", list(PREFERENCES))
def test_every_reader_gives_the_preferences_jsonl_gives(tmp_path, suffix, fmt):
    path, reference = written(tmp_path, suffix, PREFERENCES[fmt])
    got, want = load_preferences(path), load_preferences(reference)
    assert [vars(x) | {"where": None} for x in got] == [vars(x) | {"where": None} for x in want]
    assert len(want) == 2 and got[1].where == LOCATION[suffix].format(path)


@pytest.mark.parametrize("suffix", list(WRITERS))
def test_a_bad_row_is_named_by_its_location(tmp_path, suffix):
    rows = [FORMATS["messages"][0], {"messages": [u("hi"), {"role": "bot", "content": "yo"}]}]
    path, _ = written(tmp_path, suffix, rows)
    with pytest.raises(DataError) as err:
        load_examples(path)
    assert str(err.value).startswith(LOCATION[suffix].format(path) + ": messages[1]: unknown role 'bot'")
    # A missing value: null in JSON, Parquet and datasets, an empty cell in CSV.
    path, _ = written(tmp_path, suffix, [FORMATS["prompt_completion"][0], {"prompt": "a", "completion": None}], "null")
    with pytest.raises(DataError) as err:
        load_examples(path)
    assert str(err.value).startswith(LOCATION[suffix].format(path) + ": field 'completion' is null (or an empty cell)")


def test_csv_locations_follow_multi_line_cells_and_excel_bom(tmp_path):
    path = tmp_path / "d.csv"
    path.write_bytes('\ufeffprompt,completion\r\n"two\r\nlines",a\r\n\r\nnext,b\r\nlast,\r\n'.encode())
    with pytest.raises(DataError, match=r"d\.csv:6: field 'completion' is null"):
        load_examples(path)
    path.write_bytes('\ufeffprompt,completion\r\n"two\r\nlines",a\r\n\r\nnext,b\r\n'.encode())
    records = read_records(path)
    assert [w.rsplit(":", 1)[1] for w, _ in records] == ["2", "5"]
    assert [r for _, r in records] == [{"prompt": "two\r\nlines", "completion": "a"},
                                       {"prompt": "next", "completion": "b"}]


def test_csv_columns_with_json_and_typed_preference_cells(tmp_path):
    path = tmp_path / "p.csv"
    path.write_text("prompt,chosen,rejected,margin\n"
                    '"[1, 2] is a list",yes,no,2\n'  # text that only looks like JSON stays text
                    '"[{""role"": ""user"", ""content"": ""hi""}]",hello,bye,x\n')
    with pytest.raises(DataError, match=r"p\.csv:3: field 'margin' must be a number, got str"):
        load_preferences(path)
    records = [r for _, r in read_records(path)]
    assert records[0]["prompt"] == "[1, 2] is a list" and records[0]["margin"] == 2.0
    assert records[1]["prompt"] == [u("hi")]
    path.write_text("prompt,completion,label\nhi,hello,TRUE\nhi,bye,maybe\n")
    assert [r["label"] for _, r in read_records(path)] == [True, "maybe"]
    with pytest.raises(DataError, match=r"p\.csv:2: unpaired \(KTO-style\) examples"):
        load_preferences(path)


def test_csv_structure_errors(tmp_path):
    path = tmp_path / "d.csv"
    for text, message in [("", r"d\.csv: no header row"), ("prompt,prompt\na,b\n", r"d\.csv:1: .*'prompt' twice"),
                          ('prompt,completion\n"a,b\n', r"d\.csv:2: not valid CSV")]:
        path.write_text(text)
        with pytest.raises(DataError, match=message):
            read_records(path)


def test_saved_dataset_dict_needs_a_split(tmp_path):
    import datasets

    rows = FORMATS["prompt_completion"]
    datasets.DatasetDict({"train": datasets.Dataset.from_list(rows),
                          "test": datasets.Dataset.from_list(rows[:1])}).save_to_disk(str(tmp_path / "dd"))
    with pytest.raises(DataError, match=r"dd: a DatasetDict with splits train, test; pass one split's directory"):
        load_examples(tmp_path / "dd")
    assert len(load_examples(tmp_path / "dd" / "train")) == 2
    assert len(load_examples(tmp_path / "dd", split="test")) == 1
    with pytest.raises(DataError, match="no split 'dev'"):
        load_examples(tmp_path / "dd", split="dev")
    (tmp_path / "plain").mkdir()
    with pytest.raises(DataError, match=r"plain: a directory, not a data file; pass a \.jsonl"):
        load_examples(tmp_path / "plain")


def test_missing_optional_packages_say_what_to_install(tmp_path, monkeypatch):
    parquet, _ = written(tmp_path, ".parquet", FORMATS["text"])
    saved, _ = written(tmp_path, "", FORMATS["text"], "saved")
    for module in ("pyarrow", "pyarrow.parquet", "datasets"):
        monkeypatch.setitem(sys.modules, module, None)  # makes `import module` fail
    with pytest.raises(DataError, match=r"data\.parquet: reading Parquet files needs the optional package "
                                        r"'pyarrow': pip install 'plugtune\[parquet\]'"):
        load_examples(parquet)
    with pytest.raises(DataError, match=r"pip install 'plugtune\[datasets\]'"):
        load_examples(saved)


def test_damaged_parquet(tmp_path):
    path, _ = written(tmp_path, ".parquet", FORMATS["text"])
    path.write_bytes(path.read_bytes()[:40])
    with pytest.raises(DataError, match=r"data\.parquet: not a readable Parquet file"):
        load_examples(path)


def test_unknown_suffix_is_sniffed(tmp_path):
    rows = FORMATS["prompt_completion"]
    (tmp_path / "a.txt").write_text(json.dumps(rows))
    (tmp_path / "b.txt").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert [w for w, _ in read_records(tmp_path / "a.txt")][1].endswith("a.txt record 1")
    assert [w for w, _ in read_records(tmp_path / "b.txt")][1].endswith("b.txt:2")
