"""Generic parsing of mappings (YAML, JSON) into typed dataclasses: strict keys with a nearest-key
suggestion, and values checked against the annotations.

A leaf module: the run config (config.py) and the adapter registry (adapters/registry.py) both use it,
so neither needs to import the other.
"""
from __future__ import annotations

import dataclasses
import difflib
import math
import types
import typing
from pathlib import Path
from typing import Any

import yaml


class ConfigError(ValueError):
    """A config file or override that does not fit the schema."""


def _suggest(key: str, valid: list[str]) -> str:
    close = difflib.get_close_matches(key, valid, n=1, cutoff=0.5)
    hint = f" Did you mean '{close[0]}'?" if close else ""
    return f"{hint} Valid keys: {', '.join(sorted(valid))}."


def _key(where: str, key: Any) -> str:
    """'config' + 'training' -> 'config.training'; a file name is followed by a colon: 'run.yaml: training'."""
    return f"{where}: {key}" if where.endswith((".yaml", ".yml", ".json")) else f"{where}.{key}"


def _got(value: Any) -> str:
    if value is None:
        return "null (this key needs a value)"
    text = repr(value) if len(repr(value)) <= 80 else repr(value)[:77] + "..."
    return f"{text} (a {type(value).__name__})" if isinstance(value, (str, list, tuple, dict)) else text


def _coerce(value: Any, tp: Any, where: str) -> Any:
    """Check/convert one YAML value to the annotated field type."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None:
            return None
        if isinstance(value, str) and str in args:
            return value
        listy = [a for a in args if typing.get_origin(a) in (list, tuple)]
        if isinstance(value, (list, tuple)) and listy:
            return _coerce(value, listy[0], where)
        return _coerce(value, args[0], where)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping of keys (a section), got {_got(value)}")
        return from_dict(tp, value, where)
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no", "1", "0"):
            return value.lower() in ("true", "yes", "1")
        raise ConfigError(f"{where}: expected true/false, got {_got(value)}")
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or int(value) != value:
            raise ConfigError(f"{where}: expected an integer, got {_got(value)}")
        return int(value)
    if tp is float:
        if isinstance(value, str):  # YAML 1.1 reads '1e-4' (no dot) as a string
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where}: expected a number, got {_got(value)}")
        if not math.isfinite(value):
            raise ConfigError(f"{where}: expected a finite number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, (str, int, float)) or isinstance(value, bool):
            raise ConfigError(f"{where}: expected a string, got {_got(value)}")
        return str(value)
    if origin in (list, tuple):
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {_got(value)}")
        args = typing.get_args(tp)
        if origin is tuple and args and args[-1] is not Ellipsis:  # tuple[float, float]: exactly two
            if len(value) != len(args):
                raise ConfigError(f"{where}: expected a list of {len(args)} values, got {_got(value)}")
            return tuple(_coerce(v, a, f"{where}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
        inner = args[0] if args else Any
        items = [_coerce(v, inner, f"{where}[{i}]") if inner is not Any else v for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin is dict:
        if value is None:  # `adapter: null` (e.g. to clear it from the command line) means empty
            return {}
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping of keys, got {_got(value)}")
        _, inner = typing.get_args(tp) or (str, Any)
        if dataclasses.is_dataclass(inner):  # e.g. adapters: {name: TaskConfig}
            return {str(k): _coerce(v if v is not None else {}, inner, _key(where, k)) for k, v in value.items()}
    return value  # Any / dict of plain values: taken as is, checked by whoever consumes it


def from_dict(cls: type, data: dict[str, Any], where: str = "config") -> Any:
    """Build dataclass `cls` from a mapping; unknown keys are an error naming the nearest valid key."""
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in data.items():
        if key not in names:
            raise ConfigError(f"{where}: unknown key '{key}'.{_suggest(str(key), names)}")
        kwargs[key] = _coerce(value, hints[key], _key(where, key))
    try:
        return cls(**kwargs)
    except (ValueError, TypeError) as exc:  # a dataclass's own checks in __post_init__ (e.g. LoRA's r >= 1)
        if isinstance(exc, ConfigError):
            raise
        raise ConfigError(f"{where}: {exc}") from exc


def to_dict(obj: Any) -> dict[str, Any]:
    return dataclasses.asdict(obj)


def read_yaml_mapping(path: Path) -> dict[str, Any]:
    """A YAML file whose top level is a mapping (an empty file is {}); a clear error otherwise."""
    try:
        data = yaml.safe_load(Path(path).read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of sections")
    return data
