"""Padding and a resumable, seeded batch order (shuffled, or grouped by length)."""
from __future__ import annotations

import functools

import torch

from plugtune.data.tokenize import IGNORE_INDEX, Tokenized

MEGA_BATCH = 50  # length grouping sorts within runs of MEGA_BATCH batches (as HF's LengthGroupedSampler)


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


@functools.lru_cache(maxsize=4)
def grouped_epoch(lengths: tuple[int, ...], batch_size: int, seed: int, epoch: int,
                  mega_batch: int = MEGA_BATCH) -> list[list[int]]:
    """The batches of one epoch grouped by length: the epoch's shuffled order (the same items as
    `batch_indices` keeps: drop-last), cut into runs of `mega_batch` batches, each run sorted by
    length and cut into batches, then the batches shuffled. Sorting within runs (not the whole
    epoch) keeps batches random in content; shuffling the batches avoids HF's long-to-short sawtooth
    within every run, which shows in the loss curve. A pure function of its arguments (resumable)."""
    g = torch.Generator().manual_seed(seed * 100_003 + epoch)
    order = torch.randperm(len(lengths), generator=g).tolist()  # = epoch_order(n, seed, epoch)
    order = order[:max(1, len(order) // batch_size) * batch_size]
    run = batch_size * mega_batch
    batches = []
    for start in range(0, len(order), run):
        part = sorted(order[start:start + run], key=lambda i: -lengths[i])  # stable: ties keep the shuffle
        batches += [part[k:k + batch_size] for k in range(0, len(part), batch_size)]
    return [batches[b] for b in torch.randperm(len(batches), generator=g).tolist()]


def grouped_batch_indices(lengths: tuple[int, ...], index: int, batch_size: int, seed: int) -> list[int]:
    """Item indices of the `index`-th micro-batch when batches are grouped by length (`grouped_epoch`);
    the same epochs and steps per epoch as `batch_indices`."""
    per_epoch = max(1, len(lengths) // batch_size)
    epoch, within = divmod(index, per_epoch)
    return grouped_epoch(tuple(lengths), batch_size, seed, epoch)[within]

