"""The DPO family: sigmoid DPO, conservative DPO, IPO, and the reference-free SimPO and ORPO.

`PreferenceObjective` turns a (2B, T) pair batch (collate_pairs: rows 0..B-1 chosen, B..2B-1
rejected) into per-sequence log-probabilities and hands them to a loss strategy of
losses/preference.py, which never runs the model.

- One forward for the whole batch: chosen and rejected go through the model together, each
  pair's shared prompt once (training/compute/prompt_trees.py); the LM head runs only at completion tokens.
- The reference policy: with an adapter, the same network with adapters disabled (no second
  copy); continuing a previous stage's adapter (model.adapter), a frozen copy of that adapter on the
  same base;
  copy); with full fine-tuning, a frozen copy made before training. SimPO and ORPO need none.
  With `dpo.precompute_ref`, the reference log-probs of every pair are computed once before
  training and carried by the batches ("ref_logps", (2B,)), so no reference runs during training.
- Logged: rewards/chosen, rewards/rejected, rewards/margins, rewards/accuracies, logps/chosen,
  logps/rejected (from the loss), and `kl`: the k1 estimate Σ_t (log π − log π_ref) / |y_c| over the
  chosen completion's tokens, averaged over pairs. The tokens are the dataset's, not samples of π,
  so this is a per-token drift of the policy from the reference on the preferred answers rather
  than an unbiased KL(π‖π_ref); it starts at 0 and grows as training moves away from the reference.
"""
from __future__ import annotations

import contextlib
from dataclasses import asdict, dataclass, replace
from typing import TYPE_CHECKING

import torch
from torch import nn

from plugtune.adapters import adapter_names
from plugtune.data.preference import TokenizedPair, collate_pairs
from plugtune.models.loading import LoadedModel, autocast_dtype, load_tokenizer
from plugtune.schema import ConfigError
from plugtune.training.compute.losses.preference import PREFERENCE_LOSSES, PreferenceLogps
from plugtune.training.compute.prompt_trees import PromptTrees, completion_logps, plan, tree_hidden
from plugtune.training.compute.reference import as_reference, frozen_copy
from plugtune.training.recipes.common import (Setup, attach_reference, pair_batches, pair_source, prepare_model,
                                              read_pairs, save_policy)

if TYPE_CHECKING:
    from plugtune.training.config import RunConfig


@dataclass
class DPOConfig:
    """The `dpo:` section: the DPO family on preference pairs."""

    loss: str = "sigmoid"  # a name in PREFERENCE_LOSSES: sigmoid (DPO) | cdpo | ipo | simpo | orpo
    beta: float = 0.1
    label_smoothing: float = 0.0  # cdpo's epsilon
    simpo_gamma: float = 0.5  # SimPO's target margin (the paper's gamma)
    orpo_lambda: float = 0.1
    rpo_alpha: float = 0.0  # > 0: add alpha x the chosen answer's NLL per token (RPO, Pang et al. 2024; TRL's rpo_alpha)
    precompute_ref: bool = False  # compute the reference log-probs once before training and cache them
    max_prompt_length: int = 0  # 0: no separate prompt limit


def check_config(cfg: RunConfig) -> None:
    if cfg.dpo.loss not in PREFERENCE_LOSSES:
        raise ConfigError(f"dpo.loss={cfg.dpo.loss!r} is not one of {', '.join(PREFERENCE_LOSSES)}")

# dpo.loss -> the strategy's keyword arguments, read from DPOConfig. cdpo with label_smoothing 0
# takes ConservativeDPO's own default epsilon (0.1): asking for cDPO means asking for smoothing.
_LOSS_ARGS = {
    "sigmoid": lambda c: {"beta": c.beta, "label_smoothing": c.label_smoothing},
    "cdpo": lambda c: {"beta": c.beta, **({"label_smoothing": c.label_smoothing} if c.label_smoothing else {})},
    "ipo": lambda c: {"beta": c.beta},
    "simpo": lambda c: {"beta": c.beta, "gamma": c.simpo_gamma},
    "orpo": lambda c: {"lam": c.orpo_lambda},
}


def build_loss(cfg: DPOConfig):
    """The strategy object for `cfg.loss` (see losses/preference.py)."""
    if cfg.loss not in PREFERENCE_LOSSES:
        raise ValueError(f"dpo.loss={cfg.loss!r} is not one of {', '.join(PREFERENCE_LOSSES)}")
    return PREFERENCE_LOSSES[cfg.loss](**_LOSS_ARGS[cfg.loss](cfg))


def sequence_logps(model: nn.Module, batch: dict, packed: PromptTrees | None) -> tuple[torch.Tensor, torch.Tensor]:
    """(2B,) summed log-probs of each row's completion tokens and (2B,) their counts."""
    per_token, mask = completion_logps(model, tree_hidden(model, batch, packed), batch["labels"])
    return per_token.sum(-1), mask.sum(-1)


class PreferenceObjective:
    """DPO-family loss on pair batches; units = pairs, so the loop's step loss is the mean over pairs.

    `reference`: None uses the policy itself with adapters disabled (adapter training), or a frozen
    nn.Module (full fine-tuning); `reference_adapter` names a frozen adapter on the same model that is
    the reference instead (a run continuing a previous stage's adapter). A batch carrying "ref_logps"
    (2B,) uses those instead."""

    def __init__(self, cfg: DPOConfig, reference: nn.Module | None = None, share_prefixes: bool = True,
                 reference_adapter: str | None = None):
        self.cfg = cfg
        self.loss = build_loss(cfg)
        self.reference = reference
        self.reference_adapter = reference_adapter
        self.share_prefixes = share_prefixes

    def units(self, batch: dict) -> int:
        return batch["input_ids"].shape[0] // 2

    @torch.no_grad()
    def reference_logps(self, model: nn.Module, batch: dict, packed: PromptTrees | None = None) -> torch.Tensor:
        """(2B,) summed completion log-probs under the reference policy."""
        if self.reference is None and self.reference_adapter is None and not adapter_names(model):
            raise ValueError("DPO needs a reference policy: this model has no adapter to disable, so pass the frozen "
                             "copy as `reference` (full fine-tuning) or precompute the reference log-probs")
        with as_reference(model, self.reference, self.reference_adapter) as network:
            return sequence_logps(network, batch, packed)[0]

    def __call__(self, model: nn.Module, batch: dict) -> tuple[torch.Tensor, dict]:
        b = self.units(batch)
        packed = plan(model, batch, self.share_prefixes)
        logps, lengths = sequence_logps(model, batch, packed)  # (2B,), (2B,)
        # chosen_nll: ORPO's SFT term, the chosen completion's mean token NLL (the others ignore it)
        x = PreferenceLogps(chosen=logps[:b], rejected=logps[b:], chosen_lengths=lengths[:b],
                            rejected_lengths=lengths[b:], chosen_nll=-logps[:b] / lengths[:b].clamp(min=1))
        metrics = {}
        if self.loss.needs_reference:
            ref = batch.get("ref_logps")  # (2B,) cached before training, else computed now
            ref = ref.to(logps) if ref is not None else self.reference_logps(model, batch, packed)
            x = replace(x, ref_chosen=ref[:b], ref_rejected=ref[b:])
            per_token = (x.chosen.detach() - x.ref_chosen) / x.chosen_lengths.clamp(min=1)  # (B,) k1 per token
            metrics["kl"] = per_token.mean()
        losses, loss_metrics = self.loss(x)  # (B,)
        if self.cfg.rpo_alpha:  # RPO (Pang et al. 2024, eq. 2): + alpha x the chosen answer's mean token NLL
            losses = losses + self.cfg.rpo_alpha * x.chosen_nll
            metrics["nll/chosen"] = x.chosen_nll.detach().mean()
        return losses.sum(), {**loss_metrics, **metrics}


# ---------------------------------------------------------------- cached reference log-probs


@dataclass
class ReferencedPair(TokenizedPair):
    """A tokenized pair with its reference log-probs, computed once before training."""

    ref_chosen: float = 0.0
    ref_rejected: float = 0.0


def collate_referenced(items: list[TokenizedPair], pad_id: int) -> dict[str, torch.Tensor]:
    """collate_pairs, plus "ref_logps" (2B,) when the items carry reference log-probs."""
    batch = collate_pairs(items, pad_id)
    if items and all(isinstance(it, ReferencedPair) for it in items):
        batch["ref_logps"] = torch.tensor([it.ref_chosen for it in items] + [it.ref_rejected for it in items],
                                          dtype=torch.float32)
    return batch


@torch.no_grad()
def precompute_reference(objective: PreferenceObjective, model: nn.Module, items: list[TokenizedPair],
                         batch_size: int, pad_id: int, amp: torch.dtype | None = None) -> list[ReferencedPair]:
    """The reference log-probs of every pair (batched, no grad), stored on the items; float32 values
    kept exactly (a Python float holds a float32), so batches rebuilt on resume carry the same numbers."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    out: list[ReferencedPair] = []
    try:
        for start in range(0, len(items), batch_size):
            chunk = items[start:start + batch_size]
            batch = {k: v.to(device) for k, v in collate_pairs(chunk, pad_id).items()}
            with torch.autocast(device.type, dtype=amp) if amp is not None else contextlib.nullcontext():
                ref = objective.reference_logps(model, batch, plan(model, batch, objective.share_prefixes))
            values = ref.float().cpu().tolist()
            out += [ReferencedPair(**asdict(it), ref_chosen=values[k], ref_rejected=values[len(chunk) + k])
                    for k, it in enumerate(chunk)]
    finally:
        model.train(was_training)
    return out


# ---------------------------------------------------------------- setup for train()


def prepare(cfg: RunConfig, loaded: LoadedModel | None = None) -> Setup:
    tok = loaded.tokenizer if loaded is not None else load_tokenizer(cfg.model.name)
    max_prompt = cfg.dpo.max_prompt_length or None
    train_items, summary = read_pairs(cfg.data.train, tok, cfg, max_prompt)  # bad data fails before the model loads
    print(f"[plugtune] train pairs: {summary}")
    eval_items = None
    if cfg.data.eval:
        eval_items, eval_summary = read_pairs(cfg.data.eval, tok, cfg, max_prompt, cfg.data.eval_limit)
        print(f"[plugtune] eval pairs: {eval_summary}")
    torch.manual_seed(cfg.training.seed)  # adapter initialisation is part of the run's randomness
    loaded = prepare_model(cfg, loaded)
    model = loaded.model
    needs_reference = PREFERENCE_LOSSES[cfg.dpo.loss].needs_reference
    reference = frozen_copy(model) if needs_reference and cfg.method == "full" else None
    reference_adapter = attach_reference(cfg, loaded) if needs_reference else None
    objective = PreferenceObjective(cfg.dpo, reference, reference_adapter=reference_adapter)
    pad = tok.pad_token_id
    if needs_reference and cfg.dpo.precompute_ref:
        device = next(model.parameters()).device
        amp = autocast_dtype(cfg.model.dtype, device)
        bs = cfg.training.batch_size
        train_items = precompute_reference(objective, model, train_items, bs, pad, amp)
        if eval_items:
            eval_items = precompute_reference(objective, model, eval_items, bs, pad, amp)
        objective.reference = None  # the cache replaces it: the full-fine-tuning copy is freed
        print(f"[plugtune] reference log-probs precomputed for {len(train_items)} train pairs")
    eval_batches = pair_batches(eval_items, cfg.training.batch_size, collate_referenced, pad) if eval_items else None
    return Setup(loaded, pair_source(train_items, cfg, collate_referenced, pad),
                 lambda out: save_policy(cfg, loaded, out), objective, eval_batches=eval_batches, summary=summary)
