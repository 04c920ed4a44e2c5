"""Fold an adapter into the base weights and write a plain model directory (no plugtune needed)."""
from __future__ import annotations

from pathlib import Path

from torch import nn

from plugtune.adapters.layers import adapter_layers, merge_adapters, unwrap_merged
from plugtune.models.quantize import quantization_of


def fold_into_base(model: nn.Module, name: str = "default") -> nn.Module:
    """Merge adapter `name` into `model`'s weights (in place) and unwrap: a plain model, the adapter
    now part of the base (a tied LM head is untied first when the adapter changes the embedding)."""
    not_mergeable = sorted({type(layer).__name__ for _, layer in adapter_layers(model)
                            if name in layer.configs and not layer.can_merge})
    if not_mergeable:
        raise ValueError(f"adapter '{name}' uses {', '.join(not_mergeable)}, which cannot be folded into the base "
                         "weights (it is non-linear or adds inputs); serve it unmerged instead")
    scheme = quantization_of(model)
    if scheme != "none":
        raise ValueError(f"the base is quantized ({scheme}): folding adapter '{name}' into 8/4-bit weights would "
                         "re-quantize them and add rounding error to every merged layer. Merge on the unquantized "
                         "base (load it with quantize=none / without --quantize), then quantize the merged model")
    _untie_if_merging_shared_weights(model, name)
    merge_adapters(model, [name])
    return unwrap_merged(model)


def merge_and_save(model, tokenizer, out_dir: str | Path, name: str = "default") -> Path:
    """Merge adapter `name` into `model` (in place), unwrap, and save with safetensors."""
    fold_into_base(model, name)
    out = Path(out_dir)
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    return out


def _untie_if_merging_shared_weights(model, name: str) -> None:
    """With tied embeddings the LM head shares the input embedding's weight. LoRA on the embedding
    changes only the input side, so before folding it in, give the head its own copy."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if head is None:
        return
    for _, layer in adapter_layers(model):
        if name in layer.configs and layer.base_layer.weight is head.weight:
            head.weight = nn.Parameter(head.weight.detach().clone())
            model.config.tie_word_embeddings = False
            if hasattr(model.config, "get_text_config"):
                model.config.get_text_config().tie_word_embeddings = False
