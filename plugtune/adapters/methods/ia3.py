"""(IA)^3: Infused Adapter by Inhibiting and Amplifying Inner Activations (Liu et al. 2022, sec. 3.3).

Learned vectors rescale the keys, the values and the feed-forward activations:

    attention:     softmax(Q (l_k * K)^T / sqrt(d)) (l_v * V)        l_k, l_v: (d_k,), (d_v,)
    feed-forward:  (l_ff * gamma(W_1 x)) W_2                          l_ff: (d_ff,)

so on a linear layer y = W x + b the vector scales the OUTPUT (k_proj, v_proj: y * l, bias included),
except on a feed-forward layer (down_proj, GPT-2's mlp.c_proj), where it scales the INPUT:
y = W (x * l) + b. The vectors start at ones, so the model is unchanged at init. Both forms are
linear in W, so they merge: W * l along the output rows or the input columns.

Parameters follow PEFT: a ParameterDict `ia3_l` keyed by adapter name, shape (out, 1) or, for a
feed-forward layer, (1, in); the saved key is `base_model.model.<module>.ia3_l`.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, replace

import torch
from torch import nn

from plugtune.adapters.layers import AdapterLayer, find_targets, is_conv1d, linear_features, wrap_module
from plugtune.adapters.mixed import per_row
from plugtune.adapters.registry import AdapterMethod, register
from plugtune.adapters.targets import resolve_ia3_targets


@dataclass
class IA3Config:
    # Names, a regex or 'all-linear'; None: PEFT's defaults for this architecture (k, v, down_proj on Llama).
    target_modules: list[str] | str | None = None
    # Targets whose INPUT is scaled (a subset of target_modules); None: the architecture's defaults.
    feedforward_modules: list[str] | str | None = None
    # Whether a target stores its weight as (in, out), like GPT-2's Conv1D. Read from the module type on
    # attach (PEFT corrects a wrong value with a warning); kept so the saved config matches PEFT's.
    fan_in_fan_out: bool = False
    init_ia3_weights: bool = True  # ones (identity); False: random normal, as PEFT does (for tests)
    modules_to_save: list[str] | None = None  # modules trained whole alongside, e.g. ["classifier"]

    def __post_init__(self):
        if isinstance(self.target_modules, list) and isinstance(self.feedforward_modules, list):
            extra = set(self.feedforward_modules) - set(self.target_modules)
            if extra:
                raise ValueError("feedforward_modules must be a subset of target_modules; "
                                 f"not targeted: {sorted(extra)}")


def is_feedforward(module_name: str, feedforward_modules: list[str] | str) -> bool:
    """PEFT's rule, kept exactly so PEFT's adapters load the same: a regex must match the whole name;
    a list entry must end the name (plain `endswith`, no '.' boundary, unlike target matching)."""
    if isinstance(feedforward_modules, str):
        return re.fullmatch(feedforward_modules, module_name) is not None
    return any(module_name.endswith(t) for t in feedforward_modules)


class IA3Linear(AdapterLayer):
    adapter_module_names = ("ia3_l",)
    adapter_side_tables = ("is_feedforward",)

    def __init__(self, base_layer: nn.Module):
        super().__init__(base_layer)
        self.fan_in_fan_out = is_conv1d(self.base_module)
        self.in_features, self.out_features = linear_features(self.base_module)
        self.ia3_l = nn.ParameterDict()
        self.is_feedforward: dict[str, bool] = {}
        self._original_bias: torch.Tensor | None = None  # kept while merged, like the base's weight copy

    def add_adapter(self, name: str, cfg: IA3Config, feedforward: bool) -> None:
        shape = (1, self.in_features) if feedforward else (self.out_features, 1)  # PEFT's shapes
        device = self.base_device
        init = torch.ones if cfg.init_ia3_weights else torch.randn
        self.ia3_l[name] = nn.Parameter(init(shape, device=device, dtype=torch.float32))
        self.is_feedforward[name] = feedforward
        self.register_adapter(name, cfg)

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        if self.row_plan is not None:
            return self._forward_rows(x, *args, **kwargs)
        live = self.live_adapters()
        for vec in [self.ia3_l[n].flatten() for n in live if self.is_feedforward[n]]:  # each (in,)
            x = (x.to(vec.dtype) * vec).to(x.dtype)  # feed-forward: W (x * l) + b
        result = self.base_layer(x, *args, **kwargs)
        for vec in [self.ia3_l[n].flatten() for n in live if not self.is_feedforward[n]]:  # each (out,)
            result = (result.to(vec.dtype) * vec).to(result.dtype)  # k, v: (W x + b) * l
        return result

    def _row_scales(self, batch: int, feedforward: bool, size: int) -> torch.Tensor | None:
        """(B, size) per-row scale vectors: each row's adapter's l, ones for rows without one."""
        groups = [n for n, _ in self.row_groups(batch) if self.is_feedforward[n] == feedforward]
        if not groups:
            return None
        order = tuple(n for n in self.ia3_l if self.is_feedforward[n] == feedforward)
        ones = torch.ones(size, device=self.ia3_l[order[0]].device, dtype=self.ia3_l[order[0]].dtype)
        table = torch.stack([ones, *(self.ia3_l[n].flatten() for n in order)])  # (n+1, size), differentiable
        return table[self.row_plan.slots(order)]

    def _forward_rows(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        scale_in = self._row_scales(x.shape[0], True, self.in_features)
        if scale_in is not None:
            x = (x.to(scale_in.dtype) * per_row(scale_in, x)).to(x.dtype)
        result = self.base_layer(x, *args, **kwargs)
        scale_out = self._row_scales(x.shape[0], False, self.out_features)
        if scale_out is not None:
            result = (result.to(scale_out.dtype) * per_row(scale_out, result)).to(result.dtype)
        return result

    def merged_weight(self, name: str, weight: torch.Tensor) -> torch.Tensor:
        # l is (out, 1) or (1, in) against an (out, in) weight; transposed for Conv1D's (in, out).
        vec = self.ia3_l[name].detach().float()
        return weight.float() * (vec.T if self.fan_in_fan_out else vec)

    def merge(self, name: str) -> None:
        """An output scale also scales the bias: (W x + b) * l = (l W) x + l b."""
        bias = getattr(self.base_module, "bias", None)
        if name not in self.merged:
            self.check_can_merge(name)  # before touching the bias: a refused merge changes nothing
        if name not in self.merged and not self.is_feedforward[name] and bias is not None:
            if self._original_bias is None:
                self._original_bias = bias.data.clone()
            bias.data = (bias.data.float() * self.ia3_l[name].detach().flatten().float()).to(bias.dtype)
        super().merge(name)

    def unmerge(self) -> None:
        if self._original_bias is not None:
            self.base_module.bias.data = self._original_bias
            self._original_bias = None
        super().unmerge()


def attach_ia3(model: nn.Module, cfg: IA3Config, name: str) -> tuple[list[str], IA3Config]:
    targets, feedforward = resolve_ia3_targets(model, cfg.target_modules, cfg.feedforward_modules)
    names = find_targets(model, targets)
    # Record what was resolved, so the saved config rebuilds the same layers (as PEFT's does).
    resolved = replace(cfg, target_modules=targets if isinstance(targets, str) else sorted(targets),
                       feedforward_modules=feedforward if isinstance(feedforward, str) else sorted(feedforward))
    layers = []
    for module_name in names:
        layer = wrap_module(model, module_name, IA3Linear)
        layer.add_adapter(name, resolved, is_feedforward(module_name, feedforward))
        layers.append(layer)
    resolved.fan_in_fan_out = any(layer.fan_in_fan_out for layer in layers)
    return names, resolved


def _to_peft(cfg: IA3Config) -> dict:
    return {
        "peft_type": "IA3", "task_type": "CAUSAL_LM", "target_modules": cfg.target_modules,
        "feedforward_modules": cfg.feedforward_modules, "fan_in_fan_out": cfg.fan_in_fan_out,
        "init_ia3_weights": cfg.init_ia3_weights, "modules_to_save": cfg.modules_to_save, "exclude_modules": None,
        "inference_mode": True,
    }


def _from_peft(saved: dict) -> IA3Config:
    unsupported = {k: saved[k] for k in ("exclude_modules",) if saved.get(k)}
    if unsupported:
        raise ValueError(f"this (IA)^3 adapter uses PEFT options plugtune does not support yet: {unsupported}")

    def names(value):
        return value if value is None or isinstance(value, str) else sorted(value)

    return IA3Config(
        target_modules=names(saved.get("target_modules")),
        feedforward_modules=names(saved.get("feedforward_modules")),
        fan_in_fan_out=bool(saved.get("fan_in_fan_out", False)),
        init_ia3_weights=bool(saved.get("init_ia3_weights", True)),
        modules_to_save=list(saved["modules_to_save"]) if saved.get("modules_to_save") else None,
    )


register(AdapterMethod(name="ia3", config_cls=IA3Config, attach=attach_ia3, peft_type="IA3",
                       to_saved=_to_peft, from_saved=_from_peft, can_merge=True, examples={"ia3": {}}))
