"""The types the loop and the recipes share: a batch, a batch source, an objective, a parameter group.

A recipe builds an objective and a batch source; the loop (loop.py) runs them. Neither side imports
the other: both import this module.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Protocol

import torch
from torch import nn

Batch = dict[str, Any]


class NonFiniteLossError(FloatingPointError):
    """The loss or the gradients became NaN/inf (training.on_nonfinite=stop); training stopped without
    writing a checkpoint, so the last good one is intact."""


class BatchSource(Protocol):
    """The micro-batches of optimizer step s (`batches(step, model)`): a source may generate them with
    the model (rollouts) and keeps its own state (state_dict/load_state_dict), so resume stays exact.

    Optional hook `shard(dist) -> BatchSource`: this rank's view of the source under torch.distributed.
    Without it the engine cuts each global micro-batch row-wise (distributed.ShardedSource), pairs kept
    together when the source says `paired = True`."""

    steps_per_epoch: int

    def batches(self, step: int, model: nn.Module) -> list[Batch]: ...

    def state_dict(self) -> dict: ...

    def load_state_dict(self, state: dict) -> None: ...


class Objective(Protocol):
    """`units(batch)`: what the summed loss is a sum over, an int or {key: int} (one key per summed
    loss). `__call__` returns the summed loss (a tensor, or {key: tensor}) and metrics: scalars that
    are means over the micro-batch (tensors are fine: the loop syncs once per step). The loop divides
    by the units of the whole accumulated step, so accumulation is exact (a mean over all supervised
    tokens, not a mean of per-micro-batch means). Optional: `reports_perplexity`, and
    state_dict/load_state_dict for objectives with state."""

    def units(self, batch: Batch) -> int | dict[str, int]: ...

    def __call__(self, model: nn.Module, batch: Batch) -> tuple[torch.Tensor | dict, dict]: ...


@dataclass
class IndexedBatches:
    """A fixed stream: step s takes micro-batches s*accum ... s*accum + accum - 1 of make_batch(i).
    It needs no state of its own: resuming at step s is enough to continue it exactly.
    `paired`: rows i and B+i of each batch are one preference pair (kept together when sharded)."""

    make_batch: Callable[[int], Batch]
    n_examples: int
    batch_size: int
    grad_accum: int = 1
    paired: bool = False

    @property
    def steps_per_epoch(self) -> int:
        return max(1, self.n_examples // (self.batch_size * self.grad_accum))

    def batches(self, step: int, model: nn.Module) -> list[Batch]:
        return [self.make_batch(step * self.grad_accum + k) for k in range(self.grad_accum)]

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


@dataclass
class ParamGroup:
    """Parameters sharing a learning-rate scale and a clipping group."""

    name: str
    params: list[nn.Parameter]
    lr_scale: float = 1.0
    clip_group: str = "all"  # groups with the same clip_group are clipped together (by their joint norm)

