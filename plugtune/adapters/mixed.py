"""Per-row mixed-adapter batches: in one forward pass row i uses adapter `names[i]` (None: the base).

This is what lets requests for different skills share a decode step (and several adapters train
in one batch). No Python loop over rows: each layer groups the rows of an adapter with
`index_select`, runs the adapter on them and scatters the result back with `index_add`, both of
which autograd handles. When many adapters share a batch at inference, LoRA layers instead gather
each row's rank-padded A and B from stacked tables and apply all rows with two batched matmuls:
the idea of Punica's SGMV kernel (Chen et al. 2023, "Punica: Multi-Tenant LoRA Serving", sec. 4)
and S-LoRA's unified paging of heterogeneous ranks (Sheng et al. 2023, sec. 5), in plain PyTorch.

    with mixed_adapters(model, ["math", None, "medical", "math"]):
        logits = model(input_ids)          # row 1 is the plain base

The plan is set on every adapter layer for the duration of the context; a layer that does not
carry a row's adapter leaves that row to the base (adapters may target different modules).
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

import torch
from torch import nn

from plugtune.adapters.layers import AdapterLayer, adapter_layers


@dataclass(eq=False)
class RowPlan:
    """Which adapter each row of the batch uses, with the index tensors layers need (cached)."""

    names: tuple[str | None, ...]
    device: torch.device
    present: list[str] = field(init=False)  # distinct adapter names, in order of first appearance
    _rows: dict = field(default_factory=dict, init=False, repr=False)
    _slots: dict = field(default_factory=dict, init=False, repr=False)

    def __post_init__(self):
        self.present = list(dict.fromkeys(n for n in self.names if n is not None))

    def covers_all(self, name: str) -> bool:
        return len(self.present) == 1 and None not in self.names and self.present[0] == name

    def rows(self, name: str) -> torch.Tensor:
        """(n,) indices of the rows that use `name`."""
        if name not in self._rows:
            self._rows[name] = torch.tensor([i for i, n in enumerate(self.names) if n == name],
                                            dtype=torch.long, device=self.device)
        return self._rows[name]

    def slots(self, order: tuple[str, ...]) -> torch.Tensor:
        """(B,) row -> index into a stacked table whose entry 0 means 'no adapter' and entry k+1 is
        order[k]. Layers with the same adapters share one tensor."""
        if order not in self._slots:
            position = {n: k + 1 for k, n in enumerate(order)}
            self._slots[order] = torch.tensor([position.get(n, 0) for n in self.names], dtype=torch.long,
                                              device=self.device)
        return self._slots[order]


def check_row_adapters(model: nn.Module, names: list[str | None],
                       layers: list[tuple[str, AdapterLayer]] | None = None) -> None:
    """Raise a clear error for unknown adapters and for those that cannot run per row.
    `layers`: the model's adapter layers, when the caller has listed them already."""
    layers = list(adapter_layers(model)) if layers is None else layers
    known = list(dict.fromkeys(n for _, layer in layers for n in layer.configs))
    unknown = sorted({n for n in names if n is not None and n not in known})
    if unknown:
        raise KeyError(f"no adapter named {', '.join(map(repr, unknown))} on this model "
                       f"(loaded: {', '.join(known) or 'none'}; use None for the base)")
    wanted = {n for n in names if n is not None}
    merged = sorted({n for _, layer in layers for n in layer.merged})
    if merged:  # a merged adapter is in the base weights, so every row (base rows too) would get it
        raise ValueError(f"adapter(s) {merged} are merged into the base weights; unmerge them (unmerge_adapters) "
                         "before mixing adapters per row")
    for lname, layer in layers:
        for name in wanted & set(layer.configs):
            reason = layer.row_refusal(name)
            if reason:
                raise ValueError(f"adapter '{name}' cannot be mixed per row ({lname}): {reason}")


@contextlib.contextmanager
def mixed_adapters(model: nn.Module, names: list[str | None]):
    """Run the forward passes inside the context with row i on adapter names[i] (None: the base).

    The batch size of every forward inside must equal len(names)."""
    names = [None if n in (None, "", "__base__") else n for n in names]
    if not names:
        raise ValueError("per-row adapter names: the list is empty; give one name (or None) per row")
    named = list(adapter_layers(model))  # one walk over the modules serves the checks and the plan
    check_row_adapters(model, names, named)
    device = next(model.parameters()).device
    plan = RowPlan(tuple(names), device)
    layers = [layer for _, layer in named]
    before = [layer.row_plan for layer in layers]
    for layer in layers:
        layer.row_plan = plan
    try:
        yield plan
    finally:
        for layer, old in zip(layers, before):
            layer.row_plan = old


def rows_view(x: torch.Tensor, batch: int) -> torch.Tensor:
    """(B, ...) -> (B, N, features) for batched matmuls over any middle dimensions."""
    return x.reshape(batch, -1, x.shape[-1])


def per_row(values: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """(B, d) per-row vectors -> broadcastable against `like` (B, ..., d)."""
    return values.view(values.shape[0], *([1] * (like.dim() - 2)), values.shape[-1])
