"""Per-token log-probs of a batch's labelled tokens (TokenLogps), with the final hidden states kept for
value and reward heads; rows that share a prompt run it once (prompt_trees.py). GRPO, PPO and the
reference policy read their log-probs here."""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from plugtune.data.tokenize import IGNORE_INDEX
from plugtune.models.causal_lm import batch_hidden, lm_head
from plugtune.training.compute.logprobs import CHUNK, labelled_logps
from plugtune.training.compute.prompt_trees import can_share_prefixes, pack_trees, prompt_groups, tree_hidden


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
    as one tree of prompt + completions (training/compute/prompt_trees.py), where the model allows it; the result
    is the padded batch's, position by position. Sampled rollouts want this: G completions of a
    prompt are G rows with one prompt, so the forward (and backward) work shrinks from G x (prompt +
    completion) to prompt + G x completion, and the padding goes."""
    targets = batch["labels"][:, 1:]  # (B, T-1): token t+1 is predicted at position t
    mask = targets != IGNORE_INDEX
    rows, cols = mask.nonzero(as_tuple=True)  # (N,), (N,)
    if share_prefixes and "position_ids" not in batch and can_share_prefixes(model):
        packed = pack_trees(batch["input_ids"], batch["attention_mask"],
                            prompt_groups(batch["input_ids"], batch["labels"])).to(batch["input_ids"].device)
        tree = tree_hidden(model, batch, packed)
        hidden = tree.flat[tree.index]  # (B, T, C); padding positions read zeros
    else:
        hidden = batch_hidden(model, batch)  # (B, T, C)
    values = labelled_logps(lm_head(model), hidden[rows, cols], targets[rows, cols], chunk, temperature)  # (N,)
    per_token = hidden.new_zeros(mask.shape, dtype=torch.float32).index_put((rows, cols), values)
    return TokenLogps(per_token, mask, hidden)
