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
