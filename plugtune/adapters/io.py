"""Attach, save and load adapters. Files are adapter_config.json + adapter_model.safetensors.

For methods PEFT has, both files are in PEFT's exact format: keys are
`base_model.model.<module path>.<param>` with the adapter name removed, and the config carries
PEFT's fields. plugtune's own facts (the base model's fingerprint) go to a sidecar file,
plugtune_adapter.json, so PEFT reads our adapters without warnings.
"""
from __future__ import annotations

import hashlib
import json
import pickle
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import nn

from plugtune.adapters.layers import (adapter_layers, adapter_names, adapter_state, base_parameters, mark_trainable,
                                      remove_adapter)
from plugtune.adapters.registry import AdapterMethod, available_methods, get_method, method_from_saved
from plugtune.adapters.modules_to_save import attach_modules_to_save, remove_modules_to_save
from plugtune.models.loading import WeightsFileError, read_safetensors
from plugtune.models.quantize import quantized_layers

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
PICKLE_WEIGHTS_FILE = "adapter_model.bin"  # PEFT before safetensors; read with torch.load(weights_only=True) only
META_FILE = "plugtune_adapter.json"
_PEFT_PREFIX = "base_model.model."


class AdapterMismatchError(ValueError):
    """An adapter made for another base model."""


AdapterFileError = WeightsFileError  # an adapter file that cannot be read: damaged, truncated, or not what its name says


def attach_adapter(model: nn.Module, method: str | AdapterMethod, cfg: Any = None, name: str = "default",
                   trainable: bool = True) -> list[str]:
    """Add a fresh adapter `name` to `model` in place; with trainable=True only it receives gradients."""
    method = get_method(method) if isinstance(method, str) else method
    if not name or not isinstance(name, str) or name == "__base__":
        raise ValueError(f"invalid adapter name {name!r}: use a non-empty name other than '__base__'")
    if name in adapter_names(model):
        raise ValueError(f"the model already has an adapter named '{name}'; remove it first or choose another name "
                         f"(loaded: {', '.join(adapter_names(model))})")
    cfg = method.parse_config(cfg or {})
    # Whole modules trained alongside (PEFT's modules_to_save), copied first so that the method's
    # targets never land inside them.
    entries = getattr(cfg, "modules_to_save", None)
    copied = attach_modules_to_save(model, entries, cfg, name) if entries else []
    try:
        wrapped, _ = method.attach(model, cfg, name)
    except Exception:
        remove_modules_to_save(model, name)
        raise
    wrapped = wrapped + copied
    for _, layer in adapter_layers(model):
        layer.train(model.training)
    if trainable:
        mark_trainable(model, name)
    else:  # loaded for inference (or as a frozen part of another run, e.g. PPO's reward adapter)
        for p in adapter_state(model, name).values():
            p.requires_grad_(False)
    return wrapped


def adapter_method_and_config(model: nn.Module, name: str) -> tuple[AdapterMethod, Any]:
    for _, layer in adapter_layers(model):
        if name in layer.configs:
            cfg = layer.configs[name]
            for method_name in available_methods():
                m = get_method(method_name)
                if isinstance(cfg, m.config_cls):
                    return m, cfg
    raise KeyError(f"no adapter named '{name}' on this model (loaded: {adapter_names(model)})")


def to_saved_key(key: str, name: str) -> str:
    """'model.layers.0.q_proj.lora_A.default.weight' -> PEFT's 'base_model.model.model.layers.0.q_proj.lora_A.weight'."""
    # PEFT saves a modules_to_save copy under the module's own name: 'classifier.modules_to_save.default.weight'
    # -> 'classifier.weight' (ModulesToSaveWrapper.adapter_state_dict).
    key = key.replace(f".modules_to_save.{name}.", ".")
    parts = key.split(".")
    parts = [p for p in parts if p != name] if name in parts else parts
    return _PEFT_PREFIX + ".".join(parts)


# PEFT's wrappers for models with a task head; its causal-LM wrapper fails on them (no generation methods).
_PEFT_TASKS = {"ForSequenceClassification": "SEQ_CLS", "ForTokenClassification": "TOKEN_CLS"}


def peft_task_type(model: nn.Module, default: str) -> str:
    """PEFT's task_type for this model: by its head class (BertForSequenceClassification -> SEQ_CLS)."""
    cls = type(model).__name__
    return next((task for suffix, task in _PEFT_TASKS.items() if cls.endswith(suffix)), default)


def base_fingerprint(model: nn.Module) -> dict[str, str]:
    """Identify a base model: a hash of its architecture config and a checksum of its weights.

    The checksum hashes the first 4096 values of every base tensor rounded to bf16, so the same
    base loaded in fp32 or bf16 gives the same answer, in well under a second.
    """
    cfg = model.config.to_dict() if hasattr(model, "config") else {}
    keep = ("model_type", "vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
            "num_key_value_heads", "intermediate_size", "n_embd", "n_layer", "n_head")
    arch = {k: cfg[k] for k in keep if k in cfg}
    config_hash = hashlib.sha256(json.dumps(arch, sort_keys=True).encode()).hexdigest()[:16]
    h = hashlib.sha256()
    tensors = dict(base_parameters(model))
    for lname, layer in quantized_layers(model):  # a quantized base hashes as the base it was made from
        for key, t in layer.fingerprint_tensors().items():
            tensors[f"{lname.replace('.base_layer', '')}.{key}"] = t
    for pname, p in sorted(tensors.items()):
        h.update(pname.encode())
        sample = p.detach().reshape(-1)[:4096].to("cpu", torch.bfloat16).view(torch.int16)
        h.update(sample.numpy().tobytes())
    return {"config_hash": config_hash, "weights_checksum": h.hexdigest()[:16],
            "model_type": str(cfg.get("model_type", type(model).__name__))}


def save_adapter(model: nn.Module, out_dir: str | Path, name: str = "default", base_name: str | None = None) -> Path:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    method, cfg = adapter_method_and_config(model, name)
    if method.saved_state is not None:
        state = {k: t.detach().to("cpu").contiguous() for k, t in method.saved_state(model, name).items()}
    else:
        state = {to_saved_key(k, name): p.detach().to("cpu").contiguous() for k, p in adapter_state(model, name).items()}
    saved_cfg = method.saved_config(cfg)
    if "task_type" in saved_cfg:  # a PEFT config: PEFT picks its model wrapper by task type
        saved_cfg["task_type"] = peft_task_type(model, saved_cfg["task_type"])
    base_name = base_name or getattr(getattr(model, "config", None), "_name_or_path", None)
    saved_cfg["base_model_name_or_path"] = str(base_name) if base_name else None
    # Write to temporary names, then rename: a crash never leaves a half-written adapter.
    tmp_w, tmp_c = out / (WEIGHTS_FILE + ".tmp"), out / (CONFIG_FILE + ".tmp")
    save_file(state, str(tmp_w), metadata={"format": "pt"})
    tmp_c.write_text(json.dumps(saved_cfg, indent=2, sort_keys=True))
    tmp_w.replace(out / WEIGHTS_FILE)
    tmp_c.replace(out / CONFIG_FILE)
    meta = {"method": method.name, "base_model": saved_cfg["base_model_name_or_path"],
            "base_fingerprint": base_fingerprint(model)}
    (out / META_FILE).write_text(json.dumps(meta, indent=2, sort_keys=True))
    return out


def _read_json(file: Path) -> dict:
    try:
        value = json.loads(file.read_bytes().decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise AdapterFileError(f"{file} is not valid JSON ({exc}); it is damaged: save or copy the adapter "
                               "again") from None
    if not isinstance(value, dict):
        raise AdapterFileError(f"{file} must hold a JSON object, got {type(value).__name__}; save or copy the "
                               "adapter again")
    return value


def read_adapter_config(path: str | Path) -> dict:
    path = Path(path)
    cfg_file = path / CONFIG_FILE
    if not path.is_dir():
        what = "does not exist" if not path.exists() else "is a file, not a directory"
        raise FileNotFoundError(f"adapter {path} {what}: pass the directory that holds {CONFIG_FILE} "
                                f"and {WEIGHTS_FILE} (e.g. OUTPUT/adapter)")
    if not cfg_file.is_file():
        raise FileNotFoundError(f"{path} is not an adapter directory: {CONFIG_FILE} is missing")
    return _read_json(cfg_file)


def read_adapter_weights(path: str | Path) -> tuple[dict[str, torch.Tensor], Path]:
    """The tensors of the adapter saved in directory `path`, and the file they came from.

    adapter_model.safetensors is read as safetensors only: a pickle under that name is refused,
    never unpickled. PEFT's older adapter_model.bin is read with torch.load(weights_only=True),
    which builds tensors and plain containers and runs no code from the file."""
    path = Path(path)
    file = path / WEIGHTS_FILE
    if file.is_file():
        return read_safetensors(file, "Save the adapter again, or copy / download it again",
                                pickle_fix="Re-save the adapter with safetensors (PEFT: save_pretrained(..., "
                                           "safe_serialization=True)), or, if it is PEFT's old format from a source "
                                           f"you trust, rename it {PICKLE_WEIGHTS_FILE}"), file
    file = path / PICKLE_WEIGHTS_FILE
    if not file.is_file():
        raise FileNotFoundError(f"{path}: the adapter's weights are missing (neither {WEIGHTS_FILE} nor "
                                f"{PICKLE_WEIGHTS_FILE}); copy the weights file next to {CONFIG_FILE}")
    try:
        state = torch.load(file, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        reason = str(exc).strip().splitlines()[0]
        raise AdapterFileError(
            f"{file} holds Python objects other than tensors, so plugtune will not load it (torch.load with "
            f"weights_only=True refused: {reason}). Where you trust the file, load it and re-save the tensors "
            f"with safetensors as {WEIGHTS_FILE}") from None
    except Exception as exc:  # a damaged zip archive, an empty file
        raise AdapterFileError(f"{file} is not a readable PyTorch file ({exc}): it is truncated or damaged. Save "
                               "the adapter again, or copy / download it again") from None
    if not isinstance(state, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                               for k, v in state.items()):
        raise AdapterFileError(f"{file} does not hold a {{name: tensor}} dictionary (got {type(state).__name__}); "
                               "it is not an adapter's weights file")
    return state, file


def check_base(model: nn.Module, path: Path, force: bool = False) -> None:
    meta_file = path / META_FILE
    if force or not meta_file.is_file():  # adapters made by PEFT carry no fingerprint
        return
    meta = _read_json(meta_file)
    want, have = meta.get("base_fingerprint", {}), base_fingerprint(model)
    if want.get("config_hash") != have["config_hash"]:
        raise AdapterMismatchError(
            f"the adapter in {path} was made for a different architecture (base '{meta.get('base_model')}', "
            f"{want.get('model_type')}) than this model ({have['model_type']}). Load it onto the base it was "
            "trained on, or pass force=True (--force) if you know the shapes agree.")
    if want.get("weights_checksum") != have["weights_checksum"]:
        raise AdapterMismatchError(
            f"the adapter in {path} was trained on other base weights (base '{meta.get('base_model')}'): same "
            "architecture, different checkpoint. Its outputs would be wrong. Load the original base, or pass "
            "force=True (--force) to load anyway.")


def load_adapter(model: nn.Module, path: str | Path, name: str = "default", force: bool = False,
                 trainable: bool = False) -> nn.Module:
    """Attach the adapter saved in `path` (by plugtune or PEFT) to `model` as adapter `name`."""
    path = Path(path)
    saved = read_adapter_config(path)
    check_base(model, path, force)
    method, cfg = method_from_saved(saved)
    saved_state, weights_file = read_adapter_weights(path)  # read before attaching: a bad file changes nothing
    attach_adapter(model, method, cfg, name=name, trainable=trainable)
    try:
        _copy_saved_weights(model, method, name, saved_state, weights_file)
    except Exception:
        remove_adapter(model, name)  # a failed load leaves no half-loaded adapter behind
        raise
    return model


def _copy_saved_weights(model: nn.Module, method: AdapterMethod, name: str, saved_state: dict,
                        weights_file: Path) -> None:
    ours = adapter_state(model, name)
    if method.load_state is not None:
        saved_state = method.load_state(model, name, saved_state)
        expected = {k: k for k in ours}
    else:
        expected = {to_saved_key(k, name): k for k in ours}
    base_copies = _saved_base_weights(model, saved_state, set(expected))
    missing = sorted(set(expected) - set(saved_state))
    unexpected = sorted(set(saved_state) - set(expected) - set(base_copies))
    if missing or unexpected:
        raise AdapterMismatchError(
            f"{weights_file} does not fit this model: {len(missing)} missing keys (e.g. {missing[:2]}), "
            f"{len(unexpected)} unexpected keys (e.g. {unexpected[:2]}). Was it trained on another base?")
    with torch.no_grad():
        for saved_key, our_key in expected.items():
            param, value = ours[our_key], saved_state[saved_key]
            if param.shape != value.shape:
                raise AdapterMismatchError(f"{saved_key}: shape {tuple(value.shape)} in the file, "
                                           f"{tuple(param.shape)} expected by this model")
            param.copy_(value.to(param.dtype))
        for key, ours in base_copies.items():  # only now, once everything else fits
            value = saved_state[key]
            if not torch.equal(ours.detach().cpu(), value.to(ours.dtype)):
                ours.copy_(value.to(ours.dtype))


def _saved_base_weights(model: nn.Module, saved_state: dict, adapter_keys: set[str]) -> dict[str, nn.Parameter]:
    """PEFT also saves the base embedding table when an embedding layer is adapted (in case the vocabulary
    was resized): {file key: our base parameter} for such tensors, which are taken (as PEFT does) after
    the adapter's own tensors were checked, so a file that does not fit never changes the base."""
    params = dict(model.named_parameters())
    found = {}
    for key in [k for k in saved_state if k not in adapter_keys and k.startswith(_PEFT_PREFIX)]:
        ours = params.get(key[len(_PEFT_PREFIX):])
        if ours is not None and ours.shape == saved_state[key].shape:
            found[key] = ours
    return found
