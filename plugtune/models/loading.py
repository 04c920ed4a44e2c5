"""Load a causal LM + tokenizer from a built-in short name or a local Hugging Face directory."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from plugtune.models.default_model import DEFAULT_MODEL, ensure_default_model

BUILTIN_MODELS = {DEFAULT_MODEL: ensure_default_model}


def resolve_model_dir(name: str) -> Path:
    """Map a short name or path to a local model directory; never touches the network."""
    if name in BUILTIN_MODELS:
        return BUILTIN_MODELS[name]()
    path = Path(name).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"{path} is a directory but has no config.json: not a Hugging Face model directory")
        return path
    raise FileNotFoundError(
        f"model '{name}' is neither a built-in name ({', '.join(BUILTIN_MODELS)}) nor a local directory. "
        "plugtune never downloads from a hub: fetch the model on a connected machine "
        f"(e.g. `hf download {name} --local-dir DIR`), copy DIR here and pass model.name=DIR."
    )


def pick_device(device: str = "auto") -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def pick_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """Weights dtype. bf16 is refused on CPU: these CPUs have no native bf16 (~400x slower matmuls)."""
    if dtype in ("auto", "float32"):
        return torch.float32  # on CUDA, 'auto' trains fp32 weights under bf16 autocast
    if dtype == "bfloat16":
        if device.type != "cuda":
            raise ValueError("model.dtype=bfloat16 needs a CUDA device; on CPU use float32 (bf16 matmuls are ~400x slower)")
        return torch.bfloat16
    raise ValueError(f"unknown dtype {dtype!r}: use auto, float32 or bfloat16")


def autocast_dtype(dtype: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype for forward passes, or None for plain fp32."""
    return torch.bfloat16 if device.type == "cuda" and dtype == "auto" else None


@dataclass
class LoadedModel:
    model: nn.Module
    tokenizer: object
    path: Path
    name: str


def load_tokenizer(name_or_path: str | Path):
    from transformers import AutoTokenizer

    path = resolve_model_dir(str(name_or_path))
    tokenizer = AutoTokenizer.from_pretrained(path)
    if tokenizer.pad_token_id is None:
        # Padding positions are masked by attention_mask and -100 labels, so any id works here.
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_base(name: str, dtype: str = "auto", device: str = "auto") -> LoadedModel:
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # a sub-second weight load needs no progress bar
    path = resolve_model_dir(name)
    dev = pick_device(device)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=pick_dtype(dtype, dev)).to(dev)
    return LoadedModel(model=model, tokenizer=load_tokenizer(path), path=path, name=name)
