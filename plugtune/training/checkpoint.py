"""Checkpoints: trainable weights (safetensors), optimizer state, step and RNG states.

Written into a temporary directory and renamed, so a crash mid-write never corrupts or
replaces the last good checkpoint. Only the newest `keep` checkpoints are kept.
"""
from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

WEIGHTS = "trainable.safetensors"
OPTIMIZER = "optimizer.pt"
STATE = "state.json"
RNG = "rng.pt"
STATEFUL = "components.pt"  # state_dicts of the batch source, objective, ... (e.g. a rollout buffer, a KL controller)


def trainable_state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().to("cpu").contiguous() for n, p in model.named_parameters() if p.requires_grad}


def _component_states(stateful: dict | None) -> dict:
    return {k: obj.state_dict() for k, obj in (stateful or {}).items() if hasattr(obj, "state_dict")}


def save_checkpoint(root: Path, step: int, model: nn.Module, optimizer: torch.optim.Optimizer,
                    extra: dict, keep: int = 2, stateful: dict | None = None) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step-{step:07d}"
    tmp = root / f".tmp-step-{step:07d}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    save_file(trainable_state(model), str(tmp / WEIGHTS))
    torch.save(optimizer.state_dict(), tmp / OPTIMIZER)
    rng = {"torch": torch.get_rng_state(), "python": random.getstate(),
           "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}
    torch.save(rng, tmp / RNG)
    torch.save(_component_states(stateful), tmp / STATEFUL)
    (tmp / STATE).write_text(json.dumps({"step": step, **extra}, indent=2))
    if final.exists():
        shutil.rmtree(final)
    tmp.rename(final)
    for old in list_checkpoints(root)[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    return final


def list_checkpoints(root: Path) -> list[Path]:
    if not root.is_dir():
        return []
    return sorted(p for p in root.glob("step-*") if (p / STATE).is_file() and (p / WEIGHTS).is_file())


def load_checkpoint(path: Path, model: nn.Module, optimizer: torch.optim.Optimizer, stateful: dict | None = None) -> dict:
    state = json.loads((path / STATE).read_text())
    weights = load_file(str(path / WEIGHTS))
    params = dict(model.named_parameters())
    trainable = {n for n, p in params.items() if p.requires_grad}
    if set(weights) != trainable:
        missing, extra = sorted(trainable - set(weights)), sorted(set(weights) - trainable)
        raise ValueError(f"checkpoint {path} does not match this run's trainable parameters "
                         f"(missing {missing[:3]}, unexpected {extra[:3]}): was it made with another method or config?")
    with torch.no_grad():
        for name, value in weights.items():
            params[name].copy_(value.to(params[name].dtype))
    optimizer.load_state_dict(torch.load(path / OPTIMIZER, map_location="cpu", weights_only=False))
    rng = torch.load(path / RNG, weights_only=False)
    torch.set_rng_state(rng["torch"])
    random.setstate(rng["python"])
    if rng["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rng["cuda"])
    if (path / STATEFUL).is_file():
        saved = torch.load(path / STATEFUL, map_location="cpu", weights_only=False)
        for key, obj in (stateful or {}).items():
            if key in saved and hasattr(obj, "load_state_dict"):
                obj.load_state_dict(saved[key])
    return state
