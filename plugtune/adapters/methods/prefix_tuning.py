"""Prefix tuning (Li & Liang 2021, "Prefix-Tuning: Optimizing Continuous Prompts for Generation").

Every layer attends to n trainable key/value vectors before the real tokens (eq. 2:
h_i = P_theta[i] for prefix positions), i.e. the KV cache starts with a learned prefix. Keys are
stored as-is (no rotary embedding applied), as PEFT does. The prefix lives in
`model.prefix_encoder`, which wraps no layer: `causal_lm.prepare_inputs` finds it by its
`virtual_inputs` method and writes the prefix to a transformers DynamicCache.

    P: (n, 2 * L * H_kv * D)  -> view (n, 2L, H_kv, D): rows 2l / 2l+1 are layer l's keys / values
    reparameterised (sec. 4.3, PEFT's prefix_projection): P = MLP(P'),  P': (n, H_kv * D),
    MLP = Linear(H_kv*D, encoder_hidden_size) -> tanh -> Linear(encoder_hidden_size, 2*L*H_kv*D)

Not an identity at init: the prefix takes attention mass (even a zero prefix, PEFT's
init_weights="zero", since exp(q . 0) = 1 per prefix slot). With the adapter disabled
(`adapters_disabled`) the model is the base, bit for bit.

PEFT format: peft_type PREFIX_TUNING; one tensor `prompt_embeddings` = the resolved P (n, 2*L*H_kv*D).
With prefix_projection PEFT also saves only MLP(P'), not P' or the MLP (the paper drops the
reparameterisation after training). We write prefix_projection=false, which is what the file
holds (PEFT loads prompt-learning adapters for inference only, where both read the same). token_dim = H_kv * D and num_attention_heads = H_kv
(PEFT's rule for grouped-query attention). Supports decoders whose layers share one KV shape
(Llama, GPT-2, Mistral, Qwen ...).
"""
from __future__ import annotations

from dataclasses import dataclass, replace

import torch
from torch import nn

from plugtune.adapters.virtual import VirtualTokenEncoder, encoder_of, peft_single_tensor_format
from plugtune.adapters.registry import AdapterMethod, register

ENCODER = "prefix_encoder"  # attribute of the model holding the prefixes


@dataclass
class PrefixTuningConfig:
    num_virtual_tokens: int = 20
    prefix_projection: bool = False  # train P' and an MLP instead of P (sec. 4.3)
    encoder_hidden_size: int | None = None  # the MLP's width; default token_dim (PEFT)
    init_weights: str | None = None  # None: N(0, 1) (PEFT's nn.Embedding default); "zero": zero prefix
    # The base's KV shape, filled in by attach; PEFT records them in adapter_config.json.
    token_dim: int | None = None  # H_kv * D
    num_layers: int | None = None
    num_attention_heads: int | None = None  # H_kv

    def __post_init__(self):
        if self.num_virtual_tokens < 1:
            raise ValueError(f"num_virtual_tokens must be >= 1, got {self.num_virtual_tokens}")
        if self.init_weights not in (None, "zero"):
            raise ValueError(f"prefix tuning init_weights must be null or 'zero', got {self.init_weights!r}")


def kv_shape(model: nn.Module) -> tuple[int, int, int]:
    """(layers L, KV heads H_kv, head dim D) of a decoder, from its config."""
    conf = model.config
    conf = conf.get_text_config() if hasattr(conf, "get_text_config") else conf
    heads = conf.num_attention_heads
    kv_heads = getattr(conf, "num_key_value_heads", None) or heads
    head_dim = getattr(conf, "head_dim", None) or conf.hidden_size // heads
    return conf.num_hidden_layers, kv_heads, head_dim


class PrefixEncoder(VirtualTokenEncoder):
    """Per-layer key/value prefixes, one set per adapter; it feeds the KV cache through `virtual_inputs`."""

    adapter_module_names = ("prefix_embeddings", "prefix_mlp")
    table_attr = "prefix_embeddings"
    merge_refusal = "a KV prefix is extra context, not a weight change: prefix tuning cannot be merged"

    def __init__(self):
        super().__init__()
        self.prefix_embeddings = nn.ParameterDict()  # P (n, 2*L*H_kv*D), or P' (n, H_kv*D) with the MLP
        self.prefix_mlp = nn.ModuleDict()

    def add_adapter(self, name: str, cfg: PrefixTuningConfig, device: torch.device) -> None:
        n, dim, width = cfg.num_virtual_tokens, cfg.token_dim, 2 * cfg.num_layers * cfg.token_dim
        if cfg.prefix_projection:
            hidden = cfg.encoder_hidden_size or dim
            mlp = nn.Sequential(nn.Linear(dim, hidden), nn.Tanh(), nn.Linear(hidden, width)).to(device)
            if cfg.init_weights == "zero":
                nn.init.zeros_(mlp[-1].weight)
                nn.init.zeros_(mlp[-1].bias)
            self.prefix_mlp[name] = mlp
            table = torch.randn(n, dim, device=device)
        else:
            table = torch.zeros(n, width, device=device) if cfg.init_weights == "zero" else torch.randn(n, width, device=device)
        self.prefix_embeddings[name] = nn.Parameter(table)  # fp32, as PEFT
        self.register_adapter(name, cfg)

    def prefix(self, name: str) -> torch.Tensor:
        """The resolved prefix P (n, 2*L*H_kv*D)."""
        table = self.prefix_embeddings[name]
        return self.prefix_mlp[name](table) if name in self.prefix_mlp else table

    def layer_kv(self, name: str, batch_size: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """[(key, value)] per layer, each (B, H_kv, n, D): PEFT's view/permute of P."""
        cfg = self.configs[name]
        heads = cfg.num_attention_heads
        p = self.prefix(name).view(cfg.num_virtual_tokens, 2 * cfg.num_layers, heads, cfg.token_dim // heads)
        p = p.permute(1, 2, 0, 3)  # (2L, H_kv, n, D)
        return [(p[2 * i].expand(batch_size, -1, -1, -1), p[2 * i + 1].expand(batch_size, -1, -1, -1))
                for i in range(cfg.num_layers)]

    def virtual_inputs(self, batch_size: int) -> dict:
        live = self.live_adapters() if self.row_plan is None else []  # per-row batches: no row can have a prefix
        if not live:
            return {}
        per_adapter = [self.layer_kv(n, batch_size) for n in live]
        prefix = [(torch.cat([kv[0] for kv in layer], dim=2), torch.cat([kv[1] for kv in layer], dim=2))
                  for layer in zip(*per_adapter)]  # several adapters: prefixes side by side along n
        return {"prefix": prefix}

    def saved_table(self, name: str) -> torch.Tensor:
        return self.prefix(name)  # the resolved P, as PEFT saves it

    def row_refusal(self, name: str) -> str | None:
        return ("prefix tuning writes its own key/value prefix into every layer's KV cache before the first "
                "token; rows with different prefixes would need ragged caches. Serve it alone (use())")


def attach_prefix_tuning(model: nn.Module, cfg: PrefixTuningConfig, name: str) -> tuple[list[str], PrefixTuningConfig]:
    layers, kv_heads, head_dim = kv_shape(model)
    resolved = replace(cfg, num_layers=layers, num_attention_heads=kv_heads, token_dim=kv_heads * head_dim)
    encoder_of(model, ENCODER, PrefixEncoder).add_adapter(name, resolved, model.get_input_embeddings().weight.device)
    return [ENCODER], resolved


_saved_state, _load_state = peft_single_tensor_format(ENCODER)


def _to_peft(cfg: PrefixTuningConfig) -> dict:
    return {
        "peft_type": "PREFIX_TUNING", "task_type": "CAUSAL_LM", "num_virtual_tokens": cfg.num_virtual_tokens,
        "token_dim": cfg.token_dim, "num_transformer_submodules": 1, "num_layers": cfg.num_layers,
        "num_attention_heads": cfg.num_attention_heads, "prefix_projection": False,  # the file holds P
        "encoder_hidden_size": cfg.encoder_hidden_size or cfg.token_dim, "init_weights": cfg.init_weights,
        "inference_mode": True, "modules_to_save": None,
    }


def _from_peft(saved: dict) -> PrefixTuningConfig:
    if saved.get("task_type") not in (None, "CAUSAL_LM") or saved.get("num_transformer_submodules") not in (None, 1):
        raise ValueError(f"plugtune supports prefix tuning of causal LMs only; this adapter has "
                         f"task_type={saved.get('task_type')!r}, num_transformer_submodules="
                         f"{saved.get('num_transformer_submodules')!r}")
    # The file holds the resolved P even when PEFT trained with prefix_projection: load it as a table.
    return PrefixTuningConfig(num_virtual_tokens=int(saved["num_virtual_tokens"]), prefix_projection=False,
                              encoder_hidden_size=saved.get("encoder_hidden_size"),
                              init_weights=saved.get("init_weights"), token_dim=saved.get("token_dim"),
                              num_layers=saved.get("num_layers"), num_attention_heads=saved.get("num_attention_heads"))


register(AdapterMethod(name="prefix_tuning", config_cls=PrefixTuningConfig, attach=attach_prefix_tuning,
                       peft_type="PREFIX_TUNING", to_saved=_to_peft, from_saved=_from_peft,
                       saved_state=_saved_state, load_state=_load_state,
                       examples={"prefix tuning (20 tok)": {"num_virtual_tokens": 20}}))
