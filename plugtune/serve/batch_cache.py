"""KV-cache surgery for continuous batching: merge a newly prefilled batch into the running one,
drop finished rows, and trim padding that no row needs any more.

The running batch is a transformers `DynamicCache` whose layers hold keys and values of shape
(B, H_kv, T, D), plus an attention mask (B, T) with 0 on padding. Rows are left-padded, so every
row's newest token sits in the last column and one decode step appends one column for all rows.
Keys were rotated (RoPE) with positions taken from the mask, so moving a row's columns right by
adding padding on the left changes nothing it computes: positions come from the mask, never from
the column index.

    merged, mask = concat_rows(running, running_mask, new, new_mask)   # (B1 + B2, H, max(T1, T2), D)
    mask = select_rows(merged, mask, keep)                              # retire rows, trim columns

Only plain full-attention layers (`DynamicLayer`) are supported: sliding-window layers keep a
rolling window whose columns are not aligned with the mask, so merging them would be wrong.
"""
from __future__ import annotations

import torch

from plugtune.inference.fast_decode import StaticCache


def check_cache(cache) -> None:
    """Raise a clear error for caches this module cannot merge."""
    from transformers.cache_utils import DynamicLayer

    for i, layer in enumerate(cache.layers):
        if type(layer) is not DynamicLayer:
            raise NotImplementedError(f"the serving engine merges plain full-attention KV caches only; layer {i} "
                                      f"uses {type(layer).__name__} (sliding-window or linear-attention models "
                                      "are not supported by continuous batching)")
        if layer.keys is None or layer.keys.dim() != 4:
            raise NotImplementedError(f"layer {i} of the KV cache holds no (B, H, T, D) keys (KV sharing?); "
                                      "the serving engine cannot merge it")


def _pad_left(x: torch.Tensor, n: int, dim: int) -> torch.Tensor:
    if n == 0:
        return x
    shape = list(x.shape)
    shape[dim] = n
    return torch.cat([x.new_zeros(shape), x], dim=dim)


def concat_rows(cache, mask: torch.Tensor | None, new_cache, new_mask: torch.Tensor):
    """Rows of `cache` then rows of `new_cache`, both left-padded to the longer length.
    `cache` may be None (no running batch). Returns (cache, mask (B1 + B2, T)); `cache` is reused."""
    check_cache(new_cache)
    if cache is None:
        return new_cache, new_mask
    t_old, t_new = mask.shape[1], new_mask.shape[1]
    width = max(t_old, t_new)
    for old, new in zip(cache.layers, new_cache.layers):
        old.keys = torch.cat([_pad_left(old.keys, width - t_old, 2), _pad_left(new.keys, width - t_new, 2)], dim=0)
        old.values = torch.cat([_pad_left(old.values, width - t_old, 2), _pad_left(new.values, width - t_new, 2)],
                               dim=0)
    mask = torch.cat([_pad_left(mask, width - t_old, 1), _pad_left(new_mask, width - t_new, 1)], dim=0)
    return cache, mask


def select_rows(cache, mask: torch.Tensor, keep: list[int]) -> torch.Tensor:
    """Keep rows `keep` (in that order) of the cache in place, then drop the leading columns that are
    padding in every remaining row. Returns the new mask (len(keep), T')."""
    if len(keep) == mask.shape[0]:
        rows = None
    else:
        rows = torch.tensor(keep, dtype=torch.long, device=mask.device)
        mask = mask.index_select(0, rows)
    used = mask.any(dim=0)  # (T,) columns some row still attends to
    start = int(used.float().argmax()) if bool(used.any()) else mask.shape[1]
    for layer in cache.layers:
        if rows is not None:
            layer.keys = layer.keys.index_select(0, rows)
            layer.values = layer.values.index_select(0, rows)
        if start:
            layer.keys = layer.keys[:, :, start:]
            layer.values = layer.values[:, :, start:]
    return mask[:, start:]


# The same surgery on the fast decoder's static cache (inference/fast_decode.py), whose mask lives in the
# cache and whose buffers keep spare columns, so a decode step writes in place instead of concatenating.
def concat_static(cache: StaticCache | None, new: StaticCache, spare: int = 64) -> StaticCache:
    """Rows of `cache` then rows of `new`, right-aligned at the longer filled length, with `spare` free
    columns after it. `cache` may be None (no running batch)."""
    if cache is None:
        return new
    t_old, t_new = cache.length, new.length
    width = max(t_old, t_new)
    rows = cache.batch + new.batch

    def merged(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        out = a.new_zeros(rows, a.shape[1], width + spare, a.shape[3])
        out[:cache.batch, :, width - t_old:width] = a[:, :, :t_old]
        out[cache.batch:, :, width - t_new:width] = b[:, :, :t_new]
        return out

    keys = [merged(a, b) for a, b in zip(cache.keys, new.keys)]
    values = [merged(a, b) for a, b in zip(cache.values, new.values)]
    mask = cache.mask.new_zeros(rows, width + spare)
    mask[:cache.batch, width - t_old:width] = cache.mask[:, :t_old]
    mask[cache.batch:, width - t_new:width] = new.mask[:, :t_new]
    return StaticCache(keys, values, mask, width)


def select_static(cache: StaticCache, keep: list[int]) -> None:
    """Keep rows `keep` (in that order) and drop the leading columns no remaining row attends to; in place.
    The trimmed buffers are views: their spare columns stay usable."""
    if len(keep) != cache.batch:
        rows = torch.tensor(keep, dtype=torch.long, device=cache.mask.device)
        cache.keys = [k.index_select(0, rows) for k in cache.keys]
        cache.values = [v.index_select(0, rows) for v in cache.values]
        cache.mask = cache.mask.index_select(0, rows)
    used = cache.mask[:, :cache.length].any(dim=0)
    start = int(used.float().argmax()) if bool(used.any()) else cache.length
    if start:
        cache.keys = [k[:, :, start:] for k in cache.keys]
        cache.values = [v[:, :, start:] for v in cache.values]
        cache.mask = cache.mask[:, start:]
        cache.length -= start
