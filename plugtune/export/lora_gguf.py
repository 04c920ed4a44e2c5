"""A LoRA adapter as a GGUF LoRA file, the format llama.cpp loads with `--lora` on top of the base's GGUF.

Layout (as llama.cpp's convert_lora_to_gguf.py writes it and llama-adapter.cpp reads it):
    general.type = "adapter", adapter.type = "lora", adapter.lora.alpha = alpha
    <base tensor name>.lora_a   A: (r, in)   written as torch stores it
    <base tensor name>.lora_b   B: (out, r)
llama.cpp adds (alpha / r) * B A x, r read from lora_b. For q and k of Llama models the base rows are
permuted for llama.cpp's rotary layout (tensor_names.permute_qk); the delta B A must follow, and since
the permutation acts on rows only, permuting B alone does it.

llama.cpp cannot load: LoRA on embeddings or on the output head (the converter refuses them, see
llama.cpp issue 9065), DoRA (not a low-rank delta), trained-whole modules, and non-LoRA methods.
"""
from __future__ import annotations

from pathlib import Path

import gguf
from torch import nn

from plugtune.adapters.layers import AdapterLayer, adapter_layers
from plugtune.adapters.methods.lora import LoraLinear
from plugtune.export.gguf_writer import (WriteFn, check_output_path, commit_atomically, encode_tensor, to_numpy,
                                        write_gguf_file)
from plugtune.export.tensor_names import gguf_arch, gguf_tensor_name, permute_qk, rope_heads, tensor_name_map

LORA_QUANTS = ("f32", "f16")


class UnsupportedAdapterError(ValueError):
    """An adapter llama.cpp cannot load as a LoRA file."""


def check_lora_exportable(method_name: str, cfg, can_merge: bool) -> None:
    """Refuse, before any loading, adapters llama.cpp's --lora cannot apply (from the saved config)."""
    if method_name != "lora":
        fix = ("merge it into the base instead: run the export without --adapter-only, which writes the merged "
               "model" if can_merge else "it cannot be folded into the base weights either, so llama.cpp cannot "
               "run it; train a LoRA adapter instead")
        raise UnsupportedAdapterError(f"--adapter-only writes LoRA adapters (llama.cpp's --lora); this adapter is "
                                      f"{method_name}, which llama.cpp cannot load: {fix}")
    if getattr(cfg, "use_dora", False):
        raise UnsupportedAdapterError("--adapter-only: this is a DoRA adapter, which rescales the whole adapted "
                                      "weight and is not a low-rank delta llama.cpp can add: merge it into the "
                                      "base instead (run the export without --adapter-only)")
    if getattr(cfg, "modules_to_save", None):
        raise UnsupportedAdapterError(f"--adapter-only: this adapter trains whole modules ({cfg.modules_to_save}), "
                                      "which a llama.cpp LoRA file cannot hold: merge it instead (run the export "
                                      "without --adapter-only)")


def _plain(module: nn.Module | None) -> nn.Module | None:
    return module.base_module if isinstance(module, AdapterLayer) else module  # the module under any wrappers


def _refuse_layer(model: nn.Module, path: str, layer) -> None:
    base = layer.base_module
    head = _plain(model.get_output_embeddings())
    if isinstance(base, nn.Embedding) or base is _plain(model.get_input_embeddings()):
        raise UnsupportedAdapterError(
            f"--adapter-only: the adapter has LoRA on the embedding table ({path}), which llama.cpp's --lora "
            "does not load: merge it instead (run the export without --adapter-only), or train without "
            "embed_tokens in target_modules")
    if head is not None and base is head:
        raise UnsupportedAdapterError(
            f"--adapter-only: the adapter has LoRA on the output head ({path}), which llama.cpp's --lora does not "
            "load (llama.cpp issue 9065): merge it instead (run the export without --adapter-only), or train "
            "without lm_head in target_modules")
    if not isinstance(layer, LoraLinear):
        raise UnsupportedAdapterError(f"--adapter-only: {path} carries a {type(layer).__name__}, not a LoRA "
                                      "layer: merge the adapter instead (run the export without --adapter-only)")


def build_lora_writer(model: nn.Module, name: str = "default", quant: str = "f32",
                      adapter_name: str | None = None) -> gguf.GGUFWriter:
    """A GGUFWriter holding adapter `name` of `model` (loaded, not merged) as llama.cpp LoRA tensors."""
    if quant not in LORA_QUANTS:
        raise ValueError(f"--adapter-only writes LoRA tensors as {' or '.join(LORA_QUANTS)}, not {quant!r}")
    config = model.config
    arch = gguf_arch(config)
    names = tensor_name_map(arch, config.num_hidden_layers)
    layers = [(path.replace(".base_layer", ""), layer) for path, layer in adapter_layers(model)
              if name in layer.configs]
    if not layers:
        raise UnsupportedAdapterError(f"the model has no layers of adapter '{name}' to export")
    for path, layer in layers:
        _refuse_layer(model, path, layer)
    writer = gguf.GGUFWriter(None, arch.name)
    writer.add_type(gguf.GGUFType.ADAPTER)
    writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
    if adapter_name:
        writer.add_name(adapter_name)
    alpha = None
    for path, layer in layers:
        a, b = layer.lora_A[name].weight.detach(), layer.lora_B[name].weight.detach()  # (r, in), (out, r)
        r = a.shape[0]
        layer_alpha = layer.scaling[name] * r  # rsLoRA's alpha/sqrt(r) as llama.cpp's alpha/r
        alpha = layer_alpha if alpha is None else alpha
        if layer_alpha != alpha:  # one alpha per file: fold this layer's ratio into its B
            b = b * (layer_alpha / alpha)
        hf_name = f"{path}.weight"
        gguf_name = gguf_tensor_name(names, hf_name)
        n_head = rope_heads(hf_name, config) if arch.rope_permute else None
        if n_head:
            b = permute_qk(b, n_head)
        for suffix, t in ((".lora_a", a), (".lora_b", b)):
            data, _ = encode_tensor(to_numpy(t), quant)
            writer.add_tensor(gguf_name + suffix, data)
    writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, float(alpha))
    return writer


def write_lora_gguf(model: nn.Module, out: str | Path, name: str = "default", quant: str = "f32",
                    overwrite: bool = False, adapter_name: str | None = None,
                    write: WriteFn = write_gguf_file) -> Path:
    check_output_path(out, overwrite)
    writer = build_lora_writer(model, name, quant, adapter_name)
    return commit_atomically(Path(out), overwrite, lambda tmp: write(writer, tmp))
