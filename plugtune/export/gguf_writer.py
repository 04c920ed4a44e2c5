"""Write GGUF files: one merged model (hyperparameters, tokenizer, tensors under llama.cpp's names,
quantized with the `gguf` package's own quantizers), never leaving a partial file under the final name.

    write_model_gguf(model, tokenizer, "model.gguf", quant="q8_0")

Tensor types per --quant, as llama.cpp's converter does it: 1-D tensors (norms) stay F32; a 2-D
weight becomes F16 / Q8_0 / Q4_0 when its rows divide into the format's 32-value blocks (else F16).
With q4_0 the token embedding (also the output head when tied) is Q8_0, as llama.cpp's own Q4
files keep it at higher precision.
"""
from __future__ import annotations

import errno
import os
from collections.abc import Callable
from pathlib import Path

import gguf
import numpy as np
import torch
from torch import nn

from plugtune.export.tensor_names import gguf_arch, gguf_tensor_name, permute_qk, rope_heads, tensor_name_map
from plugtune.export.vocab import add_tokenizer

QUANTS = {"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
          "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0, "q4_0": gguf.LlamaFileType.MOSTLY_Q4_0}
_BLOCK_TYPES = {"q8_0": gguf.GGMLQuantizationType.Q8_0, "q4_0": gguf.GGMLQuantizationType.Q4_0}

# A function that writes a prepared GGUFWriter's header, metadata and tensors to a path. The export
# takes it as a parameter so that tests can inject a failing one (a full disk) without touching gguf.
WriteFn = Callable[[gguf.GGUFWriter, Path], None]


def write_gguf_file(writer: gguf.GGUFWriter, path: Path) -> None:
    try:
        writer.write_header_to_file(path)
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
    finally:
        writer.close()


def check_output_path(out: str | Path, overwrite: bool) -> Path:
    """Refuse an existing output unless overwrite; refuse a directory, and a missing parent folder."""
    out = Path(out)
    if out.is_dir():
        raise IsADirectoryError(f"--out {out} is a directory; give a file name such as {out / 'model.gguf'}")
    if out.exists() and not overwrite:
        raise FileExistsError(f"{out} already exists; pass --overwrite to replace it, or choose another --out")
    if not out.parent.is_dir():
        raise FileNotFoundError(f"the folder {out.parent} does not exist; create it first")
    return out


def commit_atomically(out: Path, overwrite: bool, write: Callable[[Path], None]) -> Path:
    """Call write(tmp) on a temporary file beside `out`, then rename it to `out` (atomic on one file
    system). On any error (a full disk: OSError ENOSPC) the temporary file is removed and `out` is
    untouched: no partial file ever carries the final name."""
    out = check_output_path(out, overwrite)
    tmp = out.with_name(f".{out.name}.partial-{os.getpid()}")
    try:
        write(tmp)
        os.replace(tmp, out)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        if exc.errno == errno.ENOSPC:
            raise OSError(errno.ENOSPC, f"the disk is full while writing {out} ({exc.strerror or exc}); nothing "
                                        "was written under that name. Free some space and run the export again")
        raise
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return out


def to_numpy(t: torch.Tensor) -> np.ndarray:
    return t.detach().to("cpu", torch.float32).contiguous().numpy()


def encode_tensor(data: np.ndarray, quant: str, is_embedding: bool = False) -> tuple[np.ndarray, gguf.GGMLQuantizationType]:
    """fp32 numpy (GGUF stores the row-major torch layout as is) -> (bytes or floats, GGML type)."""
    if data.ndim < 2 or quant == "f32":
        return data.astype(np.float32), gguf.GGMLQuantizationType.F32
    kind = "q8_0" if (quant == "q4_0" and is_embedding) else quant
    if kind in _BLOCK_TYPES:
        qtype = _BLOCK_TYPES[kind]
        block = gguf.GGML_QUANT_SIZES[qtype][0]
        if data.shape[-1] % block == 0:
            return gguf.quants.quantize(data.astype(np.float32), qtype), qtype
    return data.astype(np.float16), gguf.GGMLQuantizationType.F16


def add_llama_hparams(writer: gguf.GGUFWriter, config, quant: str) -> None:
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    rope = getattr(config, "rope_parameters", None) or {}
    theta = rope.get("rope_theta") if isinstance(rope, dict) else None
    theta = theta if theta is not None else getattr(config, "rope_theta", 10000.0)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(heads)
    writer.add_head_count_kv(getattr(config, "num_key_value_heads", None) or heads)
    writer.add_rope_freq_base(float(theta))
    writer.add_layer_norm_rms_eps(float(config.rms_norm_eps))
    writer.add_rope_dimension_count(head_dim)
    if head_dim != config.hidden_size // heads:
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
    writer.add_vocab_size(config.vocab_size)
    writer.add_file_type(QUANTS[quant])
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)


def model_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """The weights to write: the state dict without a tied LM head (llama.cpp and transformers both
    reuse token_embd when output.weight is absent) and without non-persistent buffers."""
    state = dict(model.state_dict())
    head = model.get_output_embeddings()
    emb = model.get_input_embeddings()
    if head is not None and emb is not None and head.weight is emb.weight:
        state.pop("lm_head.weight", None)
    return state


def build_model_writer(model: nn.Module, tokenizer, quant: str = "f16", name: str | None = None) -> gguf.GGUFWriter:
    """A GGUFWriter holding the whole model (not yet written to any file)."""
    if quant not in QUANTS:
        raise ValueError(f"--quant {quant!r}: choose one of {', '.join(QUANTS)}")
    config = model.config
    arch = gguf_arch(config)
    names = tensor_name_map(arch, config.num_hidden_layers)
    writer = gguf.GGUFWriter(None, arch.name)
    writer.add_type(gguf.GGUFType.MODEL)
    writer.add_name(name or str(getattr(config, "_name_or_path", "") or "plugtune-export"))
    add_llama_hparams(writer, config, quant)
    add_tokenizer(writer, tokenizer, config.vocab_size)
    emb_name = "token_embd.weight"
    for hf_name, tensor in model_tensors(model).items():
        gguf_name = gguf_tensor_name(names, hf_name)
        n_head = rope_heads(hf_name, config) if arch.rope_permute else None
        t = permute_qk(tensor, n_head) if n_head else tensor
        data, qtype = encode_tensor(to_numpy(t), quant, is_embedding=gguf_name == emb_name)
        writer.add_tensor(gguf_name, data, raw_dtype=qtype if qtype in _BLOCK_TYPES.values() else None)
    return writer


def write_model_gguf(model: nn.Module, tokenizer, out: str | Path, quant: str = "f16", overwrite: bool = False,
                     name: str | None = None, write: WriteFn = write_gguf_file) -> Path:
    """Write `model` (a plain transformers model: merge adapters first) and its tokenizer to one GGUF."""
    check_output_path(out, overwrite)  # before the (slow) conversion
    writer = build_model_writer(model, tokenizer, quant, name)
    return commit_atomically(Path(out), overwrite, lambda tmp: write(writer, tmp))
