"""The Train form: built from the run config, checked by the CLI's own checker.

The page posts field values (strings); they become the same `key=value` overrides `plugtune train
CONFIG key=value ...` takes, applied to a shipped config (or a pipeline), and `load_run_config` /
`load_pipeline` (plugtune.config, plugtune.training.pipeline) checks them exactly as the CLI would. A
ConfigError is put beside the field whose key it names; paths (data files) must lie inside the data
directories. The result is a YAML file the worker runs with `plugtune train`'s own code path.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from plugtune.adapters.registry import available_methods
from plugtune.config import ConfigError, apply_overrides, load_run_config, resolve_config_path, shipped_configs
from plugtune.schema import read_yaml_mapping
from plugtune.training.pipeline import is_pipeline, load_pipeline
from plugtune.training.recipes import RECIPES
from plugtune.ui.paths import UIPathError, confine

RUN_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,63}$")
ADAPTER_KEYS = ("adapter.r", "adapter.alpha", "adapter.dropout", "adapter.target_modules")


@dataclass
class Field:
    key: str  # a dotted run-config key, or one of the form's own: name, config, overrides
    label: str
    kind: str = "text"  # text | number | select | textarea
    default: str = ""
    options: list[str] = field(default_factory=list)
    help: str = ""


def form_fields(model: str) -> list[dict]:
    """The form's fields; blank ones keep the chosen config's value."""
    configs = [c for c in shipped_configs() if not c.startswith("compare")]
    fields = [
        Field("name", "Run name", help="the run's directory under the runs directory (new)"),
        Field("config", "Start from config", "select", "lora_sft", configs,
              "a shipped run config (or pipeline); the fields below override it"),
        Field("model.name", "Base model", default=model, help="built-in name or local model directory"),
        Field("method", "Method", "select", "lora", ["full", *available_methods()]),
        Field("adapter.r", "Adapter r (rank)", "number", help="blank: the config's"),
        Field("adapter.alpha", "Adapter alpha", "number"),
        Field("adapter.dropout", "Adapter dropout", "number"),
        Field("adapter.target_modules", "Target modules", help="e.g. all-linear or [q_proj, v_proj]"),
        Field("objective", "Objective", "select", "sft", list(RECIPES)),
        Field("data.train", "Training data", help="a JSONL file in a data directory, or plugtune:skills/<skill>_train.jsonl"),
        Field("data.eval", "Eval data", help="optional"),
        Field("data.max_length", "Max length (tokens)", "number"),
        Field("training.max_steps", "Budget: optimizer steps", "number", "20", help="0: the config's epochs"),
        Field("training.batch_size", "Batch size", "number"),
        Field("training.lr", "Learning rate", "number"),
        Field("training.save_every", "Checkpoint every N steps", "number", "1"),
        Field("training.keep_checkpoints", "Checkpoints kept", "number", "0", help="0: keep every checkpoint"),
        Field("training.eval_every", "Evaluate every N steps", "number", help="0: at the end"),
        Field("training.seed", "Seed", "number"),
        Field("overrides", "More overrides", "textarea",
              help="one key=value per line, as on the command line (e.g. training.warmup_steps=2)"),
    ]
    return [vars(f) for f in fields]


class FormErrors(ValueError):
    def __init__(self, fields: dict[str, str]):
        super().__init__("; ".join(f"{k}: {v}" for k, v in fields.items()))
        self.fields = fields


@dataclass
class TrainRequest:
    name: str
    run_dir: Path
    config: dict  # the full mapping, written as the run's YAML
    pipeline: bool


def _field_of(message: str, keys: list[str]) -> str:
    """The form field a ConfigError message is about (the longest key it names), else 'overrides'."""
    m = re.search(r"adapter \((\w+)\)\.(\w+)", message)
    if m and f"adapter.{m.group(2)}" in keys:
        return f"adapter.{m.group(2)}"
    if message.startswith(("adapter (", "unknown method")):
        return "method" if message.startswith("unknown method") else "overrides"
    found = [k for k in keys if re.search(rf"(^|[\s:'\"]){re.escape(k)}\b", message)]
    return max(found, key=len) if found else "overrides"


def _data_path(value: str, data_dirs: list[Path], key: str) -> str:
    if value.startswith("plugtune:"):
        return value
    try:
        path = confine(value, data_dirs, key)
    except UIPathError as exc:
        raise FormErrors({key: str(exc)}) from None
    if not path.is_file():
        raise FormErrors({key: f"no such file: {value} (in {', '.join(map(str, data_dirs))})"})
    return str(path)


def check_train_form(form: dict, runs_dir: Path, data_dirs: list[Path]) -> TrainRequest:
    """The form's values -> a checked run config; FormErrors maps fields to messages."""
    form = {k: str(v).strip() for k, v in form.items() if v is not None}
    keys = [f["key"] for f in form_fields("")]
    unknown = sorted(set(form) - set(keys))
    if unknown:
        raise FormErrors({"overrides": f"unknown form fields: {', '.join(unknown)}"})
    name = form.get("name", "")
    if not RUN_NAME.match(name):
        raise FormErrors({"name": "give the run a name: 1-64 letters, digits, '_', '-' or '.', starting with a letter "
                                  "or digit"})
    run_dir = confine(name, [runs_dir], "run name")
    if run_dir.exists():
        raise FormErrors({"name": f"a run named '{name}' exists already: pick another name, or open it on the Runs "
                                  "page to resume or continue it"})
    config = form.get("config") or "lora_sft"
    try:
        config_path = resolve_config_path(config)
    except ConfigError as exc:
        raise FormErrors({"config": str(exc)}) from None
    pipeline = is_pipeline(config_path)
    overrides: list[str] = []
    method = form.get("method", "")
    for key in keys:
        value = form.get(key, "")
        if key in ("name", "config", "overrides") or not value:
            continue
        if key in ADAPTER_KEYS and method == "full":
            continue
        if key in ("data.train", "data.eval"):
            value = _data_path(value, data_dirs, key)
        overrides.append(f"{key}={value}")
    for i, line in enumerate(form.get("overrides", "").splitlines()):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if "=" not in line:
            raise FormErrors({"overrides": f"line {i + 1} {line!r} is not key=value"})
        if line.split("=", 1)[0].strip().startswith("output."):
            raise FormErrors({"overrides": "output.* is set by the page (the run name picks output.dir)"})
        overrides.append(line)
    overrides.append(f"output.dir={run_dir}")
    try:
        if pipeline:
            load_pipeline(config_path, overrides)
        else:
            load_run_config(config_path, overrides)
    except ConfigError as exc:
        message = str(exc).replace(f"{config_path}: ", "")
        raise FormErrors({_field_of(message, keys): message}) from None
    except (ValueError, KeyError, OSError) as exc:
        raise FormErrors({"overrides": str(exc)}) from None
    data = apply_overrides(read_yaml_mapping(config_path), overrides)
    return TrainRequest(name, run_dir, data, pipeline)


def write_config(path: Path, config: dict) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(yaml.safe_dump(config, sort_keys=False))
    tmp.replace(path)
    return path
