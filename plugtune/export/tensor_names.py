"""Which Hugging Face architectures the GGUF writer knows, their tensor names in llama.cpp's spelling,
and the row permutation llama.cpp expects for the rotary (q, k) projections of Llama models.

Names come from the `gguf` package's own tables (MODEL_ARCH, TensorNameMap), the ones llama.cpp's
converter uses, so `model.layers.3.self_attn.q_proj.weight` becomes `blk.3.attn_q.weight`.
"""
from __future__ import annotations

from dataclasses import dataclass

import gguf
import torch


class UnsupportedArchitectureError(ValueError):
    """A model whose architecture the GGUF writer has no tensor map (or no hyperparameter map) for."""


@dataclass(frozen=True)
class GGUFArch:
    hf_class: str            # config.architectures[0], e.g. "LlamaForCausalLM"
    arch: gguf.MODEL_ARCH    # llama.cpp's architecture
    rope_permute: bool       # q/k rows reordered for llama.cpp's rotary layout (see permute_qk)

    @property
    def name(self) -> str:
        return gguf.MODEL_ARCH_NAMES[self.arch]


# Only what the round-trip tests prove. Mistral and Qwen2 have the same hyperparameters but their
# own details (sliding window, q/k/v biases); add them with a tiny-model round-trip test each.
SUPPORTED = {a.hf_class: a for a in (GGUFArch("LlamaForCausalLM", gguf.MODEL_ARCH.LLAMA, rope_permute=True),)}


def gguf_arch(config) -> GGUFArch:
    """The GGUF architecture for a transformers config, or a clear refusal."""
    classes = list(getattr(config, "architectures", None) or [])
    found = next((SUPPORTED[c] for c in classes if c in SUPPORTED), None)
    if found is None:
        what = classes[0] if classes else getattr(config, "model_type", "unknown")
        raise UnsupportedArchitectureError(
            f"GGUF export has no tensor map for the architecture {what}: it writes {', '.join(SUPPORTED)} models. "
            "Export a supported model, or convert this one with llama.cpp's convert_hf_to_gguf.py after "
            "`plugtune merge` (which writes a plain Hugging Face directory)")
    rope = getattr(config, "rope_scaling", None) or {}
    rope_type = rope.get("rope_type", rope.get("type", "default")) if isinstance(rope, dict) else "default"
    params = getattr(config, "rope_parameters", None) or {}
    rope_type = params.get("rope_type", rope_type) if isinstance(params, dict) else rope_type
    if rope_type not in (None, "default"):
        raise UnsupportedArchitectureError(
            f"GGUF export writes plain rotary embeddings only; this model uses rope type {rope_type!r} "
            "(llama.cpp needs extra rope_freqs tensors for it). Use llama.cpp's convert_hf_to_gguf.py")
    for flag in ("attention_bias", "mlp_bias"):
        if getattr(config, flag, False):
            raise UnsupportedArchitectureError(
                f"GGUF export writes Llama models without biases; this one has {flag}=True")
    return found


def tensor_name_map(arch: GGUFArch, n_layers: int) -> gguf.TensorNameMap:
    return gguf.get_tensor_name_map(arch.arch, n_layers)


def gguf_tensor_name(names: gguf.TensorNameMap, hf_name: str) -> str:
    """'model.layers.0.self_attn.q_proj.weight' -> 'blk.0.attn_q.weight'."""
    name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
    if name is None:
        raise UnsupportedArchitectureError(f"GGUF export has no llama.cpp name for the tensor {hf_name!r}")
    return name


def rope_heads(hf_name: str, config) -> int | None:
    """How many heads the rows of this tensor are grouped in, if llama.cpp wants them permuted."""
    if hf_name.endswith("q_proj.weight"):
        return config.num_attention_heads
    if hf_name.endswith("k_proj.weight"):
        return getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    return None


def permute_qk(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """Reorder the output rows of a q or k projection from Hugging Face's rotary layout to llama.cpp's.

    Hugging Face's Llama rotates the two halves of each head (rotate_half: dims i and i + d/2 form a
    pair); llama.cpp's LLAMA rope (GGML_ROPE_TYPE_NORM) rotates adjacent dims (2i, 2i + 1). Within
    each head of d rows, row j*(d/2) + i moves to row 2i + j. Rows only, so it applies to a weight W,
    to a bias, and to a LoRA B alone: permute(W + s B A) = permute(W) + s permute(B) A.
        w: (n_head * d, ...) -> same shape
    """
    rows = w.shape[0]
    half = rows // n_head // 2
    return w.reshape(n_head, 2, half, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def unpermute_qk(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """The inverse of permute_qk: llama.cpp's row order back to Hugging Face's."""
    rows = w.shape[0]
    half = rows // n_head // 2
    return w.reshape(n_head, half, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)
