"""Multi-task adapter training: several adapters on one frozen base, each on its own dataset, in
shared mixed batches (adapters/mixed.py). PEFT's mixed batches are inference-only; here they train.

Why it equals training each adapter alone on the same rows:
- a row's forward only touches its own adapter, so its gradient reaches only that adapter;
- each adapter's loss is its summed token loss over *its own* supervised tokens in the accumulated
  step (the objective returns {adapter: summed loss}, units {adapter: tokens}; the loop divides
  key by key), not over the whole mixed batch;
- each adapter is its own parameter group and its own clipping group, so one adapter's large
  gradient never scales down another's update; AdamW's state is per parameter anyway.

    adapters:
      dates: {method: lora, adapter: {r: 16}, train: plugtune:skills/dates_train.jsonl}
      units: {method: ia3, train: plugtune:skills/units_train.jsonl, rows: 4}
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from plugtune.adapters import attach_adapter, get_method, save_adapter
from plugtune.adapters.layers import adapter_state, mark_trainable
from plugtune.adapters.mixed import mixed_adapters
from plugtune.data import IGNORE_INDEX, Tokenized, collate, load_examples, tokenize_dataset
from plugtune.data.batching import batch_indices
from plugtune.inference.routers import KINDS as ROUTER_KINDS
from plugtune.models.causal_lm import hidden_states, lm_head
from plugtune.models.loading import LoadedModel, load_base
from plugtune.schema import ConfigError
from plugtune.training.compute.logprobs import labelled_logps
from plugtune.training.engine.types import IndexedBatches, ParamGroup
from plugtune.training.recipes.common import Setup

if TYPE_CHECKING:
    from plugtune.training.config import RunConfig


@dataclass
class TaskConfig:
    """One adapter of a multi-task run (an entry of the `adapters:` section): its method and keys, and its own data."""

    method: str = "lora"
    adapter: dict[str, Any] = field(default_factory=dict)  # the method's parameters
    train: str = ""  # this adapter's training file
    eval: str = ""  # optional held-out file
    format: str = "auto"
    rows: int = 0  # rows of every micro-batch taken from this adapter's data; 0: an equal share of batch_size


@dataclass
class RouterConfig:
    """The `router:` section: the router run.py fits after a multi-task run (inference/router.py)."""

    build: bool = True  # build a router for the adapters (multi-task runs)
    kind: str = "minilm"  # hidden | minilm | hidden+minilm | arrow (inference/routers.py); minilm measured best
    max_prompts: int = 256  # training prompts per adapter used to fit it (trained kinds)
    shipped_negatives: bool = True  # general chat + confusable requests as the base's class, chat to calibrate
    false_route_rate: float = 0.01  # abstain threshold: about this share of calibration chat may reach an adapter


def check_config(cfg: RunConfig) -> None:
    if cfg.objective != "sft":
        raise ConfigError(f"objective={cfg.objective} trains one model or adapter; multi-task runs (adapters:) are SFT only")
    if cfg.adapter:
        raise ConfigError("a run has either one adapter (method + adapter) or several (adapters: {name: "
                          "{method, adapter, train, ...}}); move the top-level 'adapter' keys into each entry")
    for name, task in cfg.adapters.items():
        if task.method == "full":
            raise ConfigError(f"adapters.{name}.method=full: a multi-task run trains adapters on a frozen base")
        get_method(task.method).parse_config(task.adapter)
        if not task.train:
            raise ConfigError(f"adapters.{name}.train is not set: give each adapter its training file")
        if task.rows < 0:
            raise ConfigError(f"adapters.{name}.rows must be >= 0")
    if cfg.router.kind not in ROUTER_KINDS:
        raise ConfigError(f"router.kind={cfg.router.kind}: not a router kind ({', '.join(ROUTER_KINDS)})")
    if not 0 <= cfg.router.false_route_rate < 1:
        raise ConfigError("router.false_route_rate must be in [0, 1)")


@dataclass
class TaskData:
    name: str
    items: list[Tokenized]
    rows: int  # rows of every micro-batch
    seed: int


def mixed_task_batches(tasks: list[TaskData], grad_accum: int, pad_id: int) -> IndexedBatches:
    """Every micro-batch holds `rows` examples of each task, from each task's own shuffled stream;
    `adapter_names` says which adapter each row trains. Stateless (a function of the step); an epoch
    is one of the largest task."""
    empty = [t.name for t in tasks if not t.items or t.rows < 1]
    if empty:
        raise ValueError(f"adapters {empty} have no training examples or no rows per batch")

    def make_batch(index: int) -> dict:
        items, names = [], []
        for t in tasks:
            chosen = batch_indices(len(t.items), index, t.rows, t.seed)  # fewer than rows if the data is smaller
            items += [t.items[i] for i in chosen]
            names += [t.name] * len(chosen)
        return {**collate(items, pad_id), "adapter_names": names}

    # micro-batches per epoch = the largest task's items // its rows; IndexedBatches divides by grad_accum
    return IndexedBatches(make_batch, max(len(t.items) // t.rows for t in tasks), 1, grad_accum)


def task_batch(items: list[Tokenized], name: str, pad_id: int) -> dict:
    """A batch whose rows all belong to adapter `name` (e.g. its held-out data)."""
    return {**collate(items, pad_id), "adapter_names": [name] * len(items)}


class MultiTaskLMObjective:
    """Next-token cross-entropy per adapter on a mixed batch: {adapter: summed loss}, normalised by
    the loop with {adapter: supervised tokens}."""

    reports_perplexity = True

    def units(self, batch: dict) -> dict[str, int]:
        per_row = (batch["labels"][:, 1:] != IGNORE_INDEX).sum(1).tolist()
        units: dict[str, int] = {}
        for name, n in zip(batch["adapter_names"], per_row):
            units[name] = units.get(name, 0) + int(n)
        return units

    def __call__(self, model: nn.Module, batch: dict) -> tuple[dict[str, torch.Tensor], dict]:
        names = batch["adapter_names"]
        with mixed_adapters(model, names) as plan:
            hidden = hidden_states(model, batch["input_ids"], batch["attention_mask"])  # (B, T, C)
        targets = batch["labels"][:, 1:]  # (B, T-1)
        keep = targets != IGNORE_INDEX
        # The LM head at labelled positions only, chunked (as SFT): (N,) token losses.
        token_loss = -labelled_logps(lm_head(model), hidden[:, :-1][keep], targets[keep])
        rows = torch.arange(len(names), device=keep.device)[:, None].expand_as(keep)[keep]  # (N,) row of each token
        row_loss = token_loss.new_zeros(len(names)).index_add(0, rows, token_loss)  # (B,)
        return {name: row_loss.index_select(0, plan.rows(name)).sum() for name in plan.present}, {}


def attach_tasks(model: nn.Module, cfg: RunConfig) -> list[ParamGroup]:
    """Attach one fresh adapter per task; each is its own parameter and clipping group."""
    for name, task in cfg.adapters.items():
        attach_adapter(model, task.method, task.adapter, name=name, trainable=False)
    mark_trainable(model, list(cfg.adapters))
    return [ParamGroup(name, list(adapter_state(model, name).values()), clip_group=name) for name in cfg.adapters]


def task_rows(cfg: RunConfig) -> dict[str, int]:
    """Rows per micro-batch for each task: as configured, else an equal share of batch_size."""
    unset = [n for n, t in cfg.adapters.items() if not t.rows]
    left = cfg.training.batch_size - sum(t.rows for t in cfg.adapters.values())
    if unset and left < len(unset):
        raise ValueError(f"training.batch_size={cfg.training.batch_size} leaves no rows for adapters {unset}; "
                         "raise batch_size or set adapters.<name>.rows")
    share = {n: left // len(unset) + (1 if i < left % len(unset) else 0) for i, n in enumerate(unset)} if unset else {}
    return {n: t.rows or share[n] for n, t in cfg.adapters.items()}


def load_tasks(cfg: RunConfig, tokenizer) -> tuple[list[TaskData], list[dict], dict[str, list], list[str]]:
    """Tokenized training data per task, eval batches, training prompts per task (for the router), notes."""
    rows = task_rows(cfg)
    tasks, eval_batches, prompts, notes = [], [], {}, []
    for k, (name, task) in enumerate(cfg.adapters.items()):
        examples = load_examples(task.train, task.format, cfg.data.system_prompt)
        items, stats = tokenize_dataset(tokenizer, examples, cfg.data.max_length, cfg.data.overflow, cfg.data.train_on)
        if not items:
            raise ValueError(f"{task.train}: no usable examples for adapter '{name}' ({stats.summary()})")
        notes.append(f"{name}: {stats.summary()}")
        tasks.append(TaskData(name, items, rows[name], cfg.training.seed + 1009 * k))
        prompts[name] = [ex.prompt_messages() for ex in examples if ex.messages][: cfg.router.max_prompts]
        if task.eval:
            held_out = load_examples(task.eval, task.format, cfg.data.system_prompt)
            if cfg.data.eval_limit:
                held_out = held_out[: cfg.data.eval_limit]
            eval_items, _ = tokenize_dataset(tokenizer, held_out, cfg.data.max_length, cfg.data.overflow,
                                             cfg.data.train_on)
            bs = cfg.training.batch_size
            eval_batches += [task_batch(eval_items[i:i + bs], name, tokenizer.pad_token_id)
                             for i in range(0, len(eval_items), bs)]
    return tasks, eval_batches, prompts, notes


def save_tasks(model: nn.Module, cfg: RunConfig, out: Path) -> Path:
    """Each adapter to out/adapters/<name> (PEFT format); run.py fits the router beside them."""
    pool_dir = out / "adapters"
    for name in cfg.adapters:
        save_adapter(model, pool_dir / name, name, base_name=cfg.model.name)
    return pool_dir


def prepare(cfg: RunConfig, loaded: LoadedModel | None = None) -> Setup:
    loaded = loaded or load_base(cfg.model.name, cfg.model.dtype, cfg.model.device, cfg.model.quantize)
    tasks, eval_batches, prompts, notes = load_tasks(cfg, loaded.tokenizer)
    print("[plugtune] train data: " + "; ".join(notes))
    torch.manual_seed(cfg.training.seed)
    groups = attach_tasks(loaded.model, cfg)
    source = mixed_task_batches(tasks, cfg.training.grad_accum, loaded.tokenizer.pad_token_id)
    return Setup(loaded, source, lambda out: save_tasks(loaded.model, cfg, out), MultiTaskLMObjective(), groups,
                 eval_batches, "; ".join(notes), router_prompts=prompts)
