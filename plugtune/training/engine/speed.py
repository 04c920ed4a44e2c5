"""Run-wide speed settings that do not change results: thread count and gradient checkpointing.
(Packing and length grouping are in data/packing.py and data/batching.py; the chunked LM head in
training/compute/logprobs.py.)"""
from __future__ import annotations

import torch
from torch import nn


def set_threads(threads: int) -> None:
    """training.threads: intra-op threads for this process (0 leaves torch's choice, which follows
    OMP_NUM_THREADS or else the number of cores). Two processes that each use every core are
    5-10x slower than one on a 2-core machine (README), so set it when sharing the machine."""
    if threads < 0:
        raise ValueError(f"training.threads must be >= 0, got {threads}")
    if threads:
        torch.set_num_threads(threads)


def enable_gradient_checkpointing(model: nn.Module) -> None:
    """Recompute each transformer layer's activations in the backward instead of keeping them
    (Chen et al. 2016, "Training Deep Nets with Sublinear Memory Cost"): activation memory from
    O(layers x tokens x width) to one layer's worth, for about one more forward per step.

    Non-reentrant checkpointing (use_reentrant=False) records gradients for the parameters inside a
    layer even when the layer's input does not require grad, which is the case with a frozen base
    under an adapter; the reentrant variant would silently give adapters no gradient there.
    Prefix tuning refuses it (causal_lm.prepare_inputs): checkpointed layers get no KV cache."""
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.x
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    elif hasattr(model, "gradient_checkpointing_enable"):
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    else:
        raise ValueError(f"training.gradient_checkpointing: {type(model).__name__} does not support it")
