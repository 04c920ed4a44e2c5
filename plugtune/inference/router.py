"""Routing: pick the adapter for each request (`adapters="auto"`), or the base when none fits.

A router scores a request against each of its adapters (inference/routers.py: one function per
kind) and abstains below a threshold:

    scores     (N, K) in [0, 1]: a trained kind's class probabilities p(adapter k | request) from a
               multinomial logistic regression over the K adapters plus a "base" class; arrow's
               mean |cos| between the request's layer inputs and each adapter's LoRA direction
    route      = argmax_k scores if max_k scores > threshold else the base

The threshold is calibrated on general chat the router never trained on: the (1 - false_route_rate)
quantile of the best adapter score over chat questions (tasks/skills/confusable.py: `chat_prompts`
part "calibrate"), and at least 0.5 for trained kinds (the adapter must be likelier than everything
else). So at most about `false_route_rate` of everyday chat goes to an adapter. The "base" class is
fitted on negatives: by default the shipped general-chat "fit" part and the confusable requests
(dates, prices and measurements mentioned without asking for a conversion). An empty request goes
to the base.

Saved as router.safetensors + router.json: the kind, the adapters it routes to, the base model's
fingerprint, the threshold and how it was calibrated. Loading it where other adapters are loaded is
an error naming both lists. Routers saved before kinds existed (no "kind": a hidden-state classifier
with per-adapter centroid thresholds) still load and route as they did.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from plugtune.adapters.io import AdapterMismatchError, base_fingerprint
from plugtune.inference.routers import (KINDS, TRAINED_KINDS, arrow_prototypes, arrow_scores, hidden_features,
                                        last_user_text, request_features)
from plugtune.models.loading import read_safetensors
from plugtune.tasks.skills.confusable import chat_prompts, confusable_prompts

TENSORS, META = "router.safetensors", "router.json"
DEFAULT_KIND = "minilm"  # the best on held-out wordings: README "Skills on one base", bench/routing.py
LEGACY = "hidden-centroid"  # routers saved before kinds existed
HOW_TO_MAKE = ("a multi-task run (plugtune train with an `adapters:` section, or plugtune demo --skills) writes one "
               "to OUTPUT/adapters/router; or fit one with plugtune.inference.router.fit_router(model, tokenizer, "
               "{adapter: its training prompts}) and save it with .save(DIR)")
prompt_features = hidden_features  # the hidden kind's features (the name routers had before kinds)


class RouterMismatchError(AdapterMismatchError):
    """A router built for other adapters (or another base) than the ones loaded."""


@dataclass
class Router:
    kind: str  # one of routers.KINDS, or LEGACY
    adapters: list[str]  # score column k -> adapter name
    tensors: dict[str, torch.Tensor]  # trained: weight (K[+1], C), bias; arrow: "arrow/<layer>" (K, in)
    threshold: float  # route only when the best adapter score is above it
    fingerprint: dict | None = None
    calibration: dict = field(default_factory=dict)  # how the threshold was chosen (for the record)

    def scores(self, model: nn.Module, tokenizer, prompts: list) -> torch.Tensor:
        """(N, K) score of each adapter for each prompt."""
        k = len(self.adapters)
        if self.kind == "arrow":
            protos = {n[len("arrow/"):]: t for n, t in self.tensors.items() if n.startswith("arrow/")}
            return arrow_scores(model, tokenizer, prompts, protos)
        feats = request_features("hidden" if self.kind == LEGACY else self.kind, model, tokenizer, prompts)
        probs = (feats @ self.tensors["weight"].T + self.tensors["bias"]).softmax(-1)[:, :k]  # drop "base"
        if self.kind == LEGACY:  # an adapter counts only near its centroid (cosine >= its own threshold)
            sims = feats @ self.tensors["centroids"].T  # (N, K)
            probs = probs * (sims >= self.tensors["thresholds"]).float()
        return probs

    def decide(self, scores: torch.Tensor) -> list[str | None]:
        best, choice = scores.max(-1)
        return [self.adapters[int(c)] if float(b) > self.threshold else None for b, c in zip(best, choice)]

    def route(self, model: nn.Module, tokenizer, prompts: list) -> list[str | None]:
        """An adapter name, or None (the base), per prompt. An empty request goes to the base."""
        keep = [i for i, p in enumerate(prompts) if last_user_text(p).strip()]
        out: list[str | None] = [None] * len(prompts)
        if keep:
            for i, name in zip(keep, self.decide(self.scores(model, tokenizer, [prompts[i] for i in keep]))):
                out[i] = name
        return out

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        save_file({n: t.contiguous() for n, t in self.tensors.items()}, str(path / TENSORS))
        (path / META).write_text(json.dumps({"kind": self.kind, "adapters": self.adapters, "threshold": self.threshold,
                                             "base_fingerprint": self.fingerprint, "calibration": self.calibration},
                                            indent=2))
        return path


def _logistic_regression(x: torch.Tensor, y: torch.Tensor, classes: int, l2: float = 1e-3,
                         steps: int = 200) -> tuple[torch.Tensor, torch.Tensor]:
    """Multinomial logistic regression (full-batch L-BFGS from zeros, L2 on the weights), each class
    weighted by 1/its size so a few prompts of one adapter count as much as many negatives."""
    w = torch.zeros(classes, x.shape[1], requires_grad=True)
    b = torch.zeros(classes, requires_grad=True)
    counts = torch.bincount(y, minlength=classes).clamp(min=1).float()
    class_weight = counts.sum() / (classes * counts)
    opt = torch.optim.LBFGS([w, b], max_iter=steps, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = nn.functional.cross_entropy(x @ w.T + b, y, weight=class_weight) + l2 * (w * w).sum()
        loss.backward()
        return loss

    opt.step(closure)
    return w.detach(), b.detach()


def fit_router(model: nn.Module, tokenizer, prompts_by_adapter: dict[str, list], kind: str = DEFAULT_KIND,
               negatives: list | None = None, calibration: list | None = None, shipped: bool = True,
               false_route_rate: float = 0.01) -> Router:
    """A router over the adapters in `prompts_by_adapter` (adapter -> its training prompts; arrow
    needs none and routes to every adapter named).

    negatives: prompts that belong to the base (the "base" class of trained kinds); calibration:
    general chat for the abstain threshold. `shipped` adds the shipped general-chat "fit" part and
    the confusable training prompts to the negatives, and calibrates on the chat "calibrate" part
    when `calibration` is not given (tasks/skills/confusable.py)."""
    if kind not in KINDS:
        raise ValueError(f"unknown router kind '{kind}' (kinds: {', '.join(KINDS)})")
    names = list(prompts_by_adapter) if kind == "arrow" else [n for n, ps in prompts_by_adapter.items() if ps]
    if not names:
        raise ValueError("a router needs at least one adapter" + ("" if kind == "arrow" else " with training prompts"))
    negatives = list(negatives or [])
    if shipped:
        negatives += chat_prompts("fit") + confusable_prompts("train")
        calibration = chat_prompts("calibrate") if calibration is None else calibration
    if kind == "arrow":
        tensors = {f"arrow/{layer}": v for layer, v in arrow_prototypes(model, names).items()}
        floor = 0.0
    else:
        groups = [prompts_by_adapter[n] for n in names] + ([negatives] if negatives else [])
        x = request_features(kind, model, tokenizer, [p for g in groups for p in g])
        y = torch.cat([torch.full((len(g),), k, dtype=torch.long) for k, g in enumerate(groups)])
        weight, bias = _logistic_regression(x, y, len(groups))
        tensors, floor = {"weight": weight, "bias": bias}, 0.5
    router = Router(kind, names, tensors, floor, base_fingerprint(model))
    router.threshold, router.calibration = _calibrate(router, model, tokenizer, calibration or [], floor,
                                                      false_route_rate, prompts_by_adapter)
    return router


def _calibrate(router: Router, model, tokenizer, chat: list, floor: float, rate: float,
               prompts_by_adapter: dict[str, list]) -> tuple[float, dict]:
    """threshold = max(floor, the (1 - rate) quantile of the best adapter score over `chat`): a chat
    prompt routes only when its score is above it, so at most `rate` of them do."""
    record = {"floor": floor, "false_route_rate": rate, "chat_prompts": len(chat)}
    threshold = floor
    if chat:
        best = router.scores(model, tokenizer, chat).max(-1).values
        quantile = float(torch.quantile(best, 1 - rate, interpolation="higher"))
        threshold = max(floor, quantile)
        record.update(chat_quantile=quantile, chat_routed=float((best > threshold).float().mean()))
    own = [(n, p) for n in router.adapters for p in prompts_by_adapter.get(n, [])]
    if own:  # the share of the adapters' own (training) prompts this threshold still routes right
        got = Router(router.kind, router.adapters, router.tensors, threshold).route(model, tokenizer, [p for _, p in own])
        record["train_prompts_routed_right"] = sum(g == n for g, (n, _) in zip(got, own)) / len(own)
    return threshold, record


def load_router(path: str | Path, model: nn.Module, known: list[str] | None = None, force: bool = False) -> Router:
    """The router saved in `path`, checked against the base model and (`known`) the loaded adapters."""
    path = Path(path)
    if not (path / META).is_file() or not (path / TENSORS).is_file():
        raise FileNotFoundError(f"{path} is not a router directory: it needs {META} and {TENSORS}. To make one: "
                                + HOW_TO_MAKE)
    meta = json.loads((path / META).read_text())
    tensors = read_safetensors(path / TENSORS, "Build the router again (multi-task training writes it)")
    kind = meta.get("kind", LEGACY)
    if kind not in (*KINDS, LEGACY):
        raise ValueError(f"the router in {path} is of kind '{kind}', which this plugtune does not know "
                         f"(kinds: {', '.join(KINDS)}); fit it again")
    if not force and meta.get("base_fingerprint") and meta["base_fingerprint"] != base_fingerprint(model):
        raise RouterMismatchError(f"the router in {path} was built on another base model; its scores would not "
                                  "mean anything here. Rebuild it on this base, or pass force=True")
    missing = [a for a in meta["adapters"] if known is not None and a not in known]
    if missing:
        raise RouterMismatchError(
            f"the router in {path} was built for adapters [{', '.join(meta['adapters'])}], but the loaded adapters are "
            f"[{', '.join(known or [])}] ({', '.join(missing)} missing). Load the adapters it was built for "
            "(--adapter NAME=DIR, lm.add_adapter), or make a router for these adapters: " + HOW_TO_MAKE)
    if kind == LEGACY:
        threshold = float(meta.get("min_prob", 0.5))
    else:
        threshold = float(meta["threshold"])
    return Router(kind, meta["adapters"], dict(tensors), threshold, meta.get("base_fingerprint"),
                  meta.get("calibration", {}))


def routing_report(router: Router, model: nn.Module, tokenizer, labelled: dict[str | None, list]) -> dict:
    """Routing accuracy per expected destination (an adapter name, or None for the base)."""
    report = {}
    for expected, prompts in labelled.items():
        got = router.route(model, tokenizer, prompts)
        report[expected or "base"] = {"prompts": len(prompts), "accuracy": sum(g == expected for g in got) / max(len(got), 1),
                                      "routed": {str(k): got.count(k) for k in dict.fromkeys(got)}}
    return report


__all__ = ["DEFAULT_KIND", "KINDS", "TRAINED_KINDS", "Router", "RouterMismatchError", "fit_router", "load_router",
           "prompt_features", "routing_report"]
