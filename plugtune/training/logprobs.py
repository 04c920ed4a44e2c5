"""Log-probabilities of labelled tokens, the quantity every preference and policy loss starts from.

The LM head runs only at positions whose next token carries a label (the completion), as in the
SFT objective: with a 49,152-word vocabulary the (B, T, V) logits would dominate time and memory.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from plugtune.data.tokenize import IGNORE_INDEX
from plugtune.models.causal_lm import hidden_states, lm_head


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


def token_logps(model: nn.Module, batch: dict, temperature: float = 1.0, chunk: int = 1024) -> TokenLogps:
    """Log-probs of the labelled tokens of `batch` (input_ids, attention_mask, labels: (B, T)).
    `temperature` divides the logits, as the sampler did when the tokens were drawn. The head and
    log-softmax run over `chunk` labelled positions at a time, so (N, V) is never held whole in fp32."""
    hidden = hidden_states(model, batch["input_ids"], batch["attention_mask"])  # (B, T, C)
    targets = batch["labels"][:, 1:]  # (B, T-1): token t+1 is predicted at position t
    mask = targets != IGNORE_INDEX
    rows, cols = mask.nonzero(as_tuple=True)  # (N,), (N,)
    head = lm_head(model)
    picked = []
    for start in range(0, rows.numel(), chunk):
        r, c = rows[start:start + chunk], cols[start:start + chunk]
        logits = head(hidden[r, c]).float() / temperature  # (n, V)
        picked.append(logits.log_softmax(-1).gather(-1, targets[r, c].unsqueeze(-1)).squeeze(-1))  # (n,)
    values = torch.cat(picked) if picked else hidden.new_zeros(0)
    per_token = hidden.new_zeros(mask.shape, dtype=torch.float32).index_put((rows, cols), values)
    return TokenLogps(per_token, mask, hidden)
