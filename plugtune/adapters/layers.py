"""What every adapter layer shares: it wraps one module of the base (`base_layer`), holds any
number of named adapters, and knows which are active. Model-wide helpers live here too.

Models never import adapters: a layer attaches to any nn.Module found by name pattern.
"""
from __future__ import annotations

import contextlib
import re
from typing import Iterator

import torch
from torch import nn

ALL_LINEAR = "all-linear"


class AdapterLayer(nn.Module):
    """Base of every adapter wrapper. Subclasses keep per-adapter modules in ModuleDicts whose
    key is the adapter name (PEFT's layout: `q_proj.lora_A.<name>.weight`)."""

    adapter_module_names: tuple[str, ...] = ()  # e.g. ("lora_A", "lora_B")

    def __init__(self, base_layer: nn.Module):
        super().__init__()
        self.base_layer = base_layer
        self.active_adapters: list[str] = []
        self.disabled = False
        self.configs: dict[str, object] = {}
        self.merged: list[str] = []
        self._original_weight: torch.Tensor | None = None  # kept while merged, for a bit-exact unmerge

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
            raise RuntimeError(f"adapter '{name}' is merged; unmerge it before deleting")
        for attr in self.adapter_module_names:
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

    # Merging: subclasses that can merge implement `merged_weight(name, weight) -> new weight`.
    def merge(self, name: str) -> None:
        if name in self.merged:
            return
        weight = self.base_layer.weight
        if not self.merged:
            self._original_weight = weight.data.clone()
        weight.data = self.merged_weight(name, weight.data).to(weight.dtype)
        self.merged.append(name)

    def unmerge(self) -> None:
        """Restore the base weight bit for bit (from the kept copy; no in-place subtraction)."""
        if self._original_weight is not None:
            self.base_layer.weight.data = self._original_weight
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
    return isinstance(module, nn.Linear) or type(module).__name__ == "Conv1D"


def find_targets(model: nn.Module, target_modules: list[str] | str, kind=_is_linear) -> list[str]:
    """Module names to wrap. A list matches a name equal to an entry or ending in '.entry'
    (PEFT's rule); a string is a regex that must match the whole name; 'all-linear' takes every
    linear layer but the LM head."""
    names = []
    wrappers: list[str] = []  # modules inside a wrapper (its base, other adapters' parts) are never targets
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    for name, module in model.named_modules():
        if isinstance(module, AdapterLayer):
            wrappers.append(name + ".")
            continue
        if any(name.startswith(w) for w in wrappers) or ".base_layer" in name or name.endswith("base_layer"):
            continue
        if target_modules == ALL_LINEAR:
            hit = _is_linear(module) and module is not head
        elif isinstance(target_modules, str):
            hit = re.fullmatch(target_modules, name) is not None
        else:
            hit = any(name == t or name.endswith("." + t) for t in target_modules)
        if hit and kind(module):
            names.append(name)
    if not names:
        sample = [n for n, m in model.named_modules() if kind(m)][:8]
        raise ValueError(f"target_modules={target_modules!r} matched no module of this model; "
                         f"eligible modules look like: {', '.join(sample)}")
    return names


def get_submodule_parent(model: nn.Module, name: str) -> tuple[nn.Module, str]:
    parent_name, _, child = name.rpartition(".")
    return (model.get_submodule(parent_name) if parent_name else model), child


def wrap_module(model: nn.Module, name: str, make_layer) -> AdapterLayer:
    """Replace submodule `name` with an AdapterLayer around it (or reuse the existing wrapper)."""
    module = model.get_submodule(name)
    if isinstance(module, AdapterLayer):
        return module
    layer = make_layer(module)
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
    """Full parameter names -> parameters of adapter `name` (our layout, adapter name included)."""
    state = {}
    for lname, layer in adapter_layers(model):
        for pname, p in layer.adapter_parameters(name):
            state[f"{lname}.{pname}" if lname else pname] = p
    return state


def set_active_adapters(model: nn.Module, names: list[str] | str) -> None:
    names = [names] if isinstance(names, str) else list(names)
    known = adapter_names(model)
    unknown = [n for n in names if n not in known]
    if unknown:
        raise KeyError(f"no adapter named {unknown} on this model (loaded: {known})")
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


def mark_trainable(model: nn.Module, name: str) -> int:
    """Freeze everything, then unfreeze adapter `name`. Returns the trainable parameter count."""
    for p in model.parameters():
        p.requires_grad_(False)
    count = 0
    for p in adapter_state(model, name).values():
        p.requires_grad_(True)
        count += p.numel()
    return count


def base_parameters(model: nn.Module) -> dict[str, torch.Tensor]:
    """Base-model parameters under their original names (wrappers' `.base_layer` removed)."""
    adapter_ids = {id(p) for _, layer in adapter_layers(model) for n in layer.adapter_names
                   for _, p in layer.adapter_parameters(n)}
    return {k.replace(".base_layer", ""): p for k, p in model.named_parameters(remove_duplicate=True)
            if id(p) not in adapter_ids}


def merge_adapters(model: nn.Module, names: list[str] | None = None) -> None:
    for _, layer in adapter_layers(model):
        for n in names or layer.active_adapters:
            if n in layer.configs:
                layer.merge(n)


def unmerge_adapters(model: nn.Module) -> None:
    for _, layer in adapter_layers(model):
        layer.unmerge()


def unwrap_merged(model: nn.Module) -> nn.Module:
    """Replace every wrapper by its (merged) base layer: a plain model transformers can save."""
    for name, layer in list(adapter_layers(model)):
        parent, child = get_submodule_parent(model, name)
        setattr(parent, child, layer.unwrapped())
    return model
