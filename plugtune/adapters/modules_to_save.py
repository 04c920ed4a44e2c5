"""`modules_to_save`: train whole modules (e.g. a classifier head) alongside an adapter.

The adapter gets its own trainable deep copy of each listed module; the original stays frozen and
untouched, so switching the adapter off (or to another adapter) restores the base exactly. This is
PEFT's ModulesToSaveWrapper (peft/utils/other.py), kept compatible with its files:

    in memory:  classifier.modules_to_save.<adapter>.weight       (classifier.base_layer = the original)
    saved:      base_model.model.classifier.weight                (the copy under the module's own name)

A module is matched as PEFT's `_set_trainable` matches it: its full name ends with an entry (plain
`endswith`, no '.' boundary). The copies are made before the adapter method picks its targets, so the
method never adapts a module that is trained whole (PEFT excludes those targets too).
"""
from __future__ import annotations

import copy

import torch
from torch import nn

from plugtune.adapters.layers import AdapterLayer, adapter_layers, get_submodule_parent, wrap_module
from plugtune.models.quantize import QuantizedLinear


class ModulesToSave(AdapterLayer):
    adapter_module_names = ("modules_to_save",)
    trained_whole = True  # find_targets never adapts a module that is trained whole (as in PEFT)

    def __init__(self, base_layer: nn.Module):
        super().__init__(base_layer)
        self.modules_to_save = nn.ModuleDict()

    def add_adapter(self, name: str, cfg: object) -> None:
        if any(isinstance(m, QuantizedLinear) for m in self.base_layer.modules()):
            raise ValueError(f"modules_to_save: adapter '{name}' would train a copy of a quantized module (its "
                             "weights are frozen 8/4-bit buffers, nothing to train); keep that module out of the "
                             "quantization (quantize_model(..., skip=(...))) or load the base with quantize=none")
        # A copy in the base's dtype and device, as PEFT makes it; the original keeps requires_grad=False.
        self.modules_to_save[name] = copy.deepcopy(self.base_layer)
        self.register_adapter(name, cfg)

    def live_module(self) -> nn.Module:
        """The active adapter's copy; the original when disabled or no adapter with a copy is active.
        Merged adapters count: merging a copy means using it (there is nothing to fold)."""
        if self.disabled:
            return self.base_layer
        live = [a for a in self.active_adapters if a in self.modules_to_save]
        if len(live) > 1:
            raise RuntimeError(f"adapters {live} each train their own copy of this module; only one of them "
                               "can be active at a time (as in PEFT)")
        return self.modules_to_save[live[0]] if live else self.base_layer

    def forward(self, *args, **kwargs):
        if self.row_plan is not None:
            return self._forward_rows(*args, **kwargs)
        return self.live_module()(*args, **kwargs)

    def _forward_rows(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        """Each row through its own adapter's copy (the original for the others)."""
        out = self.base_layer(x, *args, **kwargs)
        if not torch.is_tensor(out):
            raise TypeError(f"per-row mixed batches need a module returning one tensor; {type(self.base_layer).__name__} "
                            "returns something else. Run its adapters one at a time (use())")
        for name, idx in self.row_groups(x.shape[0]):
            copy_out = self.modules_to_save[name](x if idx is None else x.index_select(0, idx), *args, **kwargs)
            out = copy_out if idx is None else out.index_copy(0, idx, copy_out.to(out.dtype))
        return out

    @property
    def can_merge(self) -> bool:
        return True

    def merge(self, name: str) -> None:
        if name not in self.merged:
            self.merged.append(name)

    def unmerge(self) -> None:
        self.merged = []

    def unwrapped(self) -> nn.Module:
        return self.modules_to_save[self.merged[-1]] if self.merged else self.base_layer


def find_modules_to_save(model: nn.Module, entries: list[str]) -> list[str]:
    """Full names of the modules to copy. Modules inside another adapter's wrapper never match, and
    neither do modules inside a match (the whole parent is copied already)."""
    found: list[str] = []
    skip: list[str] = []  # name prefixes whose sub-modules are not candidates
    for key, module in model.named_modules():
        if not key or any(key.startswith(p) for p in skip):
            continue
        if any(key.endswith(e) for e in entries):
            if isinstance(module, AdapterLayer) and not isinstance(module, ModulesToSave):
                raise ValueError(f"modules_to_save entry matches {key}, which already carries a "
                                 f"{type(module).__name__}; a module is either adapted or trained whole")
            found.append(key)
            skip.append(key + ".")
        elif isinstance(module, AdapterLayer):
            skip.append(key + ".")
    if not found:
        heads = [n for n, m in model.named_children()][-3:]
        raise ValueError(f"modules_to_save={entries!r} matched no module of this model "
                         f"(its top-level modules end with: {', '.join(heads)})")
    return found


def attach_modules_to_save(model: nn.Module, entries: list[str], cfg: object, name: str) -> list[str]:
    """Give adapter `name` a trainable copy of every module matching `entries`; returns their names."""
    names = find_modules_to_save(model, entries)
    for module_name in names:
        layer = wrap_module(model, module_name, ModulesToSave)
        layer.add_adapter(name, cfg)
    return names


def remove_modules_to_save(model: nn.Module, name: str) -> None:
    """Undo attach_modules_to_save for adapter `name` (used when attaching the adapter fails half-way)."""
    for module_name, layer in list(adapter_layers(model)):
        if isinstance(layer, ModulesToSave) and name in layer.configs:
            layer.delete_adapter(name)
            if not layer.configs:
                parent, child = get_submodule_parent(model, module_name)
                setattr(parent, child, layer.base_layer)
