"""Load a causal LM + tokenizer from a built-in short name or a local Hugging Face directory."""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from plugtune.models.default_model import DEFAULT_MODEL, ensure_default_model
from plugtune.models.quantize import check_scheme, quantize_model
from plugtune.schema import ConfigError

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
    if path.exists():
        raise FileNotFoundError(f"{path} is a file; pass the model's directory (the one that holds config.json)")
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


# Any one of these makes a directory's tokenizer loadable (fast, sentencepiece, GPT-2 BPE, WordPiece).
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "vocab.txt",
                    "spiece.model")
_WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                 "pytorch_model.bin.index.json")
_CONTEXT_KEYS = ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length", "n_ctx")


def _one_line(exc: Exception) -> str:
    return " ".join(str(exc).split())[:300]


def load_tokenizer(name_or_path: str | Path):
    from transformers import AutoTokenizer

    path = resolve_model_dir(str(name_or_path))
    if not any((path / f).is_file() for f in _TOKENIZER_FILES):
        raise FileNotFoundError(
            f"{path} has no tokenizer (none of {', '.join(_TOKENIZER_FILES[:2])}, ...): copy the original model's "
            f"tokenizer files into it (e.g. `hf download NAME tokenizer.json tokenizer_config.json --local-dir {path}` "
            "on a connected machine), or save them with tokenizer.save_pretrained(DIR)")
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as exc:  # a damaged tokenizer.json, a tokenizer class needing a missing package
        raise ValueError(f"{path}: cannot load the tokenizer ({_one_line(exc)}); copy the original model's "
                         "tokenizer files again") from exc
    if tokenizer.pad_token_id is None:
        # Padding positions are masked by attention_mask and -100 labels, so any id works here.
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_base(name: str, dtype: str = "auto", device: str = "auto", quantize: str = "none") -> LoadedModel:
    """The base model and tokenizer. `quantize` (none | int8 | int4 | nf4, models/quantize.py) stores the
    linear layers' weights in 8 or 4 bits, for adapters trained or served on a frozen quantized base; the
    weights are read in full precision, then quantized one layer at a time."""
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # a sub-second weight load needs no progress bar
    dev = pick_device(device)
    check_scheme(quantize, dev)  # before the load: a scheme this device cannot run fails fast
    path = resolve_model_dir(name)
    model = _from_pretrained(AutoModelForCausalLM, path, pick_dtype(dtype, dev)).to(dev)
    quantize_model(model, quantize)
    return LoadedModel(model=model, tokenizer=load_tokenizer(path), path=path, name=name)


def is_pickle(file: Path) -> bool:
    """Whether `file` is a PyTorch pickle (torch.save's zip archive, or a raw pickle) rather than safetensors,
    which starts with its header's length (8 bytes, little-endian; any first byte) and then the JSON header '{'."""
    with open(file, "rb") as f:
        head = f.read(9)
    if head[8:9] == b"{":
        return False
    return head.startswith(b"PK\x03\x04") or head[:1] == b"\x80"


class WeightsFileError(ValueError):
    """A weights file that cannot be read: damaged, truncated, or a pickle under a safetensors name."""


def refuse_pickle(file: Path, fix: str) -> None:
    """A .safetensors file is read as safetensors only: a pickle under that name is refused, never unpickled."""
    if is_pickle(file):
        raise WeightsFileError(f"{file} is a PyTorch pickle, not a safetensors file; plugtune never unpickles a "
                               f".safetensors file. {fix}")


def read_safetensors(file: str | Path, fix: str = "Write it again, or copy it again",
                     pickle_fix: str | None = None) -> dict[str, torch.Tensor]:
    """The tensors of a safetensors file (an adapter, a router, a reward head, a checkpoint), with one clear
    error for a missing, pickled (`pickle_fix`, default `fix`) or damaged file."""
    from safetensors.torch import load_file

    file = Path(file)
    if not file.is_file():
        raise FileNotFoundError(f"{file} is missing. {fix}")
    refuse_pickle(file, pickle_fix or fix)
    try:
        return load_file(str(file))
    except Exception as exc:  # safetensors' SafetensorError (not an OSError or ValueError) or an OSError
        raise WeightsFileError(f"{file} is not a readable safetensors file ({exc}; {file.stat().st_size} bytes): it "
                               f"is truncated or damaged. {fix}") from None


def _from_pretrained(auto_cls, path: Path, dtype: torch.dtype) -> nn.Module:
    """auto_cls.from_pretrained(path) with one clear error per way a model directory can be broken.
    Weights are read as safetensors, or by transformers' torch.load(weights_only=True) for a .bin."""
    found = [f for f in _WEIGHT_FILES if (path / f).is_file()]
    if not found:
        raise FileNotFoundError(f"{path} has no weights ({' or '.join(_WEIGHT_FILES[:3])}): copy the model's "
                                "weight files next to its config.json")
    single = path / "model.safetensors"
    if single.is_file():
        refuse_pickle(single, "Save the model with save_pretrained (safetensors is the default)")
    try:
        return auto_cls.from_pretrained(path, dtype=dtype)
    except Exception as exc:
        if type(exc).__name__ == "SafetensorError":
            raise ValueError(f"{path}: a weights file is not readable safetensors ({_one_line(exc)}): it is "
                             "truncated or damaged; copy or download the model again") from exc
        if isinstance(exc, (OSError, json.JSONDecodeError)):
            raise ValueError(f"{path}: cannot load the model ({_one_line(exc)}); check config.json and the weight "
                             "files, or copy the model directory again") from exc
        raise


def context_length(path: str | Path) -> int | None:
    """The model's context in positions, from its config.json (None when it does not say)."""
    cfg_file = Path(path) / "config.json"
    try:
        cfg = json.loads(cfg_file.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    cfg = cfg.get("text_config", cfg)  # multimodal configs nest the language model's
    return next((int(cfg[k]) for k in _CONTEXT_KEYS if isinstance(cfg.get(k), int) and cfg[k] > 0), None)


def check_max_length(model: str | Path, max_length: int, longest: int | None = None,
                     key: str = "data.max_length") -> None:
    """A max_length over the model's context is an error once an example would use the positions beyond
    it (`longest`: the longest tokenized example; None: any max_length over the context is refused).
    Such positions have no trained embedding (GPT-2 fails with an index error; RoPE models degrade)."""
    path = resolve_model_dir(str(model))
    context = context_length(path)
    if context is None or max_length <= context or (longest is not None and longest <= context):
        return
    longest_note = f" and the longest example has {longest} tokens" if longest is not None else ""
    raise ConfigError(f"{key}={max_length} is larger than the model's context ({context} positions, from "
                      f"{path / 'config.json'}){longest_note}; set {key}={context} or less (longer examples are "
                      "then truncated or dropped, see data.overflow)")
