"""Default target modules per architecture family, found by the module names a model has."""
from __future__ import annotations

from torch import nn

# Family -> (a name that identifies it, the attention projections to adapt by default)
_ATTENTION = [
    ("q_proj", ["q_proj", "k_proj", "v_proj", "o_proj"]),  # Llama, Mistral, Qwen, SmolLM, ...
    ("c_attn", ["c_attn", "attn.c_proj"]),  # GPT-2 (fused qkv Conv1D)
    ("query", ["query", "key", "value", "attention.output.dense"]),  # BERT-style encoders
    ("q_lin", ["q_lin", "k_lin", "v_lin", "out_lin"]),  # DistilBERT
]


def resolve_attention_targets(model: nn.Module, target_modules):
    """'attention' -> this model's attention projections; anything else is returned unchanged."""
    if target_modules != "attention":
        return target_modules
    names = {n.rsplit(".", 1)[-1] for n, _ in model.named_modules()}
    for marker, targets in _ATTENTION:
        if marker in names:
            return targets
    raise ValueError("could not find attention projections in this model; set target_modules explicitly "
                     "(a list of module names, a regex, or 'all-linear')")


# (IA)^3 defaults, as PEFT's TRANSFORMERS_MODELS_TO_IA3_{TARGET,FEEDFORWARD}_MODULES_MAPPING give them
# (peft/utils/constants.py), for the families plugtune loads: model_type -> (targets, feedforward targets).
# Feedforward targets are scaled on their input, the others on their output.
_LLAMA_IA3 = (["k_proj", "v_proj", "down_proj"], ["down_proj"])
_QV_DOWN_IA3 = (["q_proj", "v_proj", "down_proj"], ["down_proj"])
_GPT2_IA3 = (["c_attn", "mlp.c_proj"], ["mlp.c_proj"])
_BERT_IA3 = (["key", "value", "output.dense"], ["output.dense"])
_IA3 = {
    "llama": _LLAMA_IA3, "mistral": _LLAMA_IA3, "qwen2": _QV_DOWN_IA3, "qwen3": _QV_DOWN_IA3,
    "gemma": _QV_DOWN_IA3, "gemma2": _QV_DOWN_IA3, "gemma3_text": _QV_DOWN_IA3,
    "gpt2": _GPT2_IA3, "gpt_bigcode": _GPT2_IA3, "bert": _BERT_IA3, "roberta": _BERT_IA3,
    "opt": (["q_proj", "k_proj", "fc2"], ["fc2"]), "phi": (["q_proj", "v_proj", "fc2"], ["fc2"]),
    "gpt_neox": (["query_key_value", "dense_4h_to_h"], ["dense_4h_to_h"]),
}
# Model types PEFT does not list: recognised by a module name (marker -> defaults).
_IA3_BY_MARKER = [("down_proj", _LLAMA_IA3), ("c_attn", _GPT2_IA3), ("query", _BERT_IA3)]


def resolve_ia3_targets(model: nn.Module, target_modules, feedforward_modules):
    """None -> this architecture's (IA)^3 defaults; given values are returned unchanged."""
    if target_modules is not None and feedforward_modules is not None:
        return target_modules, feedforward_modules
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    defaults = _IA3.get(model_type)
    if defaults is None:
        names = {n.rsplit(".", 1)[-1] for n, _ in model.named_modules()}
        defaults = next((d for marker, d in _IA3_BY_MARKER if marker in names), None)
    if defaults is None:
        raise ValueError(f"no default (IA)^3 targets for model type {model_type!r}; set target_modules and "
                         "feedforward_modules explicitly (feedforward_modules=[] for none)")
    targets = list(defaults[0]) if target_modules is None else target_modules
    feedforward = list(defaults[1]) if feedforward_modules is None else feedforward_modules
    return targets, feedforward


# Bottleneck adapter sites (Houlsby et al. 2019, fig. 2): marker -> (attention output projection, MLP output
# projection), as regex tails of a module name. BERT's FFN output is `layer.N.output.dense`, which must not
# catch `layer.N.attention.output.dense`, hence regexes rather than suffixes.
_BOTTLENECK = [
    ("down_proj", r"o_proj", r"down_proj"),  # Llama, Mistral, Qwen, Gemma (gated MLP)
    ("c_attn", r"attn\.c_proj", r"mlp\.c_proj"),  # GPT-2
    ("query", r"attention\.output\.dense", r"layer\.\d+\.output\.dense"),  # BERT-style encoders
    ("q_lin", r"attention\.out_lin", r"ffn\.lin2"),  # DistilBERT
]


def resolve_bottleneck_targets(model: nn.Module, variant: str, target_modules=None):
    """None -> a regex for this model's adapter sites: attention and MLP outputs (houlsby) or the MLP
    output only (pfeiffer). Given targets are returned unchanged."""
    if target_modules is not None:
        return target_modules
    names = {n.rsplit(".", 1)[-1] for n, _ in model.named_modules()}
    for marker, attention_out, mlp_out in _BOTTLENECK:
        if marker in names:
            sites = [attention_out, mlp_out] if variant == "houlsby" else [mlp_out]
            return rf".*\.(?:{'|'.join(sites)})"
    raise ValueError("could not find the attention/MLP output projections of this model; set target_modules "
                     "explicitly (a list of module names or a regex)")
