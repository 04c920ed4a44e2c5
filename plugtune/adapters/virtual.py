"""What prompt tuning and prefix tuning share: an encoder module that wraps no layer and feeds the
model's inputs through `virtual_inputs` (see models/causal_lm.py), PEFT's one-tensor file format,
and the hooks that make a plain `model(...)` call apply them.

Why hooks: our own paths (training, `generate`, `forward_logits`) build the inputs with
`causal_lm.prepare_inputs`. A user who calls `model(input_ids=...)` directly would otherwise get
the base model's answer with no warning. A forward pre-hook (registered on that model instance
with PyTorch's own hook API, no class is patched) rewrites such a call to carry the soft prompt /
KV prefix, prefixes `labels` with IGNORE_INDEX for the virtual positions, and a forward hook drops the
virtual positions from the returned logits, so they line up with input_ids, as in PEFT.
"""
from __future__ import annotations

import inspect
import weakref

import torch
from torch import nn

from plugtune.adapters.layers import AdapterLayer
from plugtune.models.causal_lm import IGNORE_INDEX, cache_kwarg, inputs_are_prepared, prepare_inputs


class _CallHooks:
    """The two hooks registered on one model."""

    def __init__(self, model: nn.Module):
        self.handles = [model.register_forward_pre_hook(_apply_on_plain_call, with_kwargs=True),
                        model.register_forward_hook(_trim_virtual_positions, with_kwargs=True)]


_HOOKED: "weakref.WeakKeyDictionary[nn.Module, _CallHooks]" = weakref.WeakKeyDictionary()
# Virtual-position counts of calls in flight, per model (a deep copy carries the hooks, so it gets its own).
_PENDING: "weakref.WeakKeyDictionary[nn.Module, list[int]]" = weakref.WeakKeyDictionary()


class VirtualTokenEncoder(AdapterLayer):
    """Base of the prompt/prefix encoders: one table per adapter, no wrapped module (its base_layer
    is an Identity that is never called)."""

    table_attr = ""  # the ParameterDict holding each adapter's table (its PEFT file tensor)
    merge_refusal = "virtual tokens are extra inputs, not a weight change: they cannot be merged"

    def __init__(self):
        super().__init__(nn.Identity())

    def saved_table(self, name: str) -> torch.Tensor:
        """The tensor PEFT stores as `prompt_embeddings` for adapter `name`."""
        return getattr(self, self.table_attr)[name]

    def merge(self, name: str) -> None:
        raise TypeError(self.merge_refusal)


def encoder_of(model: nn.Module, attr: str, cls: type[VirtualTokenEncoder]) -> VirtualTokenEncoder:
    """The model's encoder at `attr`, created on first use (and the model's call hooks with it)."""
    encoder = getattr(model, attr, None)
    if encoder is None:
        encoder = cls()
        model.add_module(attr, encoder)
    # A deep copy of a hooked model carries the hooks already (PyTorch copies them): never add a second pair.
    carried = any(h is _apply_on_plain_call for h in model._forward_pre_hooks.values())
    if model not in _HOOKED and not carried:
        _HOOKED[model] = _CallHooks(model)
    return encoder


def peft_single_tensor_format(attr: str):
    """(saved_state, load_state) for PEFT's prompt-learning files: one tensor `prompt_embeddings`,
    no `base_model.model.` prefix."""

    def saved_state(model: nn.Module, name: str) -> dict:
        return {"prompt_embeddings": getattr(model, attr).saved_table(name)}

    def load_state(model: nn.Module, name: str, tensors: dict) -> dict:
        tensors = dict(tensors)  # unknown keys pass through, so io reports them
        if "prompt_embeddings" in tensors:
            tensors[f"{attr}.{getattr(model, attr).table_attr}.{name}"] = tensors.pop("prompt_embeddings")
        return tensors

    return saved_state, load_state


def _live_encoders(model: nn.Module) -> bool:
    return any(isinstance(m, VirtualTokenEncoder) and (m.live_adapters() or m.row_plan is not None)
               for m in model.children())


def _apply_on_plain_call(model: nn.Module, args: tuple, kwargs: dict):
    pending = _PENDING.setdefault(model, [])
    pending.clear()  # a previous call that raised never reached the forward hook
    if inputs_are_prepared() or not _live_encoders(model):
        return None
    # model(input_ids, attention_mask, ...) positionally: name the arguments as forward does.
    kwargs = {**dict(zip(inspect.signature(model.forward).parameters, args)), **kwargs}
    input_ids = kwargs.pop("input_ids", None)
    if input_ids is None:
        raise ValueError("a prompt/prefix-tuning adapter is active: call the model with input_ids (not "
                         "inputs_embeds) so the virtual tokens can be added, or disable the adapter")
    key = cache_kwarg(model)
    cache = kwargs.pop(key, None)
    if cache is None:  # not `or`: an empty cache is falsy
        cache = kwargs.pop("past_key_values", None)
    if cache is not None and cache.get_seq_length() > 0:
        raise ValueError("a prompt/prefix-tuning adapter is active and the model was called to continue a KV "
                         "cache (e.g. by transformers' generate()): use plugtune.generate, which adds the "
                         "virtual tokens once at prefill")
    kwargs.pop("position_ids", None)  # positions are derived again once the virtual tokens are in
    prepared, virtual = prepare_inputs(model, input_ids, kwargs.pop("attention_mask", None), cache)
    labels = kwargs.get("labels")
    if labels is not None and virtual:
        kwargs["labels"] = torch.cat([labels.new_full((labels.shape[0], virtual), IGNORE_INDEX), labels], dim=1)
    pending[:] = [virtual]  # read back (and cleared) by the forward hook of this same call
    return (), {**kwargs, **prepared}


def _trim_virtual_positions(model: nn.Module, args: tuple, kwargs: dict, output):
    pending = _PENDING.get(model)
    if not pending:
        return None
    virtual = pending.pop()
    if virtual and getattr(output, "logits", None) is not None:
        output.logits = output.logits[:, virtual:]
    return output
