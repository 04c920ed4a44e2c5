"""The one training loop: accumulation, AdamW, schedule, clipping, evaluation, checkpoints,
resume, progress and metrics. Objectives are plugged in (see objectives.py); the loop does not
know whether it trains a full model, an adapter, a classifier or (later) a preference loss.
"""
from __future__ import annotations

import contextlib
import math
import resource
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from plugtune.config import TrainingConfig
from plugtune.training.checkpoint import list_checkpoints, load_checkpoint, save_checkpoint
from plugtune.training.metrics import MetricsLog, plot_loss_curve
from plugtune.training.objectives import CausalLMObjective, Objective
from plugtune.training.schedule import lr_multiplier

Batch = dict[str, torch.Tensor]


class NonFiniteLossError(FloatingPointError):
    """The loss became NaN/inf; training stopped without writing a checkpoint."""


@dataclass
class FitResult:
    steps: int
    train_loss: float  # mean loss of the last step
    eval_loss: float | None
    train_seconds: float
    tokens: int  # supervised units seen (tokens for LM objectives)
    trainable_params: int
    total_params: int
    peak_memory_mb: float
    checkpoint: Path | None
    history: list[dict] = field(default_factory=list)


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB: process peak RSS


def count_parameters(model: nn.Module) -> tuple[int, int]:
    params = list({id(p): p for p in model.parameters()}.values())
    return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)


def build_optimizer(model: nn.Module, cfg: TrainingConfig) -> torch.optim.Optimizer:
    decay, no_decay = [], []
    for _, p in model.named_parameters():
        if p.requires_grad:
            (decay if p.ndim >= 2 else no_decay).append(p)  # no decay on biases, norms, magnitudes
    if not decay and not no_decay:
        raise ValueError("the model has no trainable parameters")
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=cfg.lr, betas=tuple(cfg.betas))


def _to(batch: Batch, device: torch.device) -> Batch:
    return {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}


@torch.no_grad()
def evaluate_loss(model: nn.Module, batches: list[Batch], objective: Objective, device: torch.device,
                  amp: torch.dtype | None = None) -> float:
    """Mean loss per unit (token) over `batches`."""
    was_training = model.training
    model.eval()
    total, units = 0.0, 0
    for batch in batches:
        batch = _to(batch, device)
        with _autocast(device, amp):
            loss_sum, _ = objective(model, batch)
        total += float(loss_sum)
        units += objective.units(batch)
    model.train(was_training)
    return total / max(units, 1)


def _autocast(device: torch.device, amp: torch.dtype | None):
    return torch.autocast(device.type, dtype=amp) if amp is not None else contextlib.nullcontext()


def fit(model: nn.Module, make_batch: Callable[[int], Batch], n_examples: int, cfg: TrainingConfig, out_dir: Path,
        objective: Objective | None = None, eval_batches: list[Batch] | None = None,
        device: torch.device | None = None, amp: torch.dtype | None = None, resume: str = "auto") -> FitResult:
    """Train `model` in place. `make_batch(i)` returns the i-th micro-batch of a fixed stream."""
    objective = objective or CausalLMObjective()
    device = device or next(model.parameters()).device
    out_dir = Path(out_dir)
    ckpt_root = out_dir / "checkpoints"
    steps_per_epoch = max(1, n_examples // (cfg.batch_size * cfg.grad_accum))
    total_steps = cfg.max_steps or max(1, math.ceil(cfg.epochs * steps_per_epoch))
    torch.manual_seed(cfg.seed)

    optimizer = build_optimizer(model, cfg)
    trainable_params, total_params = count_parameters(model)
    start_step, last_ckpt = 0, None
    resume_path = _find_resume(ckpt_root, resume)
    if resume_path is not None:
        state = load_checkpoint(resume_path, model, optimizer)
        start_step, last_ckpt = state["step"], resume_path
        print(f"[plugtune] resumed from {resume_path} at step {start_step}")
    log = MetricsLog(out_dir / "metrics.jsonl", resume_from_step=start_step if resume_path else None)

    def set_lr(step: int) -> float:
        lr = cfg.lr * lr_multiplier(step, total_steps, cfg.warmup_steps, cfg.schedule, cfg.min_lr_ratio)
        for group in optimizer.param_groups:
            group["lr"] = lr
        return lr

    progress = _progress(cfg.progress, total_steps, start_step)
    model.train()
    train_loss, eval_loss, tokens_seen, t0 = float("nan"), None, 0, time.perf_counter()
    for step in range(start_step, total_steps):
        step_t0 = time.perf_counter()
        lr = set_lr(step)
        micro = [make_batch(step * cfg.grad_accum + k) for k in range(cfg.grad_accum)]
        units = sum(objective.units(b) for b in micro)
        if units == 0:
            raise ValueError(f"step {step}: the batch has no supervised tokens; check data.train_on and max_length")
        loss_total = 0.0
        for batch in micro:
            batch = _to(batch, device)
            with _autocast(device, amp):
                loss_sum, _ = objective(model, batch)
            loss = loss_sum / units  # normalise by the whole accumulated batch
            if not torch.isfinite(loss):
                progress.close()
                where = f"the last good checkpoint {last_ckpt} is intact" if last_ckpt else "no checkpoint was written"
                raise NonFiniteLossError(
                    f"the loss became {float(loss.detach())} at step {step + 1}; training stopped and {where}. "
                    "Lower training.lr, enable clipping (training.max_grad_norm), or check the data for empty targets.")
            loss.backward()
            loss_total += float(loss.detach())
        grad_norm = _clip(model, cfg.max_grad_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        train_loss, tokens_seen = loss_total, tokens_seen + units
        done = step + 1
        dt = time.perf_counter() - step_t0
        if done % cfg.log_every == 0 or done == total_steps:
            log.write({"kind": "train", "step": done, "loss": round(train_loss, 6), "lr": lr,
                       "grad_norm": round(grad_norm, 6), "tokens": units, "tokens_per_s": round(units / dt, 1),
                       "elapsed_s": round(time.perf_counter() - t0, 3)})
        progress.update(1)
        progress.set_postfix(loss=f"{train_loss:.4f}", tok_s=f"{units / dt:.0f}", lr=f"{lr:.2e}")
        if eval_batches and ((cfg.eval_every and done % cfg.eval_every == 0) or done == total_steps):
            eval_loss = evaluate_loss(model, eval_batches, objective, device, amp)
            log.write({"kind": "eval", "step": done, "eval_loss": round(eval_loss, 6),
                       "perplexity": round(math.exp(min(eval_loss, 50)), 4)})
            progress.write(f"step {done}: eval loss {eval_loss:.4f}")
        if (cfg.save_every and done % cfg.save_every == 0) or done == total_steps:
            last_ckpt = save_checkpoint(ckpt_root, done, model, optimizer, {"total_steps": total_steps},
                                        keep=cfg.keep_checkpoints)
    progress.close()
    model.eval()
    history = log.read()
    if history:
        plot_loss_curve(history, out_dir / "loss_curve.png")
    return FitResult(steps=total_steps, train_loss=train_loss, eval_loss=eval_loss,
                     train_seconds=time.perf_counter() - t0, tokens=tokens_seen, trainable_params=trainable_params,
                     total_params=total_params, peak_memory_mb=peak_memory_mb(device), checkpoint=last_ckpt,
                     history=history)


def _clip(model: nn.Module, max_norm: float) -> float:
    params = [p for p in model.parameters() if p.grad is not None]
    if not params:
        return 0.0
    if max_norm and max_norm > 0:
        return float(torch.nn.utils.clip_grad_norm_(params, max_norm))
    return float(torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in params])))


def _find_resume(ckpt_root: Path, resume: str) -> Path | None:
    if resume == "never":
        return None
    if resume == "auto":
        found = list_checkpoints(ckpt_root)
        return found[-1] if found else None
    path = Path(resume)
    if not path.is_dir():
        raise FileNotFoundError(f"output.resume={resume}: no such checkpoint directory "
                                f"(available: {[str(p) for p in list_checkpoints(ckpt_root)]})")
    return path


class _NoProgress:
    def update(self, n): pass
    def set_postfix(self, **kw): pass
    def write(self, s): print(s)
    def close(self): pass


def _progress(enabled: bool, total: int, initial: int):
    if not enabled:
        return _NoProgress()
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, desc="train", unit="step", dynamic_ncols=True)
