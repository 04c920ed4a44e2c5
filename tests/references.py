"""Reference computations and batch helpers that only the tests use (kept out of the package)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from plugtune.data.batching import batch_indices, collate
from plugtune.data.preference import TokenizedPair, collate_pairs
from plugtune.data.tokenize import IGNORE_INDEX, Tokenized


def full_logits_loss_sum(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """The next-token loss from the model's full (B, T, V) logits: the reference for the chunked head."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), batch["labels"][:, 1:].flatten(),
                           ignore_index=IGNORE_INDEX, reduction="sum")


def micro_batch(items: list[Tokenized], index: int, batch_size: int, seed: int, pad_id: int) -> dict[str, torch.Tensor]:
    """The `index`-th micro-batch of an endless stream of shuffled epochs (drop-last per epoch)."""
    return collate([items[i] for i in batch_indices(len(items), index, batch_size, seed)], pad_id)


def micro_batch_pairs(items: list[TokenizedPair], index: int, batch_size: int, seed: int,
                      pad_id: int) -> dict[str, torch.Tensor]:
    """The `index`-th micro-batch of `batch_size` pairs (2 * batch_size rows)."""
    return collate_pairs([items[i] for i in batch_indices(len(items), index, batch_size, seed)], pad_id)
