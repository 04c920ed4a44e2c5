"""What every adapter layer shares: it wraps one module of the base (`base_layer`), holds any
number of named adapters, and knows which are active. Model-wide helpers live here too.

Models never import adapters: a layer attaches to any nn.Module found by name pattern.

Several methods on one module nest: a second method wraps the first wrapper (an IA3 layer around a
LoRA layer around q_proj), and each wrapper holds any number of adapters of its own method. The
innermost plain module is `base_module`. Per-row mixed batches (one adapter per row) are driven by a
`row_plan` set on every layer by `adapters.mixed.mixed_adapters`.
"""
from __future__ import annotations

import contextlib
import re
from typing import Iterator

import torch
from torch import nn

from plugtune.models.heads import ScalarHead
from plugtune.models.quantize import QuantizedLinear

ALL_LINEAR = "all-linear"


def is_conv1d(module: nn.Module) -> bool:
    """GPT-2's Conv1D: a linear layer whose weight is stored (in, out)."""
    return type(module).__name__ == "Conv1D"


def linear_features(module: nn.Module) -> tuple[int, int]:
    """(in_features, out_features) of nn.Linear, Conv1D or a quantized linear layer (read from its
    shape attributes: its `weight` would dequantize it)."""
    if isinstance(module, QuantizedLinear):
        return module.in_features, module.out_features
    w = module.weight
    return (w.shape[0], w.shape[1]) if is_conv1d(module) else (w.shape[1], w.shape[0])


class AdapterLayer(nn.Module):
    """Base of every adapter wrapper. Subclasses keep per-adapter modules in ModuleDicts whose
    key is the adapter name (PEFT's layout: `q_proj.lora_A.<name>.weight`)."""

    adapter_module_names: tuple[str, ...] = ()  # e.g. ("lora_A", "lora_B")
    # Per-adapter side tables (plain dicts or ModuleDicts without parameters) to clean on delete.
    adapter_side_tables: tuple[str, ...] = ()
    # A wrapper whose adapters replace the module whole (modules_to_save): never a target of another method.
    trained_whole: bool = False

    def __init__(self, base_layer: nn.Module):
        super().__init__()
        self.base_layer = base_layer
        self.active_adapters: list[str] = []
        self.disabled = False
        self.configs: dict[str, object] = {}
        self.merged: list[str] = []
        self.row_plan = None  # a mixed.RowPlan while a per-row mixed batch runs
        self._original_weight: torch.Tensor | None = None  # kept while merged, for a bit-exact unmerge

    @property
    def base_module(self) -> nn.Module:
        """The plain module at the bottom of a chain of wrappers (holds the base weight)."""
        module = self.base_layer
        while isinstance(module, AdapterLayer):
            module = module.base_layer
        return module

    @property
    def base_device(self) -> torch.device:
        """Where the base module's tensors live (without reading `weight`, which a quantized base computes)."""
        return next(t for t in (*self.base_module.parameters(), *self.base_module.buffers())).device

    @property
    def weight(self) -> torch.Tensor:
        """The base weight, read-only (as PEFT's layers expose it): code that reads
        `model.get_input_embeddings().weight` (prompt tuning, HF's tying) still works under a wrapper."""
        return self.base_module.weight

    def register_adapter(self, name: str, cfg: object) -> None:
        """Record adapter `name` (its modules already added by the subclass) and make it active."""
        self.configs[name] = cfg
        if name not in self.active_adapters:
            self.active_adapters = [*self.active_adapters, name]

    @property
    def adapter_names(self) -> list[str]:
        return list(self.configs)

    def adapter_parameters(self, name: str) -> Iterator[tuple[str, nn.Parameter]]:
        """(local name, parameter) of one adapter, e.g. ('lora_A.default.weight', p)."""
        for attr in self.adapter_module_names:
            container = getattr(self, attr)
            if name in container:
                item = container[name]
                if isinstance(item, nn.Parameter):
                    yield f"{attr}.{name}", item
                else:
                    for pname, p in item.named_parameters():
                        yield f"{attr}.{name}.{pname}", p

    def delete_adapter(self, name: str) -> None:
        if name in self.merged:
            raise RuntimeError(f"adapter '{name}' is merged into the base weights; unmerge it before removing it")
        for attr in self.adapter_module_names + self.adapter_side_tables:
            container = getattr(self, attr)
            if name in container:
                del container[name]
        self.configs.pop(name, None)
        self.active_adapters = [a for a in self.active_adapters if a != name]

    def live_adapters(self) -> list[str]:
        """Adapters that this forward pass must apply (active, enabled, not already merged)."""
        if self.disabled:
            return []
        return [a for a in self.active_adapters if a not in self.merged]

    # Per-row mixed batches -------------------------------------------------------------------
    def row_refusal(self, name: str) -> str | None:
        """Why adapter `name` of this layer cannot run per row (None: it can)."""
        return None

    def row_groups(self, batch: int) -> list[tuple[str, torch.Tensor | None]]:
        """(adapter, row indices) for the adapters of this layer present in the current row plan;
        indices are None when the adapter takes every row (no gather/scatter needed)."""
        plan = self.row_plan
        if len(plan.names) != batch:
            raise ValueError(f"per-row adapter names: {len(plan.names)} names for a batch of {batch} rows; "
                             "give exactly one name (or None for the base) per row")
        if self.disabled:
            return []
        return [(name, None if plan.covers_all(name) else plan.rows(name))
                for name in plan.present if name in self.configs]

    # Merging: subclasses that can merge implement `merged_weight(name, weight) -> new weight`.
    def merge(self, name: str) -> None:
        if name in self.merged:
            return
        self.check_can_merge(name)
        weight = self.base_module.weight
        if not self.merged:
            self._original_weight = weight.data.clone()
        weight.data = self.merged_weight(name, weight.data).to(weight.dtype)
        self.merged.append(name)

    def check_can_merge(self, name: str) -> None:
        """Refuse a merge into a quantized base, or past live inner adapters (check_inner_merged)."""
        base = self.base_module
        if isinstance(base, QuantizedLinear):
            raise RuntimeError(
                f"cannot merge adapter '{name}' into a quantized base ({base.scheme}): its weight is stored in "
                f"{base.scheme} and folding the adapter in would re-quantize W + delta, adding rounding error to the "
                "whole layer. Serve the adapter unmerged on the quantized base, or load the base unquantized "
                "(quantize=none / --quantize none) to merge, then quantize the merged model (quantize_model)")
        self.check_inner_merged(name)

    def check_inner_merged(self, name: str) -> None:
        """Refuse to merge `name` while an inner wrapper on the same module still applies adapters
        in forward (they act before this one, so folding this one first would change the result)."""
        inner = self.base_layer
        while isinstance(inner, AdapterLayer):
            if inner.live_adapters():
                raise RuntimeError(f"cannot merge '{name}': adapters {inner.live_adapters()} of an inner "
                                   f"{type(inner).__name__} on the same module are live and unmerged; merge "
                                   "or deactivate them first (merging applies inner adapters first)")
            inner = inner.base_layer

    def unmerge(self) -> None:
        """Restore the base weight bit for bit (from the kept copy; no in-place subtraction)."""
        if self._original_weight is not None:
            self.base_module.weight.data = self._original_weight
            self._original_weight = None
        self.merged = []

    def merged_weight(self, name: str, weight: torch.Tensor) -> torch.Tensor:
        raise TypeError(f"{type(self).__name__} cannot be merged into the base weights")

    @property
    def can_merge(self) -> bool:
        return type(self).merged_weight is not AdapterLayer.merged_weight

    def unwrapped(self) -> nn.Module:
        """The plain module that replaces this wrapper once merged (see unwrap_merged)."""
        return self.base_layer


def _is_linear(module: nn.Module) -> bool:
    return isinstance(module, (nn.Linear, QuantizedLinear)) or is_conv1d(module)


def find_targets(model: nn.Module, target_modules: list[str] | str, kind=_is_linear) -> list[str]:
    """Module names to wrap. A list matches a name equal to an entry or ending in '.entry'
    (PEFT's rule); a string is a regex that must match the whole name; 'all-linear' takes every
    linear layer but the LM head. A module already wrapped by another adapter is a target too
    (judged by its base module), so adapters of several methods can share it; the insides of a
    wrapper (its base, other adapters' parts) never are."""
    names = []
    wrappers: list[str] = []
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    for name, module in model.named_modules():
        if any(name.startswith(w) for w in wrappers):
            continue
        candidate = module
        if isinstance(module, AdapterLayer):
            wrappers.append(name + ".")
            if module.trained_whole or not name:
                continue  # modules trained whole are never adapted too (as in PEFT)
            candidate = module.base_module
        if target_modules == ALL_LINEAR:
            hit = _is_linear(candidate) and candidate is not head
        elif isinstance(target_modules, str):
            hit = re.fullmatch(target_modules, name) is not None
        else:
            hit = any(name == t or name.endswith("." + t) for t in target_modules)
        if hit and kind(candidate):
            names.append(name)
    if not names:
        sample = [n for n, m in model.named_modules() if kind(m) and ".base_layer" not in n][:8]
        raise ValueError(f"target_modules={target_modules!r} matched no module of this model; "
                         f"eligible modules look like: {', '.join(sample)}")
    return names


def get_submodule_parent(model: nn.Module, name: str) -> tuple[nn.Module, str]:
    parent_name, _, child = name.rpartition(".")
    return (model.get_submodule(parent_name) if parent_name else model), child


def wrapper_chain(module: nn.Module) -> list[AdapterLayer]:
    """The wrappers stacked on one module, outermost first."""
    chain = []
    while isinstance(module, AdapterLayer):
        chain.append(module)
        module = module.base_layer
    return chain


def wrap_module(model: nn.Module, name: str, layer_cls: type[AdapterLayer]) -> AdapterLayer:
    """The `layer_cls` wrapper of submodule `name`: the existing one, or a new one put around
    whatever is there now (the plain module, or another method's wrapper)."""
    module = model.get_submodule(name)
    for layer in wrapper_chain(module):
        if type(layer) is layer_cls:
            return layer
    layer = layer_cls(module)
    parent, child = get_submodule_parent(model, name)
    setattr(parent, child, layer)
    return layer


def adapter_layers(model: nn.Module) -> Iterator[tuple[str, AdapterLayer]]:
    for name, module in model.named_modules():
        if isinstance(module, AdapterLayer):
            yield name, module


def adapter_names(model: nn.Module) -> list[str]:
    names: list[str] = []
    for _, layer in adapter_layers(model):
        names += [n for n in layer.adapter_names if n not in names]
    return names


def adapter_state(model: nn.Module, name: str) -> dict[str, nn.Parameter]:
    """Full parameter names -> parameters of adapter `name` (our layout, adapter name included).
    Names are those of the adapted module whatever else wraps it ('q_proj.lora_A.x.weight', never
    'q_proj.base_layer.lora_A.x.weight'), so saved files do not depend on which methods share a module."""
    state = {}
    for lname, layer in adapter_layers(model):
        lname = lname.replace(".base_layer", "")
        for pname, p in layer.adapter_parameters(name):
            state[f"{lname}.{pname}" if lname else pname] = p
    return state


def set_active_adapters(model: nn.Module, names: list[str] | str | None) -> None:
    """Activate `names` (one, several stacked, or none: the base) on every layer that carries them."""
    names = [] if names is None else [names] if isinstance(names, str) else list(names)
    known = adapter_names(model)
    unknown = [n for n in names if n not in known]
    if unknown:
        raise KeyError(f"no adapter named {', '.join(map(repr, unknown))} on this model "
                       f"(loaded: {', '.join(known) or 'none'})")
    for _, layer in adapter_layers(model):
        layer.active_adapters = [n for n in names if n in layer.configs]


@contextlib.contextmanager
def adapters_disabled(model: nn.Module):
    """Run the bare base model (e.g. the reference policy for DPO/PPO) without a second copy."""
    layers = [layer for _, layer in adapter_layers(model)]
    before = [layer.disabled for layer in layers]
    if any(layer.merged for layer in layers):
        raise RuntimeError("adapters are merged into the base weights; unmerge before disabling them")
    for layer in layers:
        layer.disabled = True
    try:
        yield model
    finally:
        for layer, flag in zip(layers, before):
            layer.disabled = flag


@contextlib.contextmanager
def adapters_only(model: nn.Module, names: list[str] | str | None):
    """Only `names` active for the duration (None: the base), each layer's previous active list
    restored after: e.g. a frozen copy of the previous stage's adapter as the reference policy."""
    layers = [layer for _, layer in adapter_layers(model)]
    before = [list(layer.active_adapters) for layer in layers]
    set_active_adapters(model, names)
    try:
        yield model
    finally:
        for layer, active in zip(layers, before):
            layer.active_adapters = active


def mark_trainable(model: nn.Module, names: str | list[str]) -> int:
    """Freeze everything, then unfreeze adapter(s) `names`. Returns the trainable parameter count."""
    for p in model.parameters():
        p.requires_grad_(False)
    count = 0
    for name in [names] if isinstance(names, str) else names:
        for p in adapter_state(model, name).values():
            p.requires_grad_(True)
            count += p.numel()
    return count


def base_parameters(model: nn.Module) -> dict[str, torch.Tensor]:
    """Base-model parameters under their original names (wrappers' `.base_layer` removed); neither
    adapters nor the scalar heads a run attaches (value, reward) count as the base."""
    adapter_ids = {id(p) for _, layer in adapter_layers(model) for n in layer.adapter_names
                   for _, p in layer.adapter_parameters(n)}
    adapter_ids |= {id(p) for m in model.modules() if isinstance(m, ScalarHead) for p in m.parameters()}
    return {k.replace(".base_layer", ""): p for k, p in model.named_parameters(remove_duplicate=True)
            if id(p) not in adapter_ids}


def _outermost_chains(model: nn.Module) -> list[tuple[str, list[AdapterLayer]]]:
    chains, inside = [], set()
    for name, layer in adapter_layers(model):
        if id(layer) not in inside:
            chain = wrapper_chain(layer)
            inside.update(id(x) for x in chain)
            chains.append((name, chain))
    return chains


def merge_adapters(model: nn.Module, names: list[str] | None = None) -> None:
    """Fold adapters into the base weights, innermost wrapper first on each module (the order in
    which they apply), so `unmerge_adapters` (outermost first) restores each kept copy in reverse."""
    for _, chain in _outermost_chains(model):
        for depth, layer in enumerate(reversed(chain)):
            todo = [n for n in (names or layer.active_adapters) if n in layer.configs]
            outer_merged = [x for x in chain[: len(chain) - 1 - depth] if x.merged]
            if todo and outer_merged:
                raise RuntimeError("an outer adapter on the same module is already merged; unmerge_adapters() "
                                   "first, then merge everything in one call")
            for n in todo:
                layer.merge(n)


def unmerge_adapters(model: nn.Module) -> None:
    for _, layer in adapter_layers(model):  # outermost first: restores copies in reverse merge order
        layer.unmerge()


def unwrap_merged(model: nn.Module) -> nn.Module:
    """Replace every wrapper chain by its (merged) base module: a plain model transformers can save."""
    for name, chain in _outermost_chains(model):
        module = chain[-1].unwrapped()
        parent, child = get_submodule_parent(model, name)
        setattr(parent, child, module)
    return model


def remove_adapter(model: nn.Module, name: str) -> None:
    """Delete adapter `name` from every layer; wrappers left without adapters are taken out, so the
    model is again the plain base where no adapter remains."""
    layers = list(adapter_layers(model))
    if not any(name in layer.configs for _, layer in layers):
        raise KeyError(f"no adapter named '{name}' on this model (loaded: {', '.join(adapter_names(model)) or 'none'})")
    merged = [lname for lname, layer in layers if name in layer.merged]
    if merged:
        raise RuntimeError(f"adapter '{name}' is merged into the base weights (e.g. {merged[0]}); "
                           "unmerge_adapters() before removing it")
    for _, layer in layers:
        if name in layer.configs:
            layer.delete_adapter(name)
    for lname, layer in reversed(layers):  # deepest first, so chains collapse from the inside out
        if layer.configs:
            continue
        parent, child = get_submodule_parent(model, lname)
        if isinstance(layer.base_layer, nn.Identity) and not list(layer.base_layer.parameters()):
            delattr(parent, child)  # a virtual-input encoder (prompt/prefix tuning) that wraps nothing
        else:
            setattr(parent, child, layer.base_layer)
