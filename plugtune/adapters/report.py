"""Trade-offs in numbers: for each adapter method on a model, trainable parameters, % of the base,
and the extra forward latency unmerged vs merged (where the method can merge).

    plugtune adapters info --model smollm2-135m
"""
from __future__ import annotations

import copy
import statistics
import time
from dataclasses import dataclass

import torch
from torch import nn

from plugtune.adapters.io import attach_adapter
from plugtune.adapters.layers import merge_adapters, unmerge_adapters
from plugtune.adapters.registry import available_methods, get_method
from plugtune.models.causal_lm import hidden_states, lm_head



def default_variants() -> dict[str, tuple[str, dict]]:
    """Each registered method's representative settings (AdapterMethod.examples)."""
    return {label: (name, dict(cfg)) for name in available_methods()
            for label, cfg in get_method(name).examples.items()}


@dataclass
class MethodCost:
    variant: str
    method: str
    trainable_params: int
    pct_of_base: float
    base_ms: float
    unmerged_ms: float
    merged_ms: float | None  # None: the method cannot be merged

    @property
    def unmerged_overhead(self) -> float:
        return self.unmerged_ms / self.base_ms - 1


@torch.no_grad()
def forward_ms(model: nn.Module, ids: torch.Tensor, repeats: int) -> float:
    """Median wall time of one forward (backbone + LM head on the last position)."""
    mask = torch.ones_like(ids)
    times = []
    for i in range(repeats + 1):
        t0 = time.perf_counter()
        h = hidden_states(model, ids, mask)
        lm_head(model)(h[:, -1])
        if i:  # the first run warms up
            times.append(time.perf_counter() - t0)
    return 1000 * statistics.median(times)


def method_costs(base: nn.Module, variants: dict[str, tuple[str, dict]] | None = None, batch: int = 4,
                 seq_len: int = 64, repeats: int = 5) -> list[MethodCost]:
    base.eval()
    variants = variants or default_variants()
    n_base = sum(p.numel() for p in {id(p): p for p in base.parameters()}.values())
    ids = torch.randint(0, base.config.vocab_size, (batch, seq_len), device=next(base.parameters()).device)
    base_ms = forward_ms(base, ids, repeats)
    rows = []
    for variant, (method, cfg) in variants.items():
        model = copy.deepcopy(base)
        attach_adapter(model, method, cfg, trainable=True)
        model.eval()
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        unmerged = forward_ms(model, ids, repeats)
        merged = None
        if get_method(method).can_merge:
            merge_adapters(model)
            merged = forward_ms(model, ids, repeats)
            unmerge_adapters(model)
        rows.append(MethodCost(variant, method, trainable, 100 * trainable / n_base, base_ms, unmerged, merged))
        del model
    return rows


def format_costs(rows: list[MethodCost], title: str) -> str:
    lines = [title, f"{'method':<24} {'trainable':>11} {'% base':>8} {'unmerged ms':>12} {'(+%)':>7} {'merged ms':>10}"]
    for r in rows:
        merged = f"{r.merged_ms:10.1f}" if r.merged_ms is not None else f"{'n/a':>10}"
        lines.append(f"{r.variant:<24} {r.trainable_params:>11,} {r.pct_of_base:>7.3f}% {r.unmerged_ms:>12.1f} "
                     f"{100 * r.unmerged_overhead:>+6.0f}% {merged}")
    lines.append(f"{'(base model)':<24} {'':>11} {'':>8} {rows[0].base_ms:>12.1f}" if rows else "")
    return "\n".join(lines)
