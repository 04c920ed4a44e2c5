"""Checkpoints: trainable weights (safetensors), optimizer state, step, RNG and component states.

What counts as a checkpoint: a directory `step-NNNNNNN` that holds every file below, `state.json`
last. It is written as `.tmp-step-NNNNNNN`, each file flushed and fsync'ed, `state.json` written
last, then the directory renamed into place (and the parent fsync'ed): a crash at any point (kill -9,
power loss, a full disk) leaves either the complete new checkpoint or none, and the previous one
intact. Temporary directories of a crashed write are removed when the next run starts.

A full disk (ENOSPC) raises `CheckpointWriteError` naming the directory, the bytes needed and free,
and the fix; the partial directory is removed. Only the newest `keep` checkpoints are kept, and an
old one is removed only after the new one is in place.

In a distributed run every rank calls save/load (sharded FSDP tensors are gathered collectively);
rank 0 writes, including every rank's RNG and component states (rollout buffers differ by rank).
"""
from __future__ import annotations

import errno
import json
import os
import random
import shutil
from pathlib import Path
from typing import Callable

import torch
from safetensors.torch import save_file
from torch import nn

from plugtune.models.loading import read_safetensors
from plugtune.schema import ConfigError
from plugtune.training.engine.distributed import Distributed, full_tensor, is_dtensor, like_param

WEIGHTS = "trainable.safetensors"
OPTIMIZER = "optimizer.pt"
STATE = "state.json"  # written last: its presence marks a complete checkpoint
RNG = "rng.pt"
STATEFUL = "components.pt"  # state_dicts of the batch source, objective, ... (e.g. a rollout buffer, a KL controller)
REQUIRED = (WEIGHTS, OPTIMIZER, RNG, STATE)
TMP_PREFIX = ".tmp-"


class CheckpointWriteError(OSError):
    """A checkpoint (or artifact) could not be written; nothing half-written is left behind."""


def _dist(d):

    return d or Distributed()


def trainable_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """Full CPU copies of the trainable parameters (FSDP shards gathered: every rank calls this)."""

    return {n: full_tensor(p.detach()).to("cpu").contiguous() for n, p in model.named_parameters() if p.requires_grad}


def _optimizer_state(optimizer: torch.optim.Optimizer) -> dict:
    """optimizer.state_dict() with sharded (FSDP) state gathered into full tensors."""

    sd = optimizer.state_dict()
    if any(is_dtensor(v) for s in sd["state"].values() for v in s.values()):
        sd = {**sd, "state": {i: {k: full_tensor(v).cpu() if torch.is_tensor(v) else v for k, v in s.items()}
                              for i, s in sd["state"].items()}}
    return sd


def _load_optimizer(optimizer: torch.optim.Optimizer, sd: dict) -> None:
    """Load a full optimizer state, sharding each tensor like its parameter where the model is sharded."""

    params = [p for g in optimizer.param_groups for p in g["params"]]
    if any(is_dtensor(p) for p in params):
        sd = {**sd, "state": {i: {k: like_param(v, params[i]) if torch.is_tensor(v) and v.ndim > 0 else v
                                  for k, v in s.items()} for i, s in sd["state"].items()}}
    optimizer.load_state_dict(sd)


def _component_states(stateful: dict | None) -> dict:
    return {k: obj.state_dict() for k, obj in (stateful or {}).items() if hasattr(obj, "state_dict")}


def _rng_state() -> dict:
    return {"torch": torch.get_rng_state(), "python": random.getstate(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _write(path: Path, write: Callable[[Path], None]) -> None:
    """Write one file with `write(path)` and fsync it, so a rename after it never publishes a file
    whose bytes are still only in the page cache."""
    write(path)
    with open(path, "rb+") as f:
        os.fsync(f.fileno())


def _bytes_needed(weights: dict, optimizer_state: dict) -> int:
    n = sum(t.numel() * t.element_size() for t in weights.values())
    for s in optimizer_state.get("state", {}).values():
        n += sum(v.numel() * v.element_size() for v in s.values() if torch.is_tensor(v))
    return n


def _disk_full(exc: BaseException) -> bool:
    """ENOSPC, from Python's own writes or from safetensors' (a SafetensorError saying "os error 28")."""
    return (isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT)) or \
        "No space left on device" in str(exc) or "os error 28" in str(exc)


def disk_full_message(where: Path, needed: int | None = None) -> str:
    free = shutil.disk_usage(where if where.exists() else where.parent).free
    need = f"about {needed / 2**20:.1f} MiB needed, " if needed else ""
    return (f"no space left on the device holding {where}: {need}{free / 2**20:.1f} MiB free. Free some space, "
            "point output.dir at a larger disk, or keep fewer checkpoints (training.keep_checkpoints); "
            "the previous checkpoint is intact and output.resume=auto continues from it")


def clean_stale(root: Path) -> list[Path]:
    """Remove temporary directories a crashed write left behind (never complete checkpoints)."""
    stale = sorted(root.glob(TMP_PREFIX + "*")) if root.is_dir() else []
    for p in stale:
        shutil.rmtree(p, ignore_errors=True)
    return stale


def save_checkpoint(root: Path, step: int, model: nn.Module, optimizer: torch.optim.Optimizer,
                    extra: dict, keep: int = 2, stateful: dict | None = None, d=None) -> Path:
    d = _dist(d)
    weights = trainable_state(model)
    opt_state = _optimizer_state(optimizer)
    ranks_rng = d.gather_objects(_rng_state())
    ranks_components = d.gather_objects(_component_states(stateful))
    final = root / f"step-{step:07d}"
    error = None
    if d.is_main:
        try:
            _write_checkpoint(root, final, weights, opt_state, ranks_rng, ranks_components, {"step": step, **extra},
                              keep)
        except Exception as exc:  # every rank must learn of it, or the others wait forever
            error = exc
    error = d.broadcast_object(error) if d.active else error
    if error is not None:
        raise error
    return final


def _write_checkpoint(root: Path, final: Path, weights: dict, opt_state: dict, ranks_rng: list,
                      ranks_components: list, state: dict, keep: int) -> None:
    tmp = root / f"{TMP_PREFIX}{final.name}"
    # One rank: the plain layout; several: one entry per rank (load picks its own).
    rng = ranks_rng[0] if len(ranks_rng) == 1 else {"ranks": ranks_rng}
    components = ranks_components[0] if len(ranks_components) == 1 else {"ranks": ranks_components}
    state = {**state, "world_size": len(ranks_rng)}
    try:
        root.mkdir(parents=True, exist_ok=True)
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir()
        _write(tmp / WEIGHTS, lambda p: save_file(weights, str(p)))
        _write(tmp / OPTIMIZER, lambda p: torch.save(opt_state, p))
        _write(tmp / RNG, lambda p: torch.save(rng, p))
        _write(tmp / STATEFUL, lambda p: torch.save(components, p))
        _write(tmp / STATE, lambda p: p.write_text(json.dumps(state, indent=2)))  # last: the completion mark
        _fsync_dir(tmp)
    except BaseException as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        if _disk_full(exc):
            raise CheckpointWriteError(errno.ENOSPC, disk_full_message(root, _bytes_needed(weights, opt_state))) from exc
        raise
    old = None
    if final.exists():  # the same step again (a rerun): set the old one aside, never delete it first
        old = root / f"{TMP_PREFIX}old-{final.name}"
        shutil.rmtree(old, ignore_errors=True)
        final.rename(old)
    tmp.rename(final)
    _fsync_dir(root)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    for stale in list_checkpoints(root)[:-keep] if keep > 0 else []:
        shutil.rmtree(stale, ignore_errors=True)


def list_checkpoints(root: Path) -> list[Path]:
    """Complete checkpoints, oldest first (a directory missing any file, state.json included, is not one)."""
    if not root.is_dir():
        return []
    return sorted(p for p in root.glob("step-*") if all((p / f).is_file() for f in REQUIRED))


def _own(saved, rank: int, what: str, path: Path):
    """This rank's entry of a per-rank saved state (a single-process state is everyone's)."""
    if not (isinstance(saved, dict) and "ranks" in saved):
        return saved
    ranks = saved["ranks"]
    if rank >= len(ranks):
        print(f"[plugtune] warning: {path} was written by {len(ranks)} processes; rank {rank} takes rank 0's "
              f"{what} (the resumed run is not bit-exact)")
        return ranks[0]
    return ranks[rank]


def load_checkpoint(path: Path, model: nn.Module, optimizer: torch.optim.Optimizer, stateful: dict | None = None,
                    d=None) -> dict:

    d = _dist(d)
    state = json.loads((path / STATE).read_text())
    weights = read_safetensors(path / WEIGHTS, "Resume from an earlier checkpoint (output.resume=DIR) or start afresh")
    params = dict(model.named_parameters())
    trainable = {n for n, p in params.items() if p.requires_grad}
    if set(weights) != trainable:
        missing, extra = sorted(trainable - set(weights)), sorted(set(weights) - trainable)
        raise ValueError(f"checkpoint {path} does not match this run's trainable parameters "
                         f"(missing {missing[:3]}, unexpected {extra[:3]}): was it made with another method or config?")
    with torch.no_grad():
        for name, value in weights.items():
            params[name].copy_(like_param(value.to(params[name].dtype), params[name]))
    _load_optimizer(optimizer, torch.load(path / OPTIMIZER, map_location="cpu", weights_only=True))
    rng = _own(torch.load(path / RNG, weights_only=True), d.rank, "random state", path)
    torch.set_rng_state(rng["torch"])
    random.setstate(rng["python"])
    if rng["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rng["cuda"])
    if (path / STATEFUL).is_file():
        saved = _own(torch.load(path / STATEFUL, map_location="cpu", weights_only=True), d.rank, "data/objective state",
                     path)
        for key, obj in (stateful or {}).items():
            if key in saved and hasattr(obj, "load_state_dict"):
                obj.load_state_dict(saved[key])
    return state


# ---------------------------------------------------------------- the run's config (resume=auto)

# Keys that do not change what is trained or how: where things go, how often to print, log, evaluate
# or checkpoint, how many checkpoints to keep, trackers, the device and the distributed layout (a
# checkpoint is the same files under DDP, FSDP or one process). Everything else must match.
RESUME_IGNORED = ("output.", "training.progress", "training.log_every", "training.eval_every",
                  "training.save_every", "training.keep_checkpoints", "training.report_to", "training.distributed",
                  "training.threads", "model.device", "data.eval", "data.eval_limit")


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v:
            out.update(_flatten(v, key + "."))
        else:
            out[key] = list(v) if isinstance(v, tuple) else v
    return out


def config_differences(saved: dict, new: dict) -> list[str]:
    """'key: saved -> new' for every key that differs and changes the training trajectory."""
    a, b = _flatten(saved), _flatten(new)
    shown = lambda d, key: repr(d[key]) if key in d else "(unset)"
    return [f"{key}: {shown(a, key)} -> {shown(b, key)}" for key in sorted(set(a) | set(b))
            if not key.startswith(RESUME_IGNORED) and a.get(key) != b.get(key)]


# ---------------------------------------------------------------- the output directory of a run

RUN_OUTPUTS = ("checkpoints", "metrics.jsonl", "loss_curve.png", "train_report.json", "tracking.json", "tensorboard",
               "mlruns", "wandb")


def check_output(out: Path, config: dict, resume: str, overwrite: bool, d=None) -> bool:
    """Before anything is read or written: whether the run in `out` resumes, and, with resume=auto and
    checkpoints present, refuse if they were made with a config that differs in a key that changes
    training (`config_differences`). Reads only. Rank 0 decides; every rank raises the same error."""

    d = _dist(d)
    decision: tuple[bool, str | None] = (False, None)
    if d.is_main:
        found = [] if overwrite else list_checkpoints(out / "checkpoints")
        resuming = resume != "never" and (resume != "auto" or bool(found))
        error = None
        if resume == "auto" and found:
            state = json.loads((found[-1] / STATE).read_text())
            saved = state.get("config")
            if saved is None and (out / "config.yaml").is_file():
                import yaml

                saved = yaml.safe_load((out / "config.yaml").read_text())
            diffs = config_differences(saved, config) if saved is not None else []
            if diffs:
                error = (f"output.dir={out} holds checkpoints of a run with another config, and output.resume=auto "
                         f"would continue it with this one. Differences: {'; '.join(diffs)}. Use another output.dir, "
                         "or set output.overwrite=true to start afresh (removes that run's checkpoints and logs)")
        decision = (resuming, error)
    resuming, error = d.broadcast_object(decision)
    if error:
        raise ConfigError(error)
    return resuming


def write_output(out: Path, config: dict, overwrite: bool, d=None) -> None:
    """Once the data and the model have loaded (bad input has failed by then, leaving `out` alone): with
    `overwrite`, remove a previous run's checkpoints and logs; clear stale temporary files; write
    config.yaml. Rank 0 only."""
    d = _dist(d)
    if d.is_main:
        import yaml

        out.mkdir(parents=True, exist_ok=True)
        if overwrite:
            for name in RUN_OUTPUTS:
                path = out / name
                if path.is_dir():
                    shutil.rmtree(path)
                elif path.exists():
                    path.unlink()
        for stale in out.glob(TMP_PREFIX + "*"):  # an artifact write a crash interrupted
            shutil.rmtree(stale, ignore_errors=True) if stale.is_dir() else stale.unlink()
        tmp = out / f"{TMP_PREFIX}config.yaml"
        tmp.write_text(yaml.safe_dump(config, sort_keys=False))
        os.replace(tmp, out / "config.yaml")
    d.barrier()


def publish(save: Callable[[Path], Path], out: Path) -> Path:
    """Run `save(dir)` (it writes e.g. dir/adapter and returns it) into a staging directory, fsync,
    then move each entry it made into `out` by rename: `out/adapter` is always either the old complete
    artifact or the new complete one. Returns the artifact's path under `out`."""
    staging = out / f"{TMP_PREFIX}artifact"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    try:
        produced = Path(save(staging))
        for path in staging.rglob("*"):
            if path.is_file():
                with open(path, "rb+") as f:
                    os.fsync(f.fileno())
    except BaseException as exc:
        shutil.rmtree(staging, ignore_errors=True)
        if _disk_full(exc):
            raise CheckpointWriteError(errno.ENOSPC, disk_full_message(out).replace(
                "the previous checkpoint is intact", "the final checkpoint is intact")) from exc
        raise
    for entry in sorted(staging.iterdir()):
        target, old = out / entry.name, out / f"{TMP_PREFIX}old-{entry.name}"
        if target.exists():
            target.rename(old)
        entry.rename(target)
        if old.is_dir():
            shutil.rmtree(old)
        elif old.exists():
            old.unlink()
    staging.rmdir()
    _fsync_dir(out)
    return out / produced.relative_to(staging)


def write_json(path: Path, data: dict) -> None:
    """Replace `path` atomically (a temporary file renamed over it)."""
    tmp = path.with_name(f"{TMP_PREFIX}{path.name}")
    tmp.write_text(json.dumps(data, indent=2))
    os.replace(tmp, path)
