"""Padding-free packing: the examples of a micro-batch laid end to end, each example still computed
exactly as it would be alone.

What a micro-batch is does not change: the same `batch_size` examples in the same steps as without
packing (batching.batch_indices picks them), so the optimizer sees the same batches and the loss
the same normalisation (supervised tokens of the whole accumulated step). Only the layout changes:

    [ example a: positions 0..La-1 | example b: 0..Lb-1 | ... ]

Two layouts, chosen by `choose_layout` (data.packed_attention):
- flat ("varlen"): one row holding every example, no padding at all; attention runs per example
  (models/varlen.py: causal sdpa on each example's slice, located by where the positions restart).
  Used when the model's attention is transformers' sdpa, which it then replaces (same results
  elsewhere). The batch has the same keys as packed rows, so anything that reads one reads both.
- rows ("mask"): rows of at most max_length tokens, the rest of a row padded; transformers builds
  the block-diagonal causal mask itself: given `position_ids` and no 2-D attention mask,
  masking_utils.find_packed_sequence_indices starts a new sequence wherever the position does not
  grow by 1 (sdpa, eager, flex attention). Rows stay short because a block-diagonal mask does not
  make attention cheaper: sdpa on CPU computes all W x W scores of a row (one ~2,000-token row, as
  TRL's padding-free collator makes, gained only 1.24x in the issue's measurement). `pack_rows`
  picks the narrowest width that keeps the fewest rows (first-fit decreasing).

In both, three things make each example's forward and backward equal to its padded one (tests
assert it): position ids restart at 0 for each example (RoPE and absolute position embeddings
alike); attention never crosses an example; the first token of an example carries no label (it
would be predicted from the previous example's last token; in a padded batch labels[:, 0] is never
scored either). Padding, where there is any, ends a row, after every real token, so causal
attention never reads it. `unsupported` probes the model with the layout itself, so an
architecture or transformers version that does not honour it falls back instead of silently
leaking across examples.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from plugtune.data.batching import collate
from plugtune.data.tokenize import IGNORE_INDEX, Tokenized
from plugtune.models import varlen
from plugtune.models.causal_lm import batch_hidden, hidden_states

PACKABLE_ATTENTION = ("sdpa", "eager", "flex_attention", "flash_attention_2", "flash_attention_3", "plugtune_varlen")


def first_fit_decreasing(lengths: list[int], capacity: int) -> list[list[int]]:
    """Indices of `lengths` in bins of total <= capacity: longest first, each into the first bin
    it fits (Johnson 1973; at most 11/9 OPT + 6/9 bins)."""
    bins: list[list[int]] = []
    used: list[int] = []
    for i in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        r = next((r for r, u in enumerate(used) if u + lengths[i] <= capacity), None)
        if r is None:
            bins.append([])
            used.append(0)
            r = len(bins) - 1
        bins[r].append(i)
        used[r] += lengths[i]
    return bins


def pack_rows(lengths: list[int], max_length: int) -> list[list[int]]:
    """Rows of example indices, each row's total <= max_length, minimising rows x width (the
    positions the model computes). For each row count R from the fewest possible up, the narrowest
    width that first-fit decreasing fits into R rows is found by bisection."""
    longest, total = max(lengths), sum(lengths)
    if longest > max_length:
        raise ValueError(f"an example of {longest} tokens does not fit in a row of max_length {max_length}")
    fewest = len(first_fit_decreasing(lengths, max_length))
    best: tuple[int, int, list[list[int]]] | None = None  # (positions, width, rows)
    for n_rows in range(fewest, fewest + 3):
        lo, hi = max(longest, math.ceil(total / n_rows)), max_length  # hi always fits in <= fewest rows
        while lo < hi:
            mid = (lo + hi) // 2
            if len(first_fit_decreasing(lengths, mid)) <= n_rows:
                hi = mid
            else:
                lo = mid + 1
        rows = first_fit_decreasing(lengths, lo)
        width = max(sum(lengths[i] for i in row) for row in rows)
        key = (len(rows) * width, width)
        if best is None or key < best[:2]:
            best = (*key, rows)
        if lo == longest:  # narrower is impossible: more rows cannot help
            break
    return best[2]


def collate_packed(items: list[Tokenized], pad_id: int, max_length: int, flat: bool = False) -> dict[str, torch.Tensor]:
    """Pack `items`: input_ids, position_ids, labels, all (R, W), no attention_mask; with `flat`, one
    row (R = 1, W = all tokens, no padding)."""
    lengths = [len(it.input_ids) for it in items]
    rows = [list(range(len(items)))] if flat else pack_rows(lengths, max_length)
    width = max(sum(lengths[i] for i in row) for row in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
    positions = torch.zeros((len(rows), width), dtype=torch.long)
    for r, row in enumerate(rows):
        at = 0
        for i in row:
            n = lengths[i]
            ids[r, at:at + n] = torch.tensor(items[i].input_ids)
            labels[r, at + 1:at + n] = torch.tensor(items[i].labels[1:])  # the first token: no label (see above)
            positions[r, at:at + n] = torch.arange(n)
            at += n
        positions[r, at:] = torch.arange(width - at)  # padding: a sequence of its own, after every real token
    return {"input_ids": ids, "position_ids": positions, "labels": labels}


@torch.no_grad()
def unsupported(model: nn.Module, flat: bool = False) -> str | None:
    """Why `model` cannot train on packed batches of this layout, or None when it can.

    Besides the static checks, a probe packs two short sequences (in one row when `flat`; else in two
    rows, in both orders, as multi-row batches must work too) and compares their hidden states with
    each sequence run alone: a backbone that ignores position_ids, builds its own mask, or treats a
    multi-row batch differently shows up as a difference, whatever the architecture or version."""
    if any(callable(getattr(m, "virtual_inputs", None)) for m in model.modules()):
        return ("prompt and prefix tuning put virtual tokens before each sequence; a packed row would need them "
                "before every example")
    config = getattr(model, "config", None)
    impl = getattr(config, "_attn_implementation", None)
    if impl not in PACKABLE_ATTENTION:
        return f"attention implementation {impl!r} is not one that keeps packed examples apart"
    device = next(model.parameters()).device
    vocab = getattr(config, "vocab_size", 2)
    first, second = torch.arange(3, device=device) % vocab, (torch.arange(5, device=device) + 3) % vocab
    items = [Tokenized(first.tolist(), first.tolist()), Tokenized(second.tolist(), second.tolist())]
    was_training = model.training
    model.eval()
    try:
        if flat:
            batch = {k: v.to(device) for k, v in collate_packed(items, 0, 8, flat=True).items()}
            packed = batch_hidden(model, batch)[0]  # (8, C)
            alone = torch.cat([hidden_states(model, x[None], torch.ones_like(x)[None])[0] for x in (first, second)])
        else:
            ids = torch.stack([torch.cat([first, second]), torch.cat([second, first])])  # (2, 8)
            positions = torch.tensor([[0, 1, 2, 0, 1, 2, 3, 4], [0, 1, 2, 3, 4, 0, 1, 2]], device=device)
            packed = hidden_states(model, ids, None, position_ids=positions).flatten(0, 1)  # (16, C)
            a, b = (hidden_states(model, x[None], torch.ones_like(x)[None])[0] for x in (first, second))
            alone = torch.cat([a, b, b, a])
    except (TypeError, ValueError, RuntimeError) as exc:
        return f"the model rejects packed inputs ({type(exc).__name__}: {exc})"
    finally:
        model.train(was_training)
    error = float((packed.float() - alone.float()).abs().max() / alone.float().abs().max().clamp(min=1e-6))
    if error > (1e-3 if packed.dtype == torch.float32 else 5e-2):
        return (f"its attention crosses example boundaries in a packed batch (relative difference {error:.2g} from "
                "the examples alone): this architecture or transformers version does not keep them apart")
    return None


@dataclass(frozen=True)
class Layout:
    """How micro-batches are laid out (the examples in them are chosen elsewhere)."""

    pack: bool
    flat: bool = False  # packed into one row with per-example attention (else rows under a block-diagonal mask)
    group: bool = False  # padded batches grouped by length (batching.grouped_batch_indices)
    note: str = ""

    def collate(self, items: list[Tokenized], pad_id: int, max_length: int) -> dict[str, torch.Tensor]:
        return collate_packed(items, pad_id, max_length, self.flat) if self.pack else collate(items, pad_id)


def on_gpu(model: nn.Module) -> bool:
    return next(model.parameters()).device.type == "cuda"


def choose_layout(packing: bool | str, group_by_length: bool | str, model: nn.Module,
                  packed_attention: str = "auto") -> Layout:
    """The layout for data.packing, data.group_by_length (true, false or "auto") and
    data.packed_attention (auto | varlen | mask). Auto packs where it is exact (see `unsupported`)
    on CPU, unless group_by_length is set to true, preferring one row with per-example attention
    (models/varlen.py, replacing sdpa) to rows under a block-diagonal mask; auto grouping is on
    whenever there is no packing."""
    group = group_by_length is not False
    padded = "padded batches" + (", grouped by length" if group else "")
    if packing is False or (packing == "auto" and group_by_length is True):
        return Layout(False, group=group, note=padded)
    if packing == "auto" and on_gpu(model):
        # Padding costs little on a GPU and kernel launches a lot: per-example attention made a LoRA
        # step slower than padded batches on an H100 (236 vs 162 ms, bench/cuda_check.py).
        return Layout(False, group=group, note=f"{padded} (not packed: on a GPU padded batches are faster; "
                                               "data.packing=true packs anyway)")
    reasons = []
    if packed_attention in ("auto", "varlen"):
        previous = getattr(model.config, "_attn_implementation", None)
        if previous in ("sdpa", varlen.NAME):
            try:
                varlen.switch(model, varlen.NAME)
            except (ImportError, AttributeError, ValueError) as exc:  # an older transformers
                reasons.append(f"variable-length attention cannot be registered ({exc})")
            else:
                reason = unsupported(model, flat=True)
                if reason is None:
                    return Layout(True, flat=True, note="packed: one row per micro-batch, attention within each "
                                                        f"example ({varlen.NAME})")
                varlen.switch(model, previous)
                reasons.append(reason)
        else:
            reasons.append(f"variable-length attention stands in for sdpa, and the model's attention is {previous!r}")
    if packed_attention in ("auto", "mask"):
        reason = unsupported(model, flat=False)
        if reason is None:
            return Layout(True, note="packed rows of at most max_length tokens, block-diagonal attention mask")
        reasons.append(reason)
    if packing is True:
        raise ValueError(f"data.packing=true, but {'; '.join(dict.fromkeys(reasons))}. Set data.packing=false "
                         "(batches are then grouped by length).")
    return Layout(False, group=group, note=f"{padded} (not packed: {'; '.join(dict.fromkeys(reasons))})")
