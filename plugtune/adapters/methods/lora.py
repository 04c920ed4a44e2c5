"""LoRA (Hu et al. 2021), rsLoRA (Kalajdzievski 2023) and DoRA (Liu et al. 2024).

    h = W x + s * B A x,      A: (r, in) random,  B: (out, r) zero  -> unchanged model at init
    s = alpha / r             (LoRA, eq. 3)      or  alpha / sqrt(r)  (rsLoRA)
    DoRA:  W' = m * (W + s B A) / ||W + s B A||_c      m: (out,) initialised to ||W||_c (eq. 5)

Parameter names follow PEFT (`q_proj.lora_A.<adapter>.weight`, `lora_magnitude_vector`), so the
saved files are PEFT's format. GPT-2's Conv1D stores its weight as (in, out): `fan_in_fan_out`.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch
from torch import nn

from plugtune.adapters.layers import AdapterLayer, find_targets, is_conv1d, linear_features, wrap_module
from plugtune.adapters.mixed import rows_view
from plugtune.adapters.registry import AdapterMethod, register
from plugtune.adapters.targets import resolve_attention_targets
from plugtune.models.quantize import QuantizedLinear


@dataclass
class LoraConfig:
    r: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    target_modules: list[str] | str = "attention"  # names, a regex, 'all-linear' or 'attention'
    use_rslora: bool = False
    use_dora: bool = False
    modules_to_save: list[str] | None = None  # modules trained whole alongside, e.g. ["classifier"]

    def __post_init__(self):
        if self.r < 1:
            raise ValueError(f"LoRA rank r must be >= 1, got {self.r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"LoRA dropout must be in [0, 1), got {self.dropout}")

    @property
    def scaling(self) -> float:
        return self.alpha / (math.sqrt(self.r) if self.use_rslora else self.r)


class DoraVariant:
    """DoRA as a strategy on a LoRA layer (Liu et al. 2024, eq. 5), not a branch in forward:
    output = m / ||W + sBA||_c * (W + sBA) x, the norm detached (sec. 4.3) as PEFT does."""

    @staticmethod
    def output(layer: "LoraLinear", name: str, base_out: torch.Tensor, lora_out: torch.Tensor) -> torch.Tensor:
        weight = layer.weight_out_in().to(lora_out.dtype)
        norm = column_norm(weight + layer.delta_weight(name)).detach()
        scale = layer.lora_magnitude_vector[name] / norm  # (out,)
        bias = layer.base_module.bias
        base_no_bias = base_out - bias if bias is not None else base_out
        return (scale - 1) * base_no_bias.to(lora_out.dtype) + scale * lora_out

    @staticmethod
    def merged(layer: "LoraLinear", name: str, adapted: torch.Tensor) -> torch.Tensor:
        return adapted * (layer.lora_magnitude_vector[name].float() / column_norm(adapted)).unsqueeze(1)


def column_norm(weight_out_in: torch.Tensor) -> torch.Tensor:
    return weight_out_in.norm(p=2, dim=1)  # (out,): one norm per output unit


class LoraLinear(AdapterLayer):
    adapter_module_names = ("lora_A", "lora_B", "lora_magnitude_vector")
    adapter_side_tables = ("lora_dropout", "scaling", "variants")

    def __init__(self, base_layer: nn.Module):
        super().__init__(base_layer)
        self.fan_in_fan_out = is_conv1d(self.base_module)
        self.in_features, self.out_features = linear_features(self.base_module)
        self.lora_A = nn.ModuleDict()
        self.lora_B = nn.ModuleDict()
        self.lora_magnitude_vector = nn.ParameterDict()  # DoRA m; saved as PEFT's '...lora_magnitude_vector'
        self.lora_dropout = nn.ModuleDict()
        self.scaling: dict[str, float] = {}
        self.variants: dict[str, DoraVariant] = {}
        self._stack_key: tuple | None = None  # see stacked_factors
        self._stack: tuple[torch.Tensor, torch.Tensor] | None = None
        self._stack_plan = None  # the row plan the stack was last checked for

    def add_adapter(self, name: str, cfg: LoraConfig) -> None:
        device = self.base_device
        a = nn.Linear(self.in_features, cfg.r, bias=False, device=device, dtype=torch.float32)
        b = nn.Linear(cfg.r, self.out_features, bias=False, device=device, dtype=torch.float32)
        nn.init.kaiming_uniform_(a.weight, a=math.sqrt(5))  # PEFT's default init for A
        nn.init.zeros_(b.weight)
        self.lora_A[name], self.lora_B[name] = a, b
        self.lora_dropout[name] = nn.Dropout(cfg.dropout) if cfg.dropout > 0 else nn.Identity()
        self.scaling[name] = cfg.scaling
        if cfg.use_dora:
            self.lora_magnitude_vector[name] = nn.Parameter(column_norm(self.weight_out_in().detach().float()))
            self.variants[name] = DoraVariant()
        self.register_adapter(name, cfg)

    def delete_adapter(self, name: str) -> None:
        super().delete_adapter(name)
        self.invalidate_stack()

    def invalidate_stack(self) -> None:
        self._stack_key = self._stack = self._stack_plan = None

    def weight_out_in(self) -> torch.Tensor:
        """The base weight as (out, in); on a quantized base, this one layer's weight dequantized now."""
        w = self.base_module.weight
        return w.T if self.fan_in_fan_out else w

    def delta_weight(self, name: str) -> torch.Tensor:
        """s * B A as an (out, in) matrix."""
        return (self.lora_B[name].weight @ self.lora_A[name].weight) * self.scaling[name]

    def adapter_output(self, name: str, x: torch.Tensor, base_out: torch.Tensor | None) -> torch.Tensor:
        """What adapter `name` adds to the base output for inputs x (..., in) -> (..., out)."""
        a, b = self.lora_A[name], self.lora_B[name]
        lora_out = b(a(self.lora_dropout[name](x).to(a.weight.dtype))) * self.scaling[name]
        variant = self.variants.get(name)
        return variant.output(self, name, base_out, lora_out) if variant else lora_out

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        result = self.base_layer(x, *args, **kwargs)
        if self.row_plan is not None:
            return self._forward_rows(x, result)
        for name in self.live_adapters():
            result = result + self.adapter_output(name, x, result).to(result.dtype)
        return result

    def row_refusal(self, name: str) -> str | None:
        if name in self.variants:
            return ("DoRA rescales the whole adapted weight W + sBA by its column norms, a different matrix "
                    "per row; serve DoRA adapters alone (use()) or merge them")
        return None

    def _forward_rows(self, x: torch.Tensor, result: torch.Tensor) -> torch.Tensor:
        batch = x.shape[0]
        groups = self.row_groups(batch)
        if not groups:
            return result
        if len(groups) > 1 and not torch.is_grad_enabled() and not self.training and self._stack_pays_off():
            # Punica-style: gather each row's (rank-padded) factors, two batched matmuls for all rows.
            order = tuple(self.lora_A.keys())
            a_all, b_all = self.stacked_factors(order, self.row_plan)
            slots = self.row_plan.slots(order)  # (B,)
            xr = rows_view(x, batch).to(a_all.dtype)  # (B, N, in)
            h = torch.bmm(xr, a_all[slots].transpose(1, 2))  # (B, N, r_max)
            delta = torch.bmm(h, b_all[slots].transpose(1, 2))  # (B, N, out)
            return result + delta.view(result.shape).to(result.dtype)
        for name, idx in groups:  # gather the adapter's rows, scatter its output back (autograd-safe)
            xs = x if idx is None else x.index_select(0, idx)
            delta = self.adapter_output(name, xs, None).to(result.dtype)
            result = result + delta if idx is None else result.index_add(0, idx, delta)
        return result

    def _stack_pays_off(self) -> bool:
        """Rank padding wastes memory and flops when ranks differ a lot (one r 64 among many r 4): then
        the grouped path is used instead. The stack holds at most twice the adapters' own factors."""
        ranks = [a.weight.shape[0] for a in self.lora_A.values()]
        return (len(ranks) + 1) * max(ranks) <= 2 * sum(ranks) + 2 * max(ranks)

    @torch.no_grad()
    def stacked_factors(self, order: tuple[str, ...], plan=None) -> tuple[torch.Tensor, torch.Tensor]:
        """A (n+1, r_max, in) and s*B (n+1, out, r_max), entry 0 all zero (rows without an adapter).
        Zero-padding the rank changes nothing: padded columns of B meet padded rows of A. Rebuilt
        only when an adapter's weights change (their version counters or storage) or the adapter set
        does. Writing through `p.data` bypasses the version counter: call `invalidate_stack()` then."""
        if plan is not None and plan is self._stack_plan and self._stack is not None:
            return self._stack  # checked already for this row plan (the weights do not change mid-generation)
        key = tuple((n, self.lora_A[n].weight._version, self.lora_B[n].weight._version,
                     self.lora_A[n].weight.data_ptr(), self.lora_B[n].weight.data_ptr()) for n in order)
        self._stack_plan = plan
        if key != self._stack_key:
            r_max = max(self.lora_A[n].weight.shape[0] for n in order)
            ref = self.lora_A[order[0]].weight
            a_all = ref.new_zeros(len(order) + 1, r_max, self.in_features)
            b_all = ref.new_zeros(len(order) + 1, self.out_features, r_max)
            for k, n in enumerate(order, start=1):
                r = self.lora_A[n].weight.shape[0]
                a_all[k, :r] = self.lora_A[n].weight
                b_all[k, :, :r] = self.lora_B[n].weight * self.scaling[n]
            self._stack_key, self._stack = key, (a_all, b_all)
        return self._stack

    def merged_weight(self, name: str, weight: torch.Tensor) -> torch.Tensor:
        w = (weight.T if self.fan_in_fan_out else weight).float()
        new = w + self.delta_weight(name).float()
        if name in self.variants:
            new = self.variants[name].merged(self, name, new)
        return new.T if self.fan_in_fan_out else new


class LoraEmbedding(AdapterLayer):
    """LoRA on an embedding table (opt-in: name it in target_modules, e.g. 'embed_tokens').

        E'[i] = E[i] + s * (B A)^T[i]     A: (r, vocab) zero, B: (dim, r) random   (PEFT's layout and init)
    """

    adapter_module_names = ("lora_embedding_A", "lora_embedding_B")
    adapter_side_tables = ("scaling",)

    def __init__(self, base_layer: nn.Embedding):
        super().__init__(base_layer)
        self.lora_embedding_A = nn.ParameterDict()
        self.lora_embedding_B = nn.ParameterDict()
        self.scaling: dict[str, float] = {}

    def add_adapter(self, name: str, cfg: LoraConfig) -> None:
        if cfg.use_dora:
            raise ValueError("DoRA is not supported on embedding layers; drop the embedding from target_modules")
        vocab, dim = self.base_module.weight.shape
        device = self.base_module.weight.device
        self.lora_embedding_A[name] = nn.Parameter(torch.zeros(cfg.r, vocab, device=device))
        self.lora_embedding_B[name] = nn.Parameter(torch.randn(dim, cfg.r, device=device))
        self.scaling[name] = cfg.scaling
        self.register_adapter(name, cfg)

    def adapter_output(self, name: str, x: torch.Tensor) -> torch.Tensor:
        a, b = self.lora_embedding_A[name], self.lora_embedding_B[name]
        rows = nn.functional.embedding(x, a.T, padding_idx=self.base_module.padding_idx)  # (..., r)
        return rows @ b.T * self.scaling[name]  # (..., dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        result = self.base_layer(x)
        if self.row_plan is not None:
            for name, idx in self.row_groups(x.shape[0]):
                delta = self.adapter_output(name, x if idx is None else x.index_select(0, idx)).to(result.dtype)
                result = result + delta if idx is None else result.index_add(0, idx, delta)
            return result
        for name in self.live_adapters():
            result = result + self.adapter_output(name, x).to(result.dtype)
        return result

    def merged_weight(self, name: str, weight: torch.Tensor) -> torch.Tensor:
        delta = (self.lora_embedding_B[name] @ self.lora_embedding_A[name]).T * self.scaling[name]  # (vocab, dim)
        return weight.float() + delta.float()


def _linear_or_embedding(module: nn.Module) -> bool:
    return isinstance(module, (nn.Embedding, nn.Linear, QuantizedLinear)) or is_conv1d(module)


def attach_lora(model: nn.Module, cfg: LoraConfig, name: str) -> tuple[list[str], LoraConfig]:
    targets = resolve_attention_targets(model, cfg.target_modules)
    names = find_targets(model, targets, kind=_linear_or_embedding)
    # Save concrete names PEFT can match: the given list, or the leaf names 'all-linear' resolved to.
    resolved = replace(cfg, target_modules=sorted({n.rsplit(".", 1)[-1] for n in names})
                       if targets == "all-linear" else targets)
    for module_name in names:
        target = model.get_submodule(module_name)
        base = target.base_module if isinstance(target, AdapterLayer) else target
        layer = wrap_module(model, module_name, LoraEmbedding if isinstance(base, nn.Embedding) else LoraLinear)
        layer.add_adapter(name, resolved)
    return names, resolved


def _to_peft(cfg: LoraConfig) -> dict:
    return {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": cfg.r, "lora_alpha": cfg.alpha,
        "lora_dropout": cfg.dropout, "target_modules": cfg.target_modules, "use_rslora": cfg.use_rslora,
        "use_dora": cfg.use_dora, "fan_in_fan_out": False, "bias": "none", "modules_to_save": cfg.modules_to_save,
        "init_lora_weights": True, "inference_mode": True,
    }


def _from_peft(saved: dict) -> LoraConfig:
    unsupported = {k: saved[k] for k in ("bias",) if saved.get(k) not in (None, "none")}
    for key in ("layers_to_transform", "rank_pattern", "alpha_pattern"):
        if saved.get(key):
            unsupported[key] = saved[key]
    if unsupported:
        raise ValueError(f"this LoRA adapter uses PEFT options plugtune does not support yet: {unsupported}")
    targets = saved.get("target_modules")
    return LoraConfig(
        r=int(saved["r"]), alpha=float(saved.get("lora_alpha", 8)), dropout=float(saved.get("lora_dropout", 0.0)),
        target_modules=targets if isinstance(targets, str) else sorted(targets),
        use_rslora=bool(saved.get("use_rslora", False)), use_dora=bool(saved.get("use_dora", False)),
        modules_to_save=list(saved["modules_to_save"]) if saved.get("modules_to_save") else None,
    )


register(AdapterMethod(
    name="lora", config_cls=LoraConfig, attach=attach_lora, peft_type="LORA", to_saved=_to_peft, from_saved=_from_peft,
    can_merge=True, examples={"lora r=8": {"r": 8, "alpha": 16},
                              "lora r=8 all-linear": {"r": 8, "alpha": 16, "target_modules": "all-linear"},
                              "rslora r=16": {"r": 16, "alpha": 16, "use_rslora": True},
                              "dora r=8": {"r": 8, "alpha": 16, "use_dora": True}}))
