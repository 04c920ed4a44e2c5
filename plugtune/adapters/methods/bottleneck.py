"""Bottleneck adapters: Houlsby et al. 2019 and Pfeiffer et al. 2020.

A small two-layer network with a skip connection transforms the output h of a projection
(Houlsby et al. 2019, sec. 2.1 and fig. 2):

    h' = h + W_up f(W_down h + b_down) + b_up     W_down: (m, d), W_up: (d, m), m = d // reduction_factor

  houlsby:  two adapters per layer, after the attention output projection (o_proj / attn.c_proj /
            attention.output.dense) and after the MLP output projection, before each residual add
            and layer norm (fig. 2).
  pfeiffer: one adapter per layer, after the MLP output only (Pfeiffer et al. 2020, AdapterFusion,
            sec. 3.1 / fig. 2: the configuration they found best).

Init: W_down ~ N(0, 1e-2^2) (Houlsby's "near-identity" init, sec. 3.6), W_up = 0 and both biases 0,
so h' = h exactly at init (with residual=True; residual=False drops the skip and starts from zero).
The transform is non-linear, so it cannot be merged into the base weights.

No PEFT equivalent: saved with our own config ({"method": "bottleneck", ...}); parameters are
`<module>.adapter_down.<name>.weight` / `.bias` and `adapter_up.<name>.*` in ModuleDicts.
"""
from __future__ import annotations

from dataclasses import dataclass, replace

import torch
from torch import nn

from plugtune.adapters.layers import AdapterLayer, find_targets, linear_features, wrap_module
from plugtune.adapters.registry import AdapterMethod, register
from plugtune.adapters.targets import resolve_bottleneck_targets

VARIANTS = ("houlsby", "pfeiffer")
NON_LINEARITIES = {"relu": nn.ReLU, "gelu": nn.GELU, "silu": nn.SiLU, "tanh": nn.Tanh}
INIT_STD = 1e-2


@dataclass
class BottleneckConfig:
    variant: str = "houlsby"  # 'houlsby' (attention + MLP outputs) or 'pfeiffer' (MLP output only)
    reduction_factor: int = 16  # bottleneck width m = hidden // reduction_factor
    non_linearity: str = "relu"  # f in h + W_up f(W_down h)
    residual: bool = True  # keep the adapter's own skip connection (needed for identity at init)
    target_modules: list[str] | str | None = None  # None: this architecture's sites for `variant`
    modules_to_save: list[str] | None = None  # modules trained whole alongside, e.g. ["classifier"]

    def __post_init__(self):
        if self.variant not in VARIANTS:
            raise ValueError(f"bottleneck variant must be one of {VARIANTS}, got {self.variant!r}")
        if self.non_linearity not in NON_LINEARITIES:
            raise ValueError(f"bottleneck non_linearity must be one of {sorted(NON_LINEARITIES)}, "
                             f"got {self.non_linearity!r}")
        if self.reduction_factor < 1:
            raise ValueError(f"bottleneck reduction_factor must be >= 1, got {self.reduction_factor}")


class BottleneckAdapter(AdapterLayer):
    adapter_module_names = ("adapter_down", "adapter_up")
    adapter_side_tables = ("adapter_act", "residual")

    def __init__(self, base_layer: nn.Module):
        super().__init__(base_layer)
        _, self.hidden = linear_features(self.base_module)  # the adapter acts on the layer's output
        self.adapter_down = nn.ModuleDict()
        self.adapter_up = nn.ModuleDict()
        self.adapter_act = nn.ModuleDict()
        self.residual: dict[str, bool] = {}

    def add_adapter(self, name: str, cfg: BottleneckConfig) -> None:
        bottleneck = self.hidden // cfg.reduction_factor
        if bottleneck < 1:
            raise ValueError(f"reduction_factor {cfg.reduction_factor} leaves no bottleneck "
                             f"for hidden size {self.hidden}")
        device = self.base_device
        down = nn.Linear(self.hidden, bottleneck, device=device, dtype=torch.float32)
        up = nn.Linear(bottleneck, self.hidden, device=device, dtype=torch.float32)
        nn.init.normal_(down.weight, std=INIT_STD)
        nn.init.zeros_(down.bias)
        nn.init.zeros_(up.weight)  # zero output at init: h' = h exactly
        nn.init.zeros_(up.bias)
        self.adapter_down[name], self.adapter_up[name] = down, up
        self.adapter_act[name] = NON_LINEARITIES[cfg.non_linearity]()
        self.residual[name] = cfg.residual
        self.register_adapter(name, cfg)

    def transform(self, name: str, h: torch.Tensor) -> torch.Tensor:
        """h' for adapter `name`: h + W_up f(W_down h) (or the bare delta without the skip)."""
        down, up = self.adapter_down[name], self.adapter_up[name]
        delta = up(self.adapter_act[name](down(h.to(down.weight.dtype)))).to(h.dtype)  # (..., m) -> (..., d)
        return h + delta if self.residual[name] else delta

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        h = self.base_layer(x, *args, **kwargs)  # (..., d)
        if self.row_plan is not None:  # each adapter transforms its own rows; index_copy keeps autograd
            for name, idx in self.row_groups(h.shape[0]):
                if idx is None:
                    h = self.transform(name, h)
                else:
                    h = h.index_copy(0, idx, self.transform(name, h.index_select(0, idx)))
            return h
        for name in self.live_adapters():  # several active adapters apply one after another
            h = self.transform(name, h)
        return h


def attach_bottleneck(model: nn.Module, cfg: BottleneckConfig, name: str) -> tuple[list[str], BottleneckConfig]:
    targets = resolve_bottleneck_targets(model, cfg.variant, cfg.target_modules)
    names = find_targets(model, targets)
    resolved = replace(cfg, target_modules=targets)  # as resolved, so the saved config rebuilds the same sites
    for module_name in names:
        wrap_module(model, module_name, BottleneckAdapter).add_adapter(name, resolved)
    return names, resolved


register(AdapterMethod(name="bottleneck", config_cls=BottleneckConfig, attach=attach_bottleneck,
                       examples={"houlsby (rf 16)": {"variant": "houlsby", "reduction_factor": 16},
                                 "pfeiffer (rf 16)": {"variant": "pfeiffer", "reduction_factor": 16}}))
