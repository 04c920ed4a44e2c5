"""Log-probabilities of labelled tokens, the quantity every preference and policy loss starts from,
and the SFT loss (its negative sum).

The LM head runs only at positions whose next token carries a label, and `chunk` positions at a
time (`labelled_logps`): with a 49,152-word vocabulary, (N, V) fp32 logits for N = 2,048 positions
are 400 MB, plus as much again for the log-softmax that autograd keeps for the backward.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from plugtune.data.tokenize import IGNORE_INDEX
from plugtune.models.causal_lm import batch_hidden, lm_head
from plugtune.training.pairs import can_share_prefixes, pack_trees, pair_hidden, prompt_groups

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


@dataclass
class TokenLogps:
    per_token: torch.Tensor  # (B, T-1): log p(token t+1 | <= t) where labelled, 0 elsewhere
    mask: torch.Tensor  # (B, T-1) bool: which positions are labelled
    hidden: torch.Tensor  # (B, T, C): final hidden states (for value / reward heads)

    @property
    def sums(self) -> torch.Tensor:  # (B,) summed log-prob of each row's labelled tokens
        return self.per_token.sum(-1)

    @property
    def lengths(self) -> torch.Tensor:  # (B,) labelled tokens per row
        return self.mask.sum(-1)


def token_logps(model: nn.Module, batch: dict, temperature: float = 1.0, chunk: int = CHUNK,
                share_prefixes: bool = False) -> TokenLogps:
    """Log-probs of the labelled tokens of `batch` (input_ids, attention_mask, labels: (B, T)).

    `share_prefixes`: rows with the same prompt (the tokens before their first label) run it once,
    as one tree of prompt + completions (training/pairs.py), where the model allows it; the result
    is the padded batch's, position by position. Sampled rollouts want this: G completions of a
    prompt are G rows with one prompt, so the forward (and backward) work shrinks from G x (prompt +
    completion) to prompt + G x completion, and the padding goes."""
    targets = batch["labels"][:, 1:]  # (B, T-1): token t+1 is predicted at position t
    mask = targets != IGNORE_INDEX
    rows, cols = mask.nonzero(as_tuple=True)  # (N,), (N,)
    if share_prefixes and "position_ids" not in batch and can_share_prefixes(model):
        packed = pack_trees(batch["input_ids"], batch["attention_mask"],
                            prompt_groups(batch["input_ids"], batch["labels"])).to(batch["input_ids"].device)
        tree = pair_hidden(model, batch, packed)
        hidden = tree.flat[tree.index]  # (B, T, C); padding positions read zeros
    else:
        hidden = batch_hidden(model, batch)  # (B, T, C)
    values = labelled_logps(lm_head(model), hidden[rows, cols], targets[rows, cols], chunk, temperature)  # (N,)
    per_token = hidden.new_zeros(mask.shape, dtype=torch.float32).index_put((rows, cols), values)
    return TokenLogps(per_token, mask, hidden)
