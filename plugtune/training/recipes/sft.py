"""Supervised fine-tuning: next-token loss on the labelled tokens of data.train (assistant turns by
default), one adapter or every weight, on padded, length-grouped or packed batches (data/packing.py).
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from plugtune.data import load_examples, tokenize_dataset
from plugtune.data.batching import batch_indices, grouped_batch_indices
from plugtune.data.packing import choose_layout
from plugtune.models.loading import LoadedModel, check_max_length, load_tokenizer
from plugtune.training.compute.next_token import CausalLMObjective
from plugtune.training.engine.types import IndexedBatches
from plugtune.training.recipes.common import Setup, prepare_model, save_policy

if TYPE_CHECKING:
    from plugtune.training.config import RunConfig


def check_config(cfg: RunConfig) -> None:
    """SFT has no section of its own: data, training and the adapter are checked by config.py."""


def prepare(cfg: RunConfig, loaded: LoadedModel | None = None) -> Setup:
    t, d = cfg.training, cfg.data
    tok = loaded.tokenizer if loaded is not None else load_tokenizer(cfg.model.name)
    train_examples = load_examples(d.train, d.format, d.system_prompt)
    train_items, stats = tokenize_dataset(tok, train_examples, d.max_length, d.overflow, d.train_on)
    print(f"[plugtune] train data: {stats.summary()}")
    if not train_items:
        raise ValueError(f"{d.train}: no usable examples after tokenization ({stats.summary()})")
    eval_items = None
    if d.eval:
        eval_examples = load_examples(d.eval, d.format, d.system_prompt)
        if d.eval_limit:
            eval_examples = eval_examples[: d.eval_limit]
        eval_items, eval_stats = tokenize_dataset(tok, eval_examples, d.max_length, d.overflow, d.train_on)
        print(f"[plugtune] eval data: {eval_stats.summary()}")
    longest = max(stats.max_tokens, eval_stats.max_tokens if eval_items is not None else 0)
    check_max_length(loaded.path if loaded is not None else cfg.model.name, d.max_length, longest)
    torch.manual_seed(t.seed)  # adapter initialisation is part of the run's randomness
    loaded = prepare_model(cfg, loaded)  # after the data: bad data fails before the model loads
    # A micro-batch is batch_size examples either way (the same ones with or without packing, so the
    # optimizer trajectory is unchanged); packing or grouping only changes how they are laid out.
    layout = choose_layout(d.packing, d.group_by_length, loaded.model, d.packed_attention)
    print(f"[plugtune] batches: {layout.note}")
    pad, bs = tok.pad_token_id, t.batch_size
    lengths = tuple(len(it.input_ids) for it in train_items)

    def make_batch(i: int) -> dict:
        chosen = grouped_batch_indices(lengths, i, bs, t.seed) if layout.group else batch_indices(len(lengths), i, bs, t.seed)
        return layout.collate([train_items[j] for j in chosen], pad, d.max_length)

    eval_batches = None
    if eval_items:  # the eval loss is a sum over tokens: any order and layout give the same value
        if layout.pack or layout.group:
            eval_items = sorted(eval_items, key=lambda it: len(it.input_ids))
        eval_batches = [layout.collate(eval_items[i:i + bs], pad, d.max_length) for i in range(0, len(eval_items), bs)]
    source = IndexedBatches(make_batch, len(train_items), bs, t.grad_accum)
    return Setup(loaded, source, lambda out: save_policy(cfg, loaded, out), CausalLMObjective(),
                 eval_batches=eval_batches, summary=f"{stats.summary()}; {layout.note}")
