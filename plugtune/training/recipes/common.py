"""What the recipes share: the `Setup` each recipe's `prepare` returns to run.py, the policy (an
adapter or every weight) and how it is saved, and preference pairs read and batched once for DPO and
the reward model. run.py imports the recipes; a recipe never imports run.py.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable

from plugtune.adapters import attach_adapter, load_adapter, read_adapter_config, save_adapter
from plugtune.adapters.layers import adapter_state, set_active_adapters
from plugtune.adapters.registry import method_from_saved
from plugtune.data.formats import DataError
from plugtune.data.batching import batch_indices
from plugtune.data.preference import TokenizedPair, load_preferences, tokenize_preferences
from plugtune.models.loading import LoadedModel, load_base
from plugtune.training.engine.types import BatchSource, IndexedBatches, Objective, ParamGroup

if TYPE_CHECKING:
    from plugtune.training.config import RunConfig


@dataclass
class Setup:
    """Everything the loop needs for one objective, and how to write the result."""

    loaded: LoadedModel
    source: BatchSource
    save: Callable[[Path], Path]  # writes the artifact under the output dir, returns its path
    objective: Objective
    groups: list[ParamGroup] | None = None
    eval_batches: list | None = None
    summary: str = ""
    router_prompts: dict[str, list] | None = None  # multi-task: each adapter's training prompts (run.py fits the router)


REFERENCE = "reference"  # the adapter name of the frozen reference policy when a run continues an adapter


def prepare_model(cfg: RunConfig, loaded: LoadedModel | None = None) -> LoadedModel:
    """The base with the trainable policy: a fresh adapter named 'default', the saved adapter
    model.adapter to continue, or every weight (method=full)."""
    loaded = loaded or load_base(cfg.model.name, cfg.model.dtype, cfg.model.device, cfg.model.quantize)
    if cfg.method == "full":
        for p in loaded.model.parameters():
            p.requires_grad_(True)
    elif cfg.model.adapter:
        saved, _ = method_from_saved(read_adapter_config(cfg.model.adapter))
        if saved.name != cfg.method:
            raise ValueError(f"model.adapter={cfg.model.adapter} holds a {saved.name} adapter but method={cfg.method}: "
                             f"set method={saved.name} to continue it, or leave model.adapter empty")
        load_adapter(loaded.model, cfg.model.adapter, "default", trainable=True)  # continue training it
    else:
        attach_adapter(loaded.model, cfg.method, cfg.adapter, name="default", trainable=True)
    return loaded


def attach_reference(cfg: RunConfig, loaded: LoadedModel) -> str | None:
    """The reference policy of a run that continues an adapter (model.adapter): a frozen, inactive copy
    of that adapter on the same base (its own few weights, no second base), so DPO/PPO/GRPO measure the
    policy against where this stage started, as InstructGPT and Tülu take the SFT model as the
    reference. Returns its adapter name; None when the reference is the base (adapters off) or, for
    full fine-tuning, a frozen copy of the model (compute/reference.py)."""
    if cfg.method == "full" or not cfg.model.adapter:
        return None
    load_adapter(loaded.model, cfg.model.adapter, REFERENCE, trainable=False)
    for p in adapter_state(loaded.model, REFERENCE).values():
        p.requires_grad_(False)
    set_active_adapters(loaded.model, ["default"])
    return REFERENCE


def save_policy(cfg: RunConfig, loaded: LoadedModel, out: Path, name: str = "default") -> Path:
    """The trained weights: an adapter directory (PEFT format), or a full model directory."""
    if cfg.method == "full":
        artifact = out / "model"
        loaded.model.save_pretrained(artifact, safe_serialization=True)
        loaded.tokenizer.save_pretrained(artifact)
        return artifact
    return save_adapter(loaded.model, out / "adapter", name, base_name=cfg.model.name)


def read_pairs(path: str, tokenizer, cfg: RunConfig, max_prompt_length: int | None = None,
               limit: int = 0) -> tuple[list[TokenizedPair], str]:
    """Preference pairs of `path`, tokenized with data.max_length / data.overflow; (items, summary)."""
    fmt = cfg.data.format if cfg.data.format in ("paired", "implicit") else "auto"
    try:
        pairs = load_preferences(path, fmt)
    except DataError as exc:
        raise DataError(f"{exc} (objective={cfg.objective} trains on preference pairs)") from None
    if limit:
        pairs = pairs[:limit]
    items, stats = tokenize_preferences(tokenizer, pairs, cfg.data.max_length, max_prompt_length, cfg.data.overflow)
    if not items:
        raise ValueError(f"{path}: no usable pairs after tokenization ({stats.summary()})")
    return items, stats.summary()


def pair_source(items: list, cfg: RunConfig, collate: Callable[[list, int], dict], pad_id: int) -> IndexedBatches:
    """Micro-batch i holds the pairs of batch_indices(i) (seeded epochs; resumable by index)."""
    t = cfg.training

    def make_batch(i: int) -> dict:
        return collate([items[j] for j in batch_indices(len(items), i, t.batch_size, t.seed)], pad_id)

    return IndexedBatches(make_batch, len(items), t.batch_size, t.grad_accum, paired=True)


def pair_batches(items: list, batch_size: int, collate: Callable[[list, int], dict], pad_id: int) -> list[dict]:
    """Held-out pairs in order, `batch_size` a batch."""
    return [collate(items[i:i + batch_size], pad_id) for i in range(0, len(items), batch_size)]
