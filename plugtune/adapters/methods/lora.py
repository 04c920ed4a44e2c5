"""LoRA (Hu et al. 2021), rsLoRA (Kalajdzievski 2023) and DoRA (Liu et al. 2024).

    h = W x + s * B A x,      A: (r, in) random,  B: (out, r) zero  -> unchanged model at init
    s = alpha / r             (LoRA, eq. 3)      or  alpha / sqrt(r)  (rsLoRA)
    DoRA:  W' = m * (W + s B A) / ||W + s B A||_c      m: (out,) initialised to ||W||_c (eq. 5)

Parameter names follow PEFT (`q_proj.lora_A.<adapter>.weight`, `lora_magnitude_vector`), so the
saved files are PEFT's format. GPT-2's Conv1D stores its weight as (in, out): `fan_in_fan_out`.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import nn

from plugtune.adapters.layers import AdapterLayer, find_targets, wrap_module
from plugtune.adapters.registry import AdapterMethod, register
from plugtune.adapters.targets import resolve_attention_targets


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


class LoraLinear(AdapterLayer):
    adapter_module_names = ("lora_A", "lora_B", "lora_magnitude_vector")

    def __init__(self, base_layer: nn.Module):
        super().__init__(base_layer)
        self.fan_in_fan_out = type(base_layer).__name__ == "Conv1D"
        w = base_layer.weight
        self.in_features, self.out_features = (w.shape[0], w.shape[1]) if self.fan_in_fan_out else (w.shape[1], w.shape[0])
        self.lora_A = nn.ModuleDict()
        self.lora_B = nn.ModuleDict()
        self.lora_magnitude_vector = nn.ParameterDict()  # DoRA m; saved as PEFT's '...lora_magnitude_vector'
        self.lora_dropout = nn.ModuleDict()
        self.scaling: dict[str, float] = {}

    def add_adapter(self, name: str, cfg: LoraConfig) -> None:
        w = self.base_layer.weight
        a = nn.Linear(self.in_features, cfg.r, bias=False, device=w.device, dtype=torch.float32)
        b = nn.Linear(cfg.r, self.out_features, bias=False, device=w.device, dtype=torch.float32)
        nn.init.kaiming_uniform_(a.weight, a=math.sqrt(5))  # PEFT's default init for A
        nn.init.zeros_(b.weight)
        self.lora_A[name], self.lora_B[name] = a, b
        self.lora_dropout[name] = nn.Dropout(cfg.dropout) if cfg.dropout > 0 else nn.Identity()
        self.scaling[name] = cfg.scaling
        if cfg.use_dora:
            self.lora_magnitude_vector[name] = nn.Parameter(self._column_norm(self._weight_out_in().detach().float()))
        self.register_adapter(name, cfg)

    def _weight_out_in(self) -> torch.Tensor:
        w = self.base_layer.weight
        return w.T if self.fan_in_fan_out else w

    @staticmethod
    def _column_norm(weight_out_in: torch.Tensor) -> torch.Tensor:
        return weight_out_in.norm(p=2, dim=1)  # (out,): one norm per output unit

    def delta_weight(self, name: str) -> torch.Tensor:
        """s * B A as an (out, in) matrix."""
        return (self.lora_B[name].weight @ self.lora_A[name].weight) * self.scaling[name]

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        result = self.base_layer(x, *args, **kwargs)
        for name in self.live_adapters():
            a, b = self.lora_A[name], self.lora_B[name]
            xd = self.lora_dropout[name](x).to(a.weight.dtype)
            lora_out = b(a(xd)) * self.scaling[name]  # (..., out)
            if name in self.lora_magnitude_vector:
                # DoRA: scale = m / ||W + sBA||, the norm detached (paper sec. 4.3) as PEFT does.
                weight = self._weight_out_in().to(lora_out.dtype)
                norm = self._column_norm(weight + self.delta_weight(name)).detach()
                scale = self.lora_magnitude_vector[name] / norm  # (out,)
                bias = self.base_layer.bias
                base_no_bias = result - bias if bias is not None else result
                lora_out = (scale - 1) * base_no_bias.to(lora_out.dtype) + scale * lora_out
            result = result + lora_out.to(result.dtype)
        return result

    def merged_weight(self, name: str, weight: torch.Tensor) -> torch.Tensor:
        w = (weight.T if self.fan_in_fan_out else weight).float()
        new = w + self.delta_weight(name).float()
        if name in self.lora_magnitude_vector:
            new = new * (self.lora_magnitude_vector[name].float() / self._column_norm(new)).unsqueeze(1)
        return new.T if self.fan_in_fan_out else new


class LoraEmbedding(AdapterLayer):
    """LoRA on an embedding table (opt-in: name it in target_modules, e.g. 'embed_tokens').

        E'[i] = E[i] + s * (B A)^T[i]     A: (r, vocab) zero, B: (dim, r) random   (PEFT's layout and init)
    """

    adapter_module_names = ("lora_embedding_A", "lora_embedding_B")

    def __init__(self, base_layer: nn.Embedding):
        super().__init__(base_layer)
        self.lora_embedding_A = nn.ParameterDict()
        self.lora_embedding_B = nn.ParameterDict()
        self.scaling: dict[str, float] = {}

    def add_adapter(self, name: str, cfg: LoraConfig) -> None:
        if cfg.use_dora:
            raise ValueError("DoRA is not supported on embedding layers; drop the embedding from target_modules")
        vocab, dim = self.base_layer.weight.shape
        device = self.base_layer.weight.device
        self.lora_embedding_A[name] = nn.Parameter(torch.zeros(cfg.r, vocab, device=device))
        self.lora_embedding_B[name] = nn.Parameter(torch.randn(dim, cfg.r, device=device))
        self.scaling[name] = cfg.scaling
        self.register_adapter(name, cfg)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        result = self.base_layer(x)
        for name in self.live_adapters():
            a, b = self.lora_embedding_A[name], self.lora_embedding_B[name]
            rows = nn.functional.embedding(x, a.T, padding_idx=self.base_layer.padding_idx)  # (..., r)
            result = result + (rows @ b.T * self.scaling[name]).to(result.dtype)
        return result

    def merged_weight(self, name: str, weight: torch.Tensor) -> torch.Tensor:
        delta = (self.lora_embedding_B[name] @ self.lora_embedding_A[name]).T * self.scaling[name]  # (vocab, dim)
        return weight.float() + delta.float()


def _linear_or_embedding(module: nn.Module) -> bool:
    return isinstance(module, nn.Embedding) or isinstance(module, nn.Linear) or type(module).__name__ == "Conv1D"


def attach_lora(model: nn.Module, cfg: LoraConfig, name: str) -> list[str]:
    targets = resolve_attention_targets(model, cfg.target_modules)
    names = find_targets(model, targets, kind=_linear_or_embedding)
    for module_name in names:
        is_embedding = isinstance(model.get_submodule(module_name), nn.Embedding)
        layer_cls = LoraEmbedding if is_embedding else LoraLinear
        layer = wrap_module(model, module_name, layer_cls)
        if not isinstance(layer, layer_cls):
            raise TypeError(f"{module_name} already carries a {type(layer).__name__}; cannot add LoRA to it")
        layer.add_adapter(name, cfg)
    # Save concrete names PEFT can match: the given list, or the leaf names 'all-linear' resolved to.
    if targets == "all-linear":
        cfg.target_modules = sorted({n.rsplit(".", 1)[-1] for n in names})
    else:
        cfg.target_modules = targets
    return names


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


register(AdapterMethod(name="lora", config_cls=LoraConfig, attach=attach_lora, peft_type="LORA",
                       to_saved=_to_peft, from_saved=_from_peft))
