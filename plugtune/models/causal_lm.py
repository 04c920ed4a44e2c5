"""The two pieces of a Hugging Face causal LM the trainer needs: the backbone and the LM head.

Splitting them lets the loss apply the (vocabulary-sized) head only at positions that carry
labels instead of materialising (B, T, V) logits.

Virtual inputs. Prompt tuning and prefix tuning change the model's *inputs* rather than a layer.
Models never import adapters, so they plug in through a duck-typed protocol: any submodule of
the model with a method

    virtual_inputs(batch_size: int) -> dict

returns, for its live adapters (empty dict when none is live, e.g. under adapters_disabled):
    "prompt": (B, n, C) embeddings put before the token embeddings        (prompt tuning), and/or
    "prompt_mask": (B, n) 0 where a row's prompt is shorter (per-row mixed batches; optional),
    "prefix": [(key, value), ...] one pair per layer, each (B, H_kv, n, D), written to the KV
              cache before the first token                                 (prefix tuning).
`prepare_inputs` turns them into backbone kwargs. The attention mask is laid out
[prefix | prompt | tokens], virtual columns all 1. Virtual tokens take the first positions, so
the first real token sits at position n_prefix + n_prompt, as in PEFT (generation derives the
positions from this mask; with a soft prompt and any padding, `prepare_inputs` derives them from
the mask too, so a row's soft prompt sits right before its first token whatever the padding and
whatever the other rows' prompts are: the positions the row has alone, unpadded).

Calls that went through `prepare_inputs` run inside `inputs_prepared()`, so the hooks that make
a plain `model(...)` call apply virtual inputs (adapters/virtual.py) know not to apply them twice.
"""
from __future__ import annotations

import contextlib
import contextvars
import inspect
from typing import Any

import torch
from torch import nn

from plugtune.models import varlen

# The label of a position that takes no loss (torch cross_entropy's default ignore_index, and the
# convention of Hugging Face models and data collators).
IGNORE_INDEX = -100


_PREPARED = contextvars.ContextVar("plugtune_inputs_prepared", default=False)


@contextlib.contextmanager
def inputs_prepared():
    """Mark model calls whose inputs already carry the virtual inputs."""
    token = _PREPARED.set(True)
    try:
        yield
    finally:
        _PREPARED.reset(token)


def inputs_are_prepared() -> bool:
    return _PREPARED.get()


def backbone(model: nn.Module) -> nn.Module:
    """The transformer body (`model.model` for Llama, `model.transformer` for GPT-2)."""
    body = getattr(model, getattr(model, "base_model_prefix", ""), None)
    if body is None or body is model:
        raise TypeError(f"{type(model).__name__} has no separable backbone (base_model_prefix)")
    return body


def lm_head(model: nn.Module) -> nn.Module:
    head = model.get_output_embeddings()
    if head is None:
        raise TypeError(f"{type(model).__name__} has no output embeddings (LM head)")
    return head


def cache_kwarg(module: nn.Module) -> str:
    """The forward's name for the KV cache: `cache` (recent transformers 5) or `past_key_values`."""
    return "cache" if "cache" in inspect.signature(module.forward).parameters else "past_key_values"


def prepare_inputs(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor | None,
                   cache: Any = None) -> tuple[dict[str, Any], int]:
    """Forward kwargs for `input_ids` (B, T) with every live virtual-input adapter applied, and the
    number of leading output positions that are virtual (drop them to line up with input_ids).

    Without such adapters this is {"input_ids", "attention_mask"} (+ the cache if given) and 0.
    A given (empty) cache receives the prefix in place; without one, a prefix gets a new DynamicCache.
    """
    batch = input_ids.shape[0]
    prompts: list[torch.Tensor] = []
    prompt_masks: list[torch.Tensor] = []
    prefixes: list[list[tuple[torch.Tensor, torch.Tensor]]] = []
    checkpointing = False
    for module in model.modules():
        provide = getattr(module, "virtual_inputs", None)
        if callable(provide):
            got = provide(batch)
            if got.get("prompt") is not None:
                prompts.append(got["prompt"])
                prompt_masks.append(got.get("prompt_mask"))
            if got.get("prefix") is not None:
                prefixes.append(got["prefix"])
        checkpointing = checkpointing or getattr(module, "gradient_checkpointing", False)
    kwargs: dict[str, Any] = {"input_ids": input_ids, "attention_mask": attention_mask}
    key = cache_kwarg(model) if cache is not None or prefixes else None
    if cache is not None:
        kwargs[key] = cache
    if not prompts and not prefixes:
        return kwargs, 0
    embed = model.get_input_embeddings()
    dtype = embed.weight.dtype
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    virtual = 0
    virtual_mask = attention_mask.new_ones(batch, 0)
    if prompts:  # Lester et al. 2021, sec. 2: [P_e; X_e] is fed to the frozen model
        embeds = embed(input_ids)  # (B, T, C)
        prompt = torch.cat(prompts, dim=1).to(dtype)  # (B, n_prompt, C)
        kwargs.pop("input_ids")
        kwargs["inputs_embeds"] = torch.cat([prompt, embeds], dim=1)  # (B, n_prompt + T, C)
        virtual = prompt.shape[1]
        virtual_mask = torch.cat([m.to(attention_mask.dtype) if m is not None else
                                  attention_mask.new_ones(batch, p.shape[1]) for p, m in zip(prompts, prompt_masks)],
                                 dim=1)  # (B, n_prompt)
    n_prefix = 0
    if prefixes:  # Li & Liang 2021, eq. 2: h_i = P_theta[i] for i in P_idx (here: per-layer K, V)
        if checkpointing and model.training:  # checkpointed layers get no cache: the prefix would vanish
            raise ValueError("prefix tuning does not work with gradient checkpointing; disable it")
        if cache is None:
            from transformers import DynamicCache

            cache = DynamicCache()
            kwargs[key] = cache
        if cache.get_seq_length() > 0:
            raise ValueError("prefix tuning needs an empty KV cache: the prefix goes before the first token")
        for layer, pairs in enumerate(zip(*prefixes)):  # concatenate several prefix adapters along n
            k = torch.cat([kv[0] for kv in pairs], dim=2).to(dtype)  # (B, H_kv, n_prefix, D)
            v = torch.cat([kv[1] for kv in pairs], dim=2).to(dtype)
            cache.update(k, v, layer)
        n_prefix = sum(p[0][0].shape[2] for p in prefixes)
    ones = attention_mask.new_ones(batch, n_prefix)
    kwargs["attention_mask"] = torch.cat([ones, virtual_mask, attention_mask], dim=1)  # (B, n_prefix + n_prompt + T)
    # Padded rows (left padding, or shorter prompts in a mixed batch): positions from the mask, else the
    # pads would sit between a row's prompt and its tokens, and a row's answer would depend on the others.
    if prompts and not bool(kwargs["attention_mask"].all()):
        kwargs["position_ids"] = (kwargs["attention_mask"].cumsum(-1) - 1).clamp(min=0)[:, n_prefix:]
    return kwargs, virtual


def hidden_states(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor | None,
                  position_ids: torch.Tensor | None = None, **kwargs) -> torch.Tensor:
    """Final hidden states (B, T, C) of the backbone, virtual positions (if any) dropped.

    `position_ids` (B, T) are passed through as given, `kwargs` to the backbone. Packed rows
    (data/packing.py) give positions that restart at 0 for each example and no attention_mask:
    transformers then builds a causal mask that never crosses an example (or, under variable-length
    attention, `cu_seq_lens_q` in kwargs keeps examples apart: `batch_hidden`). Virtual tokens would
    need their own positions before every example, so the two are refused together."""
    inputs, virtual = prepare_inputs(model, input_ids, attention_mask)
    if position_ids is not None:
        if set(inputs) != {"input_ids", "attention_mask"}:
            raise ValueError("explicit position_ids (packed or tree-shaped rows) cannot be combined with prompt or "
                             "prefix tuning: their virtual tokens take positions of their own; use padded batches "
                             "(data.packing=false)")
        inputs["position_ids"] = position_ids
    out = backbone(model)(**inputs, use_cache=False, **kwargs)
    return out[0][:, virtual:] if virtual else out[0]


def batch_hidden(model: nn.Module, batch: dict) -> torch.Tensor:
    """Final hidden states (R, W, C) of a padded batch (input_ids, attention_mask) or a packed one
    (data/packing.py: input_ids, position_ids restarting at 0 per example, no attention_mask).
    A packed single row on a model switched to variable-length attention (models/varlen.py) also
    gets the example boundaries, read off the position ids, as `cu_seq_lens_q`."""
    positions = batch.get("position_ids")
    extra = {}
    if (positions is not None and batch.get("attention_mask") is None and positions.shape[0] == 1
            and getattr(getattr(model, "config", None), "_attn_implementation", None) == varlen.NAME):
        extra["cu_seq_lens_q"] = varlen.boundaries(positions[0])
    return hidden_states(model, batch["input_ids"], batch.get("attention_mask"), position_ids=positions, **extra)


def forward_logits(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Full logits (B, T, V) aligned with input_ids, virtual inputs applied (a plain `model(...)`
    call does the same through the hooks of adapters/virtual.py)."""
    inputs, virtual = prepare_inputs(model, input_ids, attention_mask)
    with inputs_prepared():
        return model(**inputs, use_cache=False).logits[:, virtual:]
