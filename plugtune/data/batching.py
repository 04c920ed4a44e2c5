"""Padding and a resumable, seeded batch order."""
from __future__ import annotations

import torch

from plugtune.data.tokenize import IGNORE_INDEX, Tokenized


def collate(items: list[Tokenized], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad to the longest item: input_ids, attention_mask, labels, all (B, T)."""
    width = max(len(it.input_ids) for it in items)
    ids = torch.full((len(items), width), pad_id, dtype=torch.long)
    labels = torch.full((len(items), width), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(items), width), dtype=torch.long)
    for row, it in enumerate(items):
        n = len(it.input_ids)
        ids[row, :n] = torch.tensor(it.input_ids)
        labels[row, :n] = torch.tensor(it.labels)
        mask[row, :n] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def epoch_order(n: int, seed: int, epoch: int) -> list[int]:
    """A permutation that depends only on (seed, epoch): resuming reproduces the same order."""
    g = torch.Generator().manual_seed(seed * 100_003 + epoch)
    return torch.randperm(n, generator=g).tolist()


def batch_indices(n: int, index: int, batch_size: int, seed: int) -> list[int]:
    """Item indices of the `index`-th micro-batch of an endless stream of shuffled epochs (drop-last per epoch)."""
    per_epoch = max(1, n // batch_size)
    epoch, within = divmod(index, per_epoch)
    order = epoch_order(n, seed, epoch)
    chosen = order[within * batch_size:(within + 1) * batch_size]
    return chosen if len(chosen) == batch_size else order[:batch_size]  # dataset smaller than a batch: all of it


def micro_batch(items: list[Tokenized], index: int, batch_size: int, seed: int, pad_id: int) -> dict[str, torch.Tensor]:
    """The `index`-th micro-batch of an endless stream of shuffled epochs (drop-last per epoch)."""
    return collate([items[i] for i in batch_indices(len(items), index, batch_size, seed)], pad_id)
