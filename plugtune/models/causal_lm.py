"""The two pieces of a Hugging Face causal LM the trainer needs: the backbone and the LM head.

Splitting them lets the loss apply the (vocabulary-sized) head only at positions that carry
labels instead of materialising (B, T, V) logits.
"""
from __future__ import annotations

import torch
from torch import nn


def backbone(model: nn.Module) -> nn.Module:
    """The transformer body (`model.model` for Llama, `model.transformer` for GPT-2)."""
    body = getattr(model, getattr(model, "base_model_prefix", ""), None)
    if body is None or body is model:
        raise TypeError(f"{type(model).__name__} has no separable backbone (base_model_prefix)")
    return body


def lm_head(model: nn.Module) -> nn.Module:
    head = model.get_output_embeddings()
    if head is None:
        raise TypeError(f"{type(model).__name__} has no output embeddings (LM head)")
    return head


def hidden_states(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor, **kwargs) -> torch.Tensor:
    """Final hidden states (B, T, C) of the backbone."""
    out = backbone(model)(input_ids=input_ids, attention_mask=attention_mask, use_cache=False, **kwargs)
    return out[0]
