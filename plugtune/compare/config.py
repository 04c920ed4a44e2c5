"""The configuration of `plugtune compare` (see compare/runner.py): which methods, under which budget, on which
data, evaluated how; YAML -> typed dataclasses with strict keys (plugtune.schema), checked up front so an
error names the method row before anything trains; and the run configs each method trains with.
"""
from __future__ import annotations

import copy
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from plugtune.adapters.registry import get_method
from plugtune.config import (RunConfig, TrainingConfig, apply_overrides, resolve_config_path,
                             validate_run_config)
from plugtune.schema import ConfigError, from_dict, read_yaml_mapping

_BUDGET_KEYS = ("max_steps", "epochs", "batch_size", "grad_accum")  # shared by all methods: set in `budget`


@dataclass
class MethodSpec:
    """One row of the report: a method trained on the base's data under the shared budget."""

    name: str = ""  # row label and run directory (a YAML row without one is named after its method)
    method: str = "lora"  # full | a registered adapter method (lora, ia3, bottleneck, prompt_tuning, ...)
    adapter: dict[str, Any] = field(default_factory=dict)  # the method's own keys (replace the base's)
    lr: float = 0.0  # 0: the base config's training.lr
    training: dict[str, Any] = field(default_factory=dict)  # other training keys (warmup_steps, weight_decay, ...)
    family: str = ""  # qualitative group; "": full fine-tuning for method=full, else adapters
    note: str = ""  # printed in the report's notes


@dataclass
class BudgetSpec:
    """What every method gets: a number of optimizer steps, or a wall-clock time each."""

    max_steps: int = 0
    seconds: float = 0.0  # > 0: each method trains for about this long (steps from a timed calibration)
    calibration_steps: int = 3  # timed steps per method when `seconds` is set (the first one is not counted)
    batch_size: int = 16
    grad_accum: int = 1


@dataclass
class SweepSpec:
    """Quality against the number of distinct training examples: the first N of the training file."""

    sizes: list[int | str] = field(default_factory=list)  # e.g. [50, 200, all]; [] = no sweep
    methods: list[str] = field(default_factory=list)  # row names that get the sweep
    max_steps: int = 0  # 0: the method's main steps (the `all` point is then the main run itself)


@dataclass
class EvalSpec:
    data: str = ""  # held-out file; "" = the base config's data.eval
    n: int = 100  # held-out examples: greedy exact match and loss on the answers
    max_new_tokens: int = 16
    batch_size: int = 16
    samples: int = 3  # sample answers kept per row


@dataclass
class RetentionSpec:
    """Forgetting: loss on general text the task never trains, before (the base) and after."""

    source: str = "chatterbot"  # chatterbot (chatterbot-corpus conversations) | none | a data file
    n: int = 64
    max_length: int = 256


@dataclass
class SFTThenDPOSpec:
    """SFT -> DPO: the SFT row `after`, folded into the base, then a DPO adapter on pairs built from the
    task: chosen = the reference answer, rejected = the SFT model's own wrong greedy answer (or, where
    it is right or `rejected: perturbed`, the reference with one character changed)."""

    after: str = ""  # the name of the SFT row to start from; "" = no SFT -> DPO row
    name: str = "SFT → DPO"
    pairs: int = 64  # the first N training prompts become pairs
    rejected: str = "model"  # model | perturbed
    method: str = "lora"
    adapter: dict[str, Any] = field(default_factory=lambda: {"r": 8, "alpha": 16})
    lr: float = 5e-4
    max_steps: int = 8
    batch_size: int = 8  # pairs per step
    dpo: dict[str, Any] = field(default_factory=dict)  # DPO keys (loss, beta, ...)


@dataclass
class CompareConfig:
    base: dict[str, Any] = field(default_factory=dict)  # a run config (model, data, training); YAML: or its name
    methods: list[MethodSpec] = field(default_factory=list)
    budget: BudgetSpec = field(default_factory=BudgetSpec)
    data_sweep: SweepSpec = field(default_factory=SweepSpec)
    eval: EvalSpec = field(default_factory=EvalSpec)
    retention: RetentionSpec = field(default_factory=RetentionSpec)
    sft_then_dpo: SFTThenDPOSpec = field(default_factory=SFTThenDPOSpec)
    seeds: int = 1  # each run repeated with training seeds seed, seed+1, ...: figures are the mean +- spread
    isolate: bool = True  # each main run in its own process: honest peak memory (see the module docstring)
    keep_checkpoints: bool = False  # False: delete checkpoints/ (optimizer state) and data-sweep artifacts
    out: str = "runs/compare"
    title: str = ""


# ---------------------------------------------------------------- config


COMPARE_CONFIGS = Path(__file__).parent.parent / "configs" / "compare"  # apart from the run configs


def shipped_compare_configs() -> list[str]:
    return sorted(p.stem for p in COMPARE_CONFIGS.glob("*.yaml"))


def resolve_compare_config(path: str | Path) -> Path:
    p = Path(path)
    if p.is_file():
        return p
    shipped = COMPARE_CONFIGS / (p.name if p.suffix else p.name + ".yaml")
    if p.stem in shipped_compare_configs():
        return shipped
    raise ConfigError(f"compare config '{path}' not found (shipped: {', '.join(shipped_compare_configs())})")


def load_compare_config(path: str | Path | None = None, overrides: list[str] | None = None) -> CompareConfig:
    """YAML (a file or a shipped name) + `a.b=c` overrides -> a validated CompareConfig. `base` may name
    a run config (e.g. demo_lora); it is read first, so `base.training.lr=...` overrides work on it."""
    raw: dict[str, Any] = {}
    where = "compare config"
    if path is not None:
        file = resolve_compare_config(path)
        where = str(file)
        raw = read_yaml_mapping(file)
    overrides = list(overrides or [])
    raw = apply_overrides(raw, [o for o in overrides if o.split("=", 1)[0].strip() == "base"])
    if isinstance(raw.get("base"), str):
        run_file = resolve_config_path(raw["base"])
        raw["base"] = yaml.safe_load(run_file.read_text()) or {}
    raw = apply_overrides(raw, [o for o in overrides if o.split("=", 1)[0].strip() != "base"])
    for spec in raw.get("methods") or []:  # a row is named after its method unless named
        if isinstance(spec, dict) and not spec.get("name"):
            spec["name"] = spec.get("method", "lora")
    cfg = from_dict(CompareConfig, raw, where=where)
    validate_compare_config(cfg)
    return cfg


def validate_compare_config(cfg: CompareConfig) -> None:
    try:
        base = from_dict(RunConfig, cfg.base, where="base")
        validate_run_config(base)
    except ConfigError as exc:
        raise ConfigError(f"base: {exc}" if not str(exc).startswith("base") else str(exc)) from exc
    if base.objective != "sft" or base.adapters:
        raise ConfigError("base: compare trains each method with next-token loss on one data set; use a run config "
                          "with objective sft and no `adapters:` section (SFT -> DPO is the `sft_then_dpo` section)")
    if not base.data.train:
        raise ConfigError("base.data.train is not set: the task's training file")
    if not (cfg.eval.data or base.data.eval):
        raise ConfigError("eval.data is not set and base.data.eval is empty: give a held-out file")
    if not cfg.methods:
        raise ConfigError("methods is empty: list the methods to compare, e.g. [{name: lora, method: lora}]")
    b = cfg.budget
    if (b.max_steps > 0) == (b.seconds > 0):
        raise ConfigError("budget: set exactly one of max_steps (steps for every method) or seconds (training time "
                          f"for every method); got max_steps={b.max_steps}, seconds={b.seconds}")
    if b.batch_size < 1 or b.grad_accum < 1 or b.calibration_steps < 2:
        raise ConfigError("budget: batch_size and grad_accum must be >= 1, calibration_steps >= 2")
    names = []
    for i, spec in enumerate(cfg.methods):
        if not spec.name:
            raise ConfigError(f"methods[{i}]: give the row a name")
        if slug(spec.name) in map(slug, names):
            raise ConfigError(f"methods[{i}]: two methods are named '{spec.name}' (or the same but for punctuation, "
                              "which names their run directories); give each a distinct name")
        names.append(spec.name)
        shared = [k for k in spec.training if k in _BUDGET_KEYS]
        if shared:
            raise ConfigError(f"methods[{i}] ({spec.name}).training sets {', '.join(shared)}: the budget is shared; "
                              "set it in the `budget` section")
        try:
            method_run_config(cfg, spec, steps=1, out_dir="unused")
        except ConfigError as exc:
            raise ConfigError(f"methods[{i}] ({spec.name}): {exc}") from exc
    s = cfg.data_sweep
    for size in s.sizes:
        if size != "all" and not (isinstance(size, int) and size >= 1):
            raise ConfigError(f"data_sweep.sizes: {size!r} is neither a positive number of examples nor 'all'")
    unknown = [m for m in s.methods if m not in names]
    if unknown:
        raise ConfigError(f"data_sweep.methods: no method named {', '.join(unknown)} (methods: {', '.join(names)})")
    d = cfg.sft_then_dpo
    if d.after:
        if d.after not in names:
            raise ConfigError(f"sft_then_dpo.after: no method named '{d.after}' (methods: {', '.join(names)})")
        if slug(d.name) in map(slug, names):
            raise ConfigError(f"sft_then_dpo.name '{d.name}' is also a method's name; give the row another")
        sft = cfg.methods[names.index(d.after)]
        if sft.method != "full" and not get_method(sft.method).can_merge:
            raise ConfigError(f"sft_then_dpo.after={d.after}: {sft.method} adapters cannot be folded into the base, "
                              "which the DPO stage starts from; choose a full, LoRA, DoRA or IA3 row")
        if d.rejected not in ("model", "perturbed"):
            raise ConfigError(f"sft_then_dpo.rejected={d.rejected!r} is not one of model, perturbed")
        if min(d.pairs, d.max_steps, d.batch_size) < 1:
            raise ConfigError("sft_then_dpo: pairs, max_steps and batch_size must be >= 1")
        try:
            dpo_run_config(cfg, "pairs.jsonl", "unused")
        except ConfigError as exc:
            raise ConfigError(f"sft_then_dpo: {exc}") from exc
    if cfg.eval.n < 1 or cfg.retention.n < 0:
        raise ConfigError("eval.n must be >= 1 and retention.n >= 0")
    if cfg.seeds < 1:
        raise ConfigError(f"seeds={cfg.seeds}: give the number of seeds per run, >= 1")


def check_budget_fits(cfg: CompareConfig, n_train: int, n_heldout: int) -> None:
    """The budget against the data, before anything trains: a batch larger than the training set, a sweep
    size smaller than one batch or larger than the training set, more held-out items than the file has."""
    b, batch = cfg.budget, cfg.budget.batch_size * cfg.budget.grad_accum
    if batch > n_train:
        raise ConfigError(f"budget: batch_size x grad_accum = {batch} examples per step, but the training file has "
                          f"only {n_train}: lower budget.batch_size (or give more training data)")
    for size in cfg.data_sweep.sizes:
        if size == "all":
            continue
        if size > n_train:
            raise ConfigError(f"data_sweep.sizes: {size} examples, but the training file has only {n_train}: "
                              f"use a size <= {n_train}, or 'all'")
        if size < b.batch_size:
            raise ConfigError(f"data_sweep.sizes: {size} examples is less than one batch ({b.batch_size}): every "
                              f"batch would repeat examples within a step; use sizes >= {b.batch_size} or a smaller "
                              "budget.batch_size")
    if cfg.eval.n > n_heldout:
        raise ConfigError(f"eval.n={cfg.eval.n}, but the held-out file has only {n_heldout} examples: lower eval.n")


def method_run_config(cfg: CompareConfig, spec: MethodSpec, steps: int, out_dir: str | Path,
                      train_file: str | None = None, seed_offset: int = 0):
    """The run config of one method: the base, the method's keys, the shared budget; evaluation is
    compare's own (data.eval off), no resume, no progress bar."""
    raw = copy.deepcopy(cfg.base)
    raw.update(method=spec.method, adapter=dict(spec.adapter), objective="sft")
    raw["data"] = {**raw.get("data", {}), "eval": "", **({"train": train_file} if train_file else {})}
    from_dict(TrainingConfig, spec.training, where="training")  # an unknown key is named here, not in the merged dict
    training = {**raw.get("training", {}), **spec.training, "max_steps": steps, "batch_size": cfg.budget.batch_size,
                "grad_accum": cfg.budget.grad_accum, "progress": False, "eval_every": 0, "save_every": 0}
    if spec.lr:
        training["lr"] = spec.lr
    training["seed"] = training.get("seed", 0) + seed_offset
    raw["training"] = training
    raw["output"] = {**raw.get("output", {}), "dir": str(out_dir), "resume": "never"}
    run = from_dict(RunConfig, raw, where="config")
    validate_run_config(run)
    return run


def dpo_run_config(cfg: CompareConfig, pairs_file: str | Path, out_dir: str | Path, model_name: str | None = None,
                   seed_offset: int = 0):
    d = cfg.sft_then_dpo
    raw = copy.deepcopy(cfg.base)
    raw.update(objective="dpo", method=d.method, adapter=dict(d.adapter), dpo=dict(d.dpo))
    raw["data"] = {**raw.get("data", {}), "train": str(pairs_file), "eval": "", "format": "auto"}
    if raw["data"].get("packing") is True:  # packing is for SFT; pairs share their prompt their own way
        raw["data"]["packing"] = "auto"
    if model_name:
        raw["model"] = {**raw.get("model", {}), "name": model_name}
    raw["training"] = {**raw.get("training", {}), "max_steps": d.max_steps, "batch_size": d.batch_size,
                       "grad_accum": 1, "lr": d.lr, "progress": False, "eval_every": 0, "save_every": 0,
                       "seed": raw.get("training", {}).get("seed", 0) + seed_offset}
    raw["output"] = {**raw.get("output", {}), "dir": str(out_dir), "resume": "never"}
    run = from_dict(RunConfig, raw, where="config")
    validate_run_config(run)
    return run


def family_of(spec: MethodSpec) -> str:
    return spec.family or ("full fine-tuning" if spec.method == "full" else "adapters")


def slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("_") or "run"
