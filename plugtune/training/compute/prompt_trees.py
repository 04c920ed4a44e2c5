"""Prompt trees: one forward over rows that share a prompt (a preference pair's chosen and rejected
answers, GRPO's and PPO's samples of one prompt), each shared prompt run once.

`collate_pairs` gives a right-padded (2B, T) batch whose rows i and B+i are the chosen and the
rejected sequence of pair i; both start with the same prompt tokens. Run as they are, every prompt
goes through the model twice, and padding every row to the longest adds more: on the benchmark
pairs (4 pairs a step, prompts median 74 tokens, replies median 15) 1,570 token positions a step,
of which 888 are real and only 529 distinct. Here each pair becomes one tree, laid out in one row,

    [ common prefix | rest of chosen | rest of rejected ]      positions 0..S-1 | S..Lc-1 | S..Lr-1

with an attention mask that lets the chosen rest see the prefix and itself (causally) and the
rejected rest see the prefix and itself, never the other branch (the tree attention of speculative
decoding, SpecInfer, Miao et al. 2024, sec. 4.2; for preference pairs, Wang et al. 2024, "Accelerating
Direct Preference Optimization with Prefix Sharing"). Trees are packed first-fit-decreasing into
rows of at most max(longest tree, `capacity`) tokens; the mask is block-diagonal between trees.

Why it is exact: under causal attention a token's hidden state depends only on the tokens before
it in its own sequence, and each token keeps its own position id, so every real position of the
(2B, T) batch gets the hidden state it gets in the padded forward (tests assert it). The backward
adds the gradients of both branches at the shared prefix, as the chain rule wants.

The same holds for any group of rows that share a prefix (`pack_trees`): GRPO's and PPO's samples of
one prompt (`prompt_groups`) make a tree of one prompt and G completions (logprobs.token_logps).

Used when the model takes a 4-D mask (attention implementation "sdpa" or "eager", no sliding window)
and no adapter adds virtual inputs (prompt/prefix tuning); otherwise `tree_hidden` runs the plain
padded batch (`plan` returns None). `completion_logps` reads the labelled tokens' log-probs off the
result, through the same chunked LM head as every objective (logprobs.labelled_logps).
The result has the same form either way: hidden states addressable by (row, position) of the batch.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from plugtune.data.packing import first_fit_decreasing
from plugtune.data.tokenize import IGNORE_INDEX
from plugtune.models.causal_lm import hidden_states, lm_head
from plugtune.training.compute.logprobs import CHUNK, labelled_logps

PACKABLE_ATTENTION = ("sdpa", "eager")


@dataclass
class PromptTrees:
    input_ids: torch.Tensor  # (R, L) packed rows of trees
    position_ids: torch.Tensor  # (R, L) each token's position in its own sequence
    allowed: torch.Tensor  # (R, L, L) bool: query l may attend to key l'
    index: torch.Tensor  # (2B, T) flat index into (R*L) of each batch position; R*L for padding

    def to(self, device: torch.device) -> PromptTrees:
        return PromptTrees(*(t.to(device) for t in (self.input_ids, self.position_ids, self.allowed, self.index)))


def pack_pairs(input_ids: torch.Tensor, attention_mask: torch.Tensor, capacity: int = 1024) -> PromptTrees:
    """Lay out a right-padded (2B, T) pair batch as prefix-sharing trees packed into rows (CPU work)."""
    n_rows = input_ids.shape[0]
    b = n_rows // 2
    if n_rows != 2 * b or b == 0:
        raise ValueError(f"a pair batch has an even, non-zero number of rows (chosen then rejected), got {n_rows}")
    return pack_trees(input_ids, attention_mask, [[i, b + i] for i in range(b)], capacity)


def prompt_groups(input_ids: torch.Tensor, labels: torch.Tensor) -> list[list[int]]:
    """Rows whose tokens before their first label are the same (one prompt, several sampled
    completions: GRPO's group, PPO's samples), in order of first appearance."""
    ids, labelled = input_ids.cpu(), labels.cpu() != IGNORE_INDEX
    starts = torch.where(labelled.any(-1), labelled.int().argmax(-1), labelled.shape[1]).tolist()  # first label
    groups: dict[tuple[int, ...], list[int]] = {}
    for row, start in enumerate(starts):
        groups.setdefault(tuple(ids[row, :start].tolist()), []).append(row)
    return list(groups.values())


def pack_trees(input_ids: torch.Tensor, attention_mask: torch.Tensor, groups: list[list[int]],
               capacity: int = 1024) -> PromptTrees:
    """Lay out a right-padded (N, T) batch as one tree per group of rows (CPU work): the group's
    longest common prefix once, then each row's rest, each rest seeing the prefix and itself only.
    A pair batch is groups [[i, B + i]]; GRPO's G samples of a prompt are one group of G rows."""
    ids, mask = input_ids.cpu(), attention_mask.cpu().bool()
    n_rows, width = ids.shape
    row_lengths = mask.sum(-1)
    lengths = row_lengths.tolist()
    if n_rows == 0 or sorted(r for g in groups for r in g) != list(range(n_rows)):
        raise ValueError(f"groups must cover each of the {n_rows} rows exactly once, got {groups}")
    if not torch.equal(mask, torch.arange(width) < row_lengths[:, None]):
        raise ValueError("shared-prefix batches must be right-padded (collate_pairs): real tokens first in every row")
    shared = []  # per group: tokens that all its rows share at the start
    for g in groups:
        first = ids[g[0]]
        same = (ids[g] == first) & mask[g] & mask[g[0]]  # (len(g), T)
        shared.append(int(same.long().cumprod(-1).sum(-1).min()))
    sizes = [lengths[g[0]] + sum(lengths[r] - s for r in g[1:]) for g, s in zip(groups, shared)]
    bins = first_fit_decreasing(sizes, max(max(sizes), capacity))  # bins[r] = the trees in packed row r
    used = [sum(sizes[t] for t in trees) for trees in bins]
    n_packed, length = len(bins), max(used)
    packed = torch.zeros(n_packed, length, dtype=ids.dtype)
    position = torch.zeros(n_packed, length, dtype=torch.long)
    tree = torch.full((n_packed, length), -1, dtype=torch.long)  # -1: padding
    branch = torch.zeros(n_packed, length, dtype=torch.long)  # 0 shared prefix, k + 1 the rest of the group's row k
    index = torch.full((n_rows, width), n_packed * length, dtype=torch.long)
    for r, trees in enumerate(bins):
        at = 0
        for t in trees:
            s, base = shared[t], r * length + at
            for k, row in enumerate(groups[t]):
                n = lengths[row]
                lo = 0 if k == 0 else s  # the first row lays out the prefix; the others only their rest
                packed[r, at:at + n - lo] = ids[row, lo:n]
                position[r, at:at + n - lo] = torch.arange(lo, n)
                tree[r, at:at + n - lo] = t
                branch[r, at + s - lo:at + n - lo] = k + 1
                index[row, :s] = base + torch.arange(s)
                index[row, s:n] = r * length + at + s - lo + torch.arange(n - s)
                at += n - lo
    q, k = torch.arange(length)[:, None], torch.arange(length)[None, :]
    same_tree = tree[:, :, None] == tree[:, None, :]  # padding sees padding (never a fully masked row)
    same_branch = (branch[:, None, :] == 0) | (branch[:, None, :] == branch[:, :, None])
    allowed = same_tree & same_branch & (k <= q)  # (R, L, L)
    return PromptTrees(packed, position, allowed, index)


def can_share_prefixes(model: nn.Module) -> bool:
    """A 4-D mask reaches the attention as given, no adapter prepends virtual tokens, and no layer
    would have built a sliding-window mask of its own (a given 4-D mask replaces it)."""
    config = getattr(model, "config", None)
    sliding = getattr(config, "sliding_window", None) and getattr(config, "use_sliding_window", True)
    return (getattr(config, "_attn_implementation", None) in PACKABLE_ATTENTION and not sliding
            and not any(callable(getattr(m, "virtual_inputs", None)) for m in model.modules()))


@dataclass
class TreeHidden:
    """Final hidden states of a (2B, T) pair batch, addressed by batch (row, position)."""

    flat: torch.Tensor  # (N + 1, C); the last row is zeros (what padding positions read)
    index: torch.Tensor  # (2B, T) row of `flat` holding each batch position

    def at(self, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:  # (n,), (n,) -> (n, C)
        return self.flat[self.index[rows, cols]]

    def last(self, attention_mask: torch.Tensor) -> torch.Tensor:  # (2B, C): each row's last real token
        rows = torch.arange(attention_mask.shape[0], device=attention_mask.device)
        return self.at(rows, attention_mask.sum(-1).clamp(min=1) - 1)


def plan(model: nn.Module, batch: dict, share_prefixes: bool = True, capacity: int = 1024) -> PromptTrees | None:
    """The packed layout for `batch`, or None when the padded batch must run as it is."""
    if not (share_prefixes and can_share_prefixes(model)):
        return None
    return pack_pairs(batch["input_ids"], batch["attention_mask"], capacity).to(batch["input_ids"].device)


def tree_hidden(model: nn.Module, batch: dict, packed: PromptTrees | None) -> TreeHidden:
    """One forward of `model` over the pairs of `batch` (packed trees, or the padded batch if None)."""
    if packed is None:
        hidden = hidden_states(model, batch["input_ids"], batch["attention_mask"])  # (2B, T, C)
        index = torch.arange(hidden.shape[0] * hidden.shape[1], device=hidden.device).view(hidden.shape[:2])
        index = index.masked_fill(batch["attention_mask"] == 0, index.numel())
    else:
        dtype = next(model.parameters()).dtype
        mask = packed.allowed[:, None]  # (R, 1, L, L)
        if model.config._attn_implementation == "eager":  # eager adds the mask to the scores
            mask = torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(~mask, torch.finfo(dtype).min)
        hidden = hidden_states(model, packed.input_ids, mask, position_ids=packed.position_ids)  # (R, L, C)
        index = packed.index
    flat = hidden.reshape(-1, hidden.shape[-1])
    return TreeHidden(torch.cat([flat, flat.new_zeros(1, flat.shape[-1])]), index)


def completion_logps(model: nn.Module, hidden: TreeHidden, labels: torch.Tensor,
                     chunk: int = CHUNK) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token log-probs of the labelled tokens: ((N, T-1) values, 0 elsewhere; (N, T-1) mask). The LM
    head runs only at the labelled positions, through logprobs.labelled_logps (chunked, float32)."""
    targets = labels[:, 1:]  # (N, T-1): token t+1 is predicted at position t
    mask = targets != IGNORE_INDEX
    rows, cols = mask.nonzero(as_tuple=True)  # (n,), (n,)
    values = labelled_logps(lm_head(model), hidden.at(rows, cols), targets[rows, cols], chunk)  # (n,)
    per_token = torch.zeros(mask.shape, dtype=torch.float32, device=labels.device).index_put((rows, cols), values)
    return per_token, mask
