"""Routing: pick the adapter for each request (`adapters="auto"`), or the base when none fits.

Built from each adapter's own training prompts. A request is embedded by the *base* model
(adapters switched off, so the features do not depend on which adapters are loaded): the final
hidden states, mean-pooled over the tokens of its last user message and L2-normalised.

    choice     = argmax softmax(W z + b)                 multinomial logistic regression over adapters
    confidence = p(choice)  and  cos(z, centroid_choice)
    route      = choice if p >= min_prob and cos >= threshold_choice else the base

The similarity threshold is what sends out-of-skill prompts (general chat) to the base: a
softmax over known skills is confident even far from all of them, a centroid similarity is not.
Each adapter's threshold is a low quantile of its own training prompts' similarities, minus a
margin (`fit_router(quantile=, margin=)`).

Saved beside the pool as router.safetensors + router.json, with the base model's fingerprint.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from plugtune.adapters.io import AdapterMismatchError, base_fingerprint
from plugtune.adapters.layers import adapters_disabled
from plugtune.data.templates import render
from plugtune.data.tokenize import prompt_ids
from plugtune.models.causal_lm import hidden_states
from plugtune.models.loading import read_safetensors

TENSORS, META = "router.safetensors", "router.json"


def _messages(prompt) -> list[dict]:
    return [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)


@torch.no_grad()
def prompt_features(model: nn.Module, tokenizer, prompts: list, batch_size: int = 32) -> torch.Tensor:
    """(N, C) unit vectors: the base model's final hidden states averaged over each prompt's last
    user message (its tokens located by character offsets in the rendered chat prompt)."""
    was_training = model.training
    model.eval()
    rows, spans = [], []
    for p in prompts:
        messages = _messages(p)
        ids = prompt_ids(tokenizer, messages)
        text = render(tokenizer, messages, add_generation_prompt=True)
        content = next((m["content"] for m in reversed(messages) if m["role"] == "user"), "")
        start = text.rfind(content) if content else -1
        enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        if enc["input_ids"] == ids and start >= 0:
            inside = [i for i, (a, b) in enumerate(enc["offset_mapping"]) if b > start and a < start + len(content)]
        else:
            inside = []
        rows.append(ids)
        spans.append(inside or list(range(len(ids))))  # fallback: the whole prompt
    device = next(model.parameters()).device
    out = []
    with adapters_disabled(model):
        for i in range(0, len(rows), batch_size):
            chunk, chunk_spans = rows[i:i + batch_size], spans[i:i + batch_size]
            width = max(len(r) for r in chunk)
            ids = torch.zeros(len(chunk), width, dtype=torch.long)
            mask = torch.zeros_like(ids)
            pool = torch.zeros(len(chunk), width)
            for j, (r, sp) in enumerate(zip(chunk, chunk_spans)):
                ids[j, :len(r)] = torch.tensor(r)
                mask[j, :len(r)] = 1
                pool[j, sp] = 1.0 / len(sp)
            h = hidden_states(model, ids.to(device), mask.to(device)).float()  # (b, T, C)
            out.append(torch.einsum("bt,btc->bc", pool.to(device), h).cpu())
    model.train(was_training)
    return nn.functional.normalize(torch.cat(out), dim=-1)


@dataclass
class Router:
    adapters: list[str]  # class k -> adapter name
    weight: torch.Tensor  # (K, C) logistic regression
    bias: torch.Tensor  # (K,)
    centroids: torch.Tensor  # (K, C) unit vectors
    thresholds: torch.Tensor  # (K,) minimum cosine similarity to accept class k
    min_prob: float = 0.5
    fingerprint: dict | None = None

    def decide(self, features: torch.Tensor) -> tuple[list[str | None], torch.Tensor, torch.Tensor]:
        """Adapter (or None) per row of (N, C) features, with the probabilities and similarities."""
        probs = (features @ self.weight.T + self.bias).softmax(-1)  # (N, K)
        choice = probs.argmax(-1)
        p = probs.gather(1, choice[:, None]).squeeze(1)
        sim = (features * self.centroids[choice]).sum(-1)  # cosine: both are unit vectors
        ok = (p >= self.min_prob) & (sim >= self.thresholds[choice])
        return [self.adapters[int(c)] if bool(k) else None for c, k in zip(choice, ok)], p, sim

    def route(self, model: nn.Module, tokenizer, prompts: list) -> list[str | None]:
        if not prompts:
            return []
        return self.decide(prompt_features(model, tokenizer, prompts))[0]

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        save_file({"weight": self.weight.contiguous(), "bias": self.bias.contiguous(),
                   "centroids": self.centroids.contiguous(), "thresholds": self.thresholds.contiguous()},
                  str(path / TENSORS))
        (path / META).write_text(json.dumps({"adapters": self.adapters, "min_prob": self.min_prob,
                                             "base_fingerprint": self.fingerprint,
                                             "features": "base model, mean of last user message, L2-normalised"},
                                            indent=2))
        return path


def _logistic_regression(x: torch.Tensor, y: torch.Tensor, classes: int, l2: float = 1e-3,
                         steps: int = 200) -> tuple[torch.Tensor, torch.Tensor]:
    """Multinomial logistic regression (full-batch L-BFGS, L2 on the weights)."""
    w = torch.zeros(classes, x.shape[1], requires_grad=True)
    b = torch.zeros(classes, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], max_iter=steps, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = nn.functional.cross_entropy(x @ w.T + b, y) + l2 * (w * w).sum()
        loss.backward()
        return loss

    opt.step(closure)
    return w.detach(), b.detach()


def fit_router(model: nn.Module, tokenizer, prompts_by_adapter: dict[str, list], min_prob: float = 0.5,
               quantile: float = 0.01, margin: float = 0.02) -> Router:
    """A router over the adapters in `prompts_by_adapter` (adapter -> its training prompts)."""
    names = [n for n, ps in prompts_by_adapter.items() if ps]
    if not names:
        raise ValueError("a router needs training prompts for at least one adapter")
    feats = [prompt_features(model, tokenizer, prompts_by_adapter[n]) for n in names]
    x = torch.cat(feats)
    y = torch.cat([torch.full((len(f),), k, dtype=torch.long) for k, f in enumerate(feats)])
    if len(names) > 1:
        weight, bias = _logistic_regression(x, y, len(names))
    else:  # one adapter: only the similarity threshold decides
        weight, bias = torch.zeros(1, x.shape[1]), torch.zeros(1)
    centroids = nn.functional.normalize(torch.stack([f.mean(0) for f in feats]), dim=-1)
    thresholds = torch.stack([torch.quantile((f @ c), quantile) - margin for f, c in zip(feats, centroids)])
    return Router(names, weight, bias, centroids, thresholds, min_prob, base_fingerprint(model))


def load_router(path: str | Path, model: nn.Module, known: list[str] | None = None, force: bool = False) -> Router:
    path = Path(path)
    if not (path / META).is_file() or not (path / TENSORS).is_file():
        raise FileNotFoundError(f"{path} is not a router directory: it needs {META} and {TENSORS} "
                                "(written by plugtune train with an `adapters:` section, or Router.save)")
    meta = json.loads((path / META).read_text())
    tensors = read_safetensors(path / TENSORS, "Build the router again (multi-task training writes it)")
    if not force and meta.get("base_fingerprint") and meta["base_fingerprint"] != base_fingerprint(model):
        raise AdapterMismatchError(f"the router in {path} was built on another base model; its features would not "
                                   "mean anything here. Rebuild it on this base, or pass force=True")
    missing = [a for a in meta["adapters"] if known is not None and a not in known]
    if missing:
        raise KeyError(f"the router in {path} routes to adapters that are not loaded: {missing} "
                       f"(loaded: {', '.join(known or []) or 'none'}); load them first")
    return Router(meta["adapters"], tensors["weight"], tensors["bias"], tensors["centroids"], tensors["thresholds"],
                  float(meta.get("min_prob", 0.5)), meta.get("base_fingerprint"))


def routing_report(router: Router, model: nn.Module, tokenizer, labelled: dict[str | None, list]) -> dict:
    """Routing accuracy per expected destination (an adapter name, or None for the base)."""
    report = {}
    for expected, prompts in labelled.items():
        got = router.route(model, tokenizer, prompts)
        report[expected or "base"] = {"prompts": len(prompts), "accuracy": sum(g == expected for g in got) / max(len(got), 1),
                                      "routed": {str(k): got.count(k) for k in dict.fromkeys(got)}}
    return report
