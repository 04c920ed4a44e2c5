"""Variable-length attention for packed SFT rows: sdpa run per example, each causal within itself.

A packed micro-batch laid out as one row of all its examples (data/packing.py, `flat`) computes its
linear layers on real tokens only. Its attention must not cross examples. transformers can do that
with a block-diagonal mask over the whole row, but sdpa on CPU then computes every block of the
T x T scores and throws most away (the issue measured 1.24x from removing all padding that way).
This function instead slices q, k, v at the example boundaries (`cu_seq_lens_q`, the name
flash-attention's variable-length kernels use; causal_lm.batch_hidden reads them off the position
ids, so they always match the tokens) and runs causal sdpa per example, so the work is
sum_i L_i^2 / 2 score pairs instead of T^2. On one SmolLM2-shaped layer (1 thread, the benchmark's
conversations, forward + backward, frozen weights): padded 0.293 s, packed rows of <= 256 tokens
under a block-diagonal mask 0.182 s, one row under that mask 0.226 s, this 0.154 s.

It registers through transformers' AttentionInterface (its documented extension point) as
"plugtune_varlen", with sdpa's mask function. A call without `cu_seq_lens_q` (padded batches,
generation with a KV cache, evaluation) goes to transformers' own sdpa function unchanged, so a
model switched to it computes exactly what it computed with "sdpa".
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

NAME = "plugtune_varlen"
_UNSUPPORTED_KWARGS = ("sliding_window", "softcap", "s_aux")  # per-example causal sdpa would ignore them


def varlen_sdpa(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                cu_seq_lens_q: torch.Tensor | None = None, **kwargs) -> tuple[torch.Tensor, None]:
    """query (1, H, T, D), key / value (1, H_kv, T, D); cu_seq_lens_q (n + 1,) example boundaries in T.
    Returns (1, T, H, D), as transformers' attention functions do."""
    from transformers.integrations.sdpa_attention import repeat_kv
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    if cu_seq_lens_q is None:
        return ALL_ATTENTION_FUNCTIONS["sdpa"](module, query, key, value, attention_mask, dropout=dropout,
                                               scaling=scaling, **kwargs)
    if query.shape[0] != 1 or key.shape[2] != query.shape[2] or not getattr(module, "is_causal", True):
        raise ValueError("variable-length attention takes one packed row of a causal model, without KV cache")
    if any(kwargs.get(k) is not None for k in _UNSUPPORTED_KWARGS):
        raise ValueError(f"variable-length attention does not implement {', '.join(_UNSUPPORTED_KWARGS)}")
    groups = query.shape[1] // key.shape[1]  # grouped-query attention: each k/v head serves `groups` q heads
    key, value = repeat_kv(key, groups), repeat_kv(value, groups)
    bounds = cu_seq_lens_q.tolist()
    outs = [F.scaled_dot_product_attention(query[:, :, s:e], key[:, :, s:e], value[:, :, s:e], is_causal=True,
                                           dropout_p=dropout, scale=scaling)  # (1, H, L_i, D)
            for s, e in zip(bounds[:-1], bounds[1:])]
    return torch.cat(outs, dim=2).transpose(1, 2).contiguous(), None  # (1, T, H, D)


def boundaries(positions: torch.Tensor) -> torch.Tensor:
    """(T,) position ids restarting at 0 per example -> (n + 1,) int32 offsets where examples start, and T."""
    starts = (positions == 0).nonzero().flatten()
    return torch.cat([starts, starts.new_tensor([positions.numel()])]).to(torch.int32)


def register() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface

    AttentionInterface.register(NAME, varlen_sdpa)
    AttentionMaskInterface.register(NAME, ALL_MASK_ATTENTION_FUNCTIONS["sdpa"])


def switch(model: nn.Module, name: str) -> None:
    """Set the model's attention implementation (transformers' set_attn_implementation)."""
    if name == NAME:
        register()
    model.set_attn_implementation(name)
