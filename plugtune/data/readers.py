"""Read records from the files users have, each with its location for error messages.

    .jsonl / .ndjson   one JSON object per line, streamed            "data.jsonl:12"
    .json              one JSON array of objects                     "data.json record 11"
    .csv / .tsv        a header row, then one record per row         "data.csv:13" (the row's first line)
    .parquet           a table, read in batches (pip install 'plugtune[parquet]')      "data.parquet row 11"
    a directory        written by `datasets`' save_to_disk (pip install 'plugtune[datasets]'); for a
                       DatasetDict pass DIR/<split> or split=...    "ds/train row 11"

Tabular files hold the same formats as JSONL: one column per field. A cell of a `messages` or
`conversations` column may be a JSON string (CSV has no lists); so may `prompt`, `chosen`, `rejected`
and `completion` when they hold a list of messages. In CSV an empty cell is a missing value (null),
and `label` (true/false) and `margin` (a number) are converted.

Bytes are decoded as UTF-8, line by line, so a file in another encoding is an error naming the line
and column with the command that converts it. A record (a JSONL line, or a string field of any
format) over MAX_RECORD_MB (16; environment variable PLUGTUNE_MAX_RECORD_MB) is an error: such a
record is almost always a broken export, and it would otherwise sit in the tokenizer for minutes.
"""
from __future__ import annotations

import csv
import importlib
import json
import os
import re
from pathlib import Path
from typing import Any, Iterator

MAX_RECORD_MB = 16
PACKAGED_PREFIX = "plugtune:"
Located = tuple[str, Any]  # (location, record)


class DataError(ValueError):
    """Malformed input data; the message names the file, the line (or record) and the field."""


def resolve_data_path(path: str | Path) -> Path:
    """A file path, or 'plugtune:skills/dates_train.jsonl' for data shipped inside the package."""
    text = str(path)
    if text.startswith(PACKAGED_PREFIX):
        # Shipped task data lives in plugtune/tasks/ (a path, not an import: data sits below tasks).
        return Path(__file__).parent.parent / "tasks" / text[len(PACKAGED_PREFIX):]
    return Path(path).expanduser()


def max_record_bytes() -> int:
    raw = os.environ.get("PLUGTUNE_MAX_RECORD_MB", "")
    try:
        mb = float(raw) if raw.strip() else MAX_RECORD_MB
    except ValueError:
        raise DataError(f"PLUGTUNE_MAX_RECORD_MB={raw!r} is not a number of megabytes (e.g. 64)") from None
    return int(mb * 2**20)


def check_size(value: str, where: str, name: str) -> None:
    """A string field over the record limit is an error (characters, which are at least as many bytes)."""
    limit = max_record_bytes()
    if len(value) > limit:
        raise DataError(f"{where}: field '{name}' holds {len(value) / 2**20:.1f} M characters, over the "
                        f"{limit / 2**20:g} MB limit for one record; split it into smaller examples (only "
                        "data.max_length tokens are trained) or raise PLUGTUNE_MAX_RECORD_MB")


def read_records(path: str | Path, split: str | None = None) -> list[Located]:
    """(location, record) pairs from any supported file (see the module docstring)."""
    return list(iter_records(path, split))


def iter_records(path: str | Path, split: str | None = None) -> Iterator[Located]:
    path = resolve_data_path(path)
    if path.is_dir():
        return _read_saved_dataset(path, split)
    if not path.exists():
        raise DataError(f"{path}: file not found (relative paths start from {Path.cwd()})")
    if not path.is_file():
        raise DataError(f"{path}: not a regular file; pass a data file")
    if split is not None:
        raise DataError(f"{path}: split={split!r} applies to a directory saved with datasets' save_to_disk only")
    reader = _READERS.get(path.suffix.lower())
    if reader is None:  # no telling suffix: an array is JSON, anything else JSON Lines
        reader = _read_json if _first_byte(path) == b"[" else _read_jsonl
    return reader(path)


# ---------------------------------------------------------------- text, encodings


def _iconv_hint(path: Path) -> str:
    return (f"the file is not UTF-8 (often it is Latin-1 or Windows-1252): convert it, e.g. "
            f"`iconv -f latin1 -t utf-8 {path} > {path.with_name(path.stem + '.utf8' + path.suffix)}`")


def _check_bom(head: bytes, path: Path) -> int:
    """Bytes to skip at the start: a UTF-8 byte-order mark is harmless; UTF-16 is an error."""
    if head.startswith((b"\xff\xfe", b"\xfe\xff")):
        raise DataError(f"{path}: the file is UTF-16 (as Windows PowerShell writes it), not UTF-8; convert it, e.g. "
                        f"`iconv -f utf-16 -t utf-8 {path} > {path.with_name(path.stem + '.utf8' + path.suffix)}`")
    return 3 if head.startswith(b"\xef\xbb\xbf") else 0


def _decode_line(raw: bytes, path: Path, lineno: int) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        column = len(raw[:exc.start].decode("utf-8", errors="replace")) + 1
        raise DataError(f"{path}:{lineno}: byte 0x{raw[exc.start]:02x} at column {column} is not valid UTF-8; "
                        f"{_iconv_hint(path)}") from None


def _first_byte(path: Path) -> bytes:
    with open(path, "rb") as f:
        head = f.read(4096)
    head = head[_check_bom(head, path):].lstrip()
    return head[:1]


def text_lines(path: str | Path) -> Iterator[tuple[int, str]]:
    """(line number, decoded line with its ending) of a text file, never holding more than one line
    (at most the record limit) in memory; bad bytes are an error naming the line and the fix."""
    path = resolve_data_path(path)
    limit = max_record_bytes()
    with open(path, "rb") as f:
        f.read(_check_bom(f.peek(4)[:4], path))
        lineno = 0
        while raw := f.readline(limit + 1):
            lineno += 1
            if len(raw) > limit and not raw.endswith(b"\n"):
                raise DataError(f"{path}:{lineno}: the line is over the {limit / 2**20:g} MB limit for one record "
                                "(not read further); a file with one huge line is usually a JSON array or a "
                                "broken export: write one record per line, or raise PLUGTUNE_MAX_RECORD_MB")
            yield lineno, _decode_line(raw, path, lineno)


# ---------------------------------------------------------------- JSON Lines and JSON


def _read_jsonl(path: Path) -> Iterator[Located]:
    seen = False
    for lineno, line in text_lines(path):
        if not line.strip():
            continue
        if not seen and line.lstrip().startswith("["):
            raise DataError(f"{path}:{lineno}: this file holds a JSON array, not JSON Lines; name it .json, or "
                            "write one JSON object per line")
        seen = True
        try:
            record = json.loads(line.rstrip("\r\n"))
        except json.JSONDecodeError as exc:
            raise DataError(f"{path}:{lineno}: not valid JSON at column {exc.pos + 1} ({exc.msg}); each line of a "
                            ".jsonl file must be one complete JSON object (pretty-printed JSON belongs in a "
                            ".json file)") from None
        yield f"{path}:{lineno}", record


def _read_json(path: Path) -> Iterator[Located]:
    data = path.read_bytes()
    data = data[_check_bom(data[:4], path):]
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        column = exc.start - (data.rfind(b"\n", 0, exc.start) + 1) + 1
        raise DataError(f"{path}:{line}: byte 0x{data[exc.start]:02x} at column {column} is not valid UTF-8; "
                        f"{_iconv_hint(path)}") from None
    del data  # the text alone from here on
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        if exc.msg == "Extra data" and text.lstrip().startswith("{"):
            raise DataError(f"{path}:{exc.lineno}: several JSON objects one after another: this is JSON Lines; "
                            "name it .jsonl (or wrap the objects in one [...] array)") from None
        raise DataError(f"{path}:{exc.lineno}: not valid JSON at column {exc.colno} ({exc.msg}); the file is cut "
                        "short or malformed: repair it or export it again") from None
    if not isinstance(value, list):
        hint = ""
        if isinstance(value, dict):
            lists = [k for k, v in value.items() if isinstance(v, list)]
            hint = f" (it is one object; are the records under '{lists[0]}'? save that list alone)" if lists else ""
        raise DataError(f"{path}: a .json data file must hold one array of records, got a "
                        f"{type(value).__name__}{hint}")
    for i, record in enumerate(value):
        yield f"{path} record {i}", record


# ---------------------------------------------------------------- tables


_JSON_LIST_COLUMNS = ("messages", "conversations")  # always lists of turns
_MAYBE_TURNS = ("prompt", "chosen", "rejected", "completion")  # a string, or a list of turns
_LOOKS_LIKE_TURNS = re.compile(r"\s*\[\s*\{")


def _table_value(key: str, value: Any, where: str) -> Any:
    """Turn a JSON string in a message column into its list of turns."""
    if not isinstance(value, str):
        return value
    if key in _JSON_LIST_COLUMNS:
        try:
            return json.loads(value)
        except json.JSONDecodeError as exc:
            raise DataError(f"{where}: column '{key}' must hold a JSON list of turns, e.g. "
                            f"[{{\"role\": \"user\", \"content\": \"hi\"}}] (not valid JSON at column {exc.colno}: "
                            f"{exc.msg})") from None
    if key in _MAYBE_TURNS and _LOOKS_LIKE_TURNS.match(value):
        try:
            turns = json.loads(value)
        except json.JSONDecodeError:
            return value  # text that merely starts like a list
        if isinstance(turns, list) and all(isinstance(t, dict) for t in turns):
            return turns
    return value


def _csv_cell(key: str, cell: str, where: str) -> Any:
    if cell == "":
        return None  # CSV cannot tell an empty cell from a missing value
    if key == "label" and cell.strip().lower() in ("true", "false", "1", "0", "yes", "no"):
        return cell.strip().lower() in ("true", "1", "yes")
    if key == "margin":
        try:
            return float(cell)
        except ValueError:
            return cell  # parse_preference names the field and the type
    return _table_value(key, cell, where)


def _read_csv(path: Path) -> Iterator[Located]:
    last_line = 0

    def lines() -> Iterator[str]:
        nonlocal last_line
        for last_line, line in text_lines(path):
            yield line

    old_limit = csv.field_size_limit(max_record_bytes())  # the default, 128 KB, is smaller than some answers
    try:
        reader = csv.reader(lines(), delimiter="\t" if path.suffix.lower() == ".tsv" else ",", strict=True)
        header = next(reader, None)
        if not header or not any(h.strip() for h in header):
            raise DataError(f"{path}: no header row; the first line must name the columns (e.g. prompt,completion)")
        header = [h.strip() for h in header]
        if len(set(header)) != len(header):
            twice = sorted({h for h in header if header.count(h) > 1})
            raise DataError(f"{path}:1: the header names column(s) {', '.join(map(repr, twice))} twice; rename them")
        start = last_line + 1
        for row in reader:
            where = f"{path}:{start}"
            if row and len(row) != len(header):
                raise DataError(f"{where}: {len(row)} cells but the header has {len(header)} columns; quote cells "
                                "that contain the delimiter or a line break (\"like, this\")")
            if row:
                yield where, {k: _csv_cell(k, cell, where) for k, cell in zip(header, row)}
            start = last_line + 1
    except csv.Error as exc:
        raise DataError(f"{path}:{last_line}: not valid CSV ({exc})") from None
    finally:
        csv.field_size_limit(old_limit)


def _optional(module: str, extra: str, path: Path, what: str):
    try:
        return importlib.import_module(module)
    except ImportError:
        raise DataError(f"{path}: reading {what} needs the optional package '{module.split('.')[0]}': "
                        f"pip install 'plugtune[{extra}]'") from None


def _read_parquet(path: Path) -> Iterator[Located]:
    pq = _optional("pyarrow.parquet", "parquet", path, "Parquet files")
    try:
        table = pq.ParquetFile(path)
    except Exception as exc:  # pyarrow raises ArrowInvalid / OSError subclasses, with its own message
        raise DataError(f"{path}: not a readable Parquet file ({exc}); re-export it (e.g. pandas' "
                        "DataFrame.to_parquet) or use JSONL") from None
    row = 0
    for batch in table.iter_batches(batch_size=1024):
        for record in batch.to_pylist():
            where = f"{path} row {row}"
            yield where, {k: _table_value(k, v, where) for k, v in record.items()}
            row += 1


def _read_saved_dataset(path: Path, split: str | None) -> Iterator[Located]:
    if (path / "dataset_dict.json").is_file():
        splits = json.loads((path / "dataset_dict.json").read_text()).get("splits", [])
        if split is None and len(splits) != 1:
            raise DataError(f"{path}: a DatasetDict with splits {', '.join(splits)}; pass one split's directory, "
                            f"e.g. {path / (splits[0] if splits else 'train')}")
        split = split if split is not None else splits[0]
        if split not in splits:
            raise DataError(f"{path}: no split '{split}' (splits: {', '.join(splits)})")
        path = path / split
    elif split is not None:
        raise DataError(f"{path}: split={split!r} given, but this is not a DatasetDict directory")
    if not ((path / "state.json").is_file() and (path / "dataset_info.json").is_file()):
        raise DataError(f"{path}: a directory, not a data file; pass a .jsonl, .json, .csv or .parquet file, or a "
                        "directory written by datasets' save_to_disk (it holds state.json and dataset_info.json)")
    datasets = _optional("datasets", "datasets", path, "a dataset saved with save_to_disk")
    try:
        ds = datasets.load_from_disk(str(path))
    except Exception as exc:  # datasets' own errors (a missing .arrow file, a version mismatch)
        raise DataError(f"{path}: cannot load the saved dataset ({exc}); save it again with "
                        "Dataset.save_to_disk") from None
    for i, record in enumerate(ds):
        where = f"{path} row {i}"
        yield where, {k: _table_value(k, v, where) for k, v in record.items()}


_READERS = {".jsonl": _read_jsonl, ".ndjson": _read_jsonl, ".json": _read_json, ".csv": _read_csv,
            ".tsv": _read_csv, ".parquet": _read_parquet}
