"""The LM head at labelled positions: log p(target), the quantity the SFT loss (its negative sum) and
every preference and policy loss start from. Every objective reads log-probs through here.

The LM head runs only at positions whose next token carries a label, and `chunk` positions at a
time (`labelled_logps`): with a 49,152-word vocabulary, (N, V) fp32 logits for N = 2,048 positions
are 400 MB, plus as much again for the log-softmax that autograd keeps for the backward.
"""
from __future__ import annotations

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

CHUNK = 1024  # labelled positions per LM-head chunk: (1024, 49152) fp32 logits are 200 MB


def _chunk_logps(head: nn.Module, hidden: torch.Tensor, targets: torch.Tensor, temperature: float) -> torch.Tensor:
    logits = head(hidden).float() / temperature  # (n, V)
    return logits.log_softmax(-1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)  # (n,)


def labelled_logps(head: nn.Module, hidden: torch.Tensor, targets: torch.Tensor, chunk: int = CHUNK,
                   temperature: float = 1.0) -> torch.Tensor:
    """log p(target) in float32, (N,), for hidden states (N, C) at labelled positions and their next
    tokens (N,). `temperature` divides the logits (as the sampler did when the tokens were drawn).

    At most `chunk` rows of (·, V) logits exist at once, forward and backward: when autograd records
    and there is more than one chunk, each chunk is checkpointed (its logits are recomputed in the
    backward instead of kept: one more head matmul per chunk, Chen et al. 2016's trade), so memory is
    O(chunk × V) instead of O(N × V). One chunk runs plainly: nothing would be saved by recomputing it.
    """
    n = hidden.shape[0]
    if n <= chunk or not torch.is_grad_enabled():
        pieces = [_chunk_logps(head, hidden[s:s + chunk], targets[s:s + chunk], temperature) for s in range(0, n, chunk)]
    else:
        pieces = [checkpoint(_chunk_logps, head, hidden[s:s + chunk], targets[s:s + chunk], temperature,
                             use_reentrant=False) for s in range(0, n, chunk)]
    return torch.cat(pieces) if pieces else hidden.new_zeros(0, dtype=torch.float32)
