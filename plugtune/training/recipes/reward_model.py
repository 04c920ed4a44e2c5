"""Reward-model training: a scalar head on the last non-padding token of prompt + completion,
trained on preference pairs with the Bradley–Terry loss −log σ(r_c − r_r − m) (+ TRL's optional
centring c (r_c + r_r)², Eisenstein et al. 2023), with an adapter or fully, through the one loop.
The trained model is written in the format inference/reward_model.py reads and scores with.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import nn

from plugtune.data.preference import collate_pairs
from plugtune.inference.reward_model import save_reward_model
from plugtune.models.heads import attach_head
from plugtune.models.loading import LoadedModel, load_tokenizer
from plugtune.training.compute.losses.preference import bradley_terry_loss
from plugtune.training.compute.prompt_trees import plan, tree_hidden
from plugtune.training.recipes.common import Setup, pair_batches, pair_source, prepare_model, read_pairs

if TYPE_CHECKING:
    from plugtune.training.config import RunConfig

HEAD = "reward_head"  # the head's module name on the model while it trains


@dataclass
class RewardConfig:
    """The `reward:` section."""

    center_rewards_coefficient: float = 0.0  # TRL's reward centring: + c * (r_c + r_r)^2 (Eisenstein et al. 2023)
    head_init_std: float = 0.0  # 0: 1/sqrt(hidden + 1), as TRL initialises its score head


def check_config(cfg: RunConfig) -> None:
    """Nothing beyond the section's types: any coefficient and init scale is valid."""


class RewardObjective:
    """Bradley–Terry on pair batches: one forward scores the 2B rows (shared prompts once); units = pairs."""

    def __init__(self, cfg: RewardConfig, head: str = HEAD, share_prefixes: bool = True):
        self.cfg, self.head, self.share_prefixes = cfg, head, share_prefixes

    def units(self, batch: dict) -> int:
        return batch["input_ids"].shape[0] // 2

    def scores(self, model: nn.Module, batch: dict) -> torch.Tensor:
        """(2B,) reward of every row: the head at its last non-padding token."""
        hidden = tree_hidden(model, batch, plan(model, batch, self.share_prefixes))
        return getattr(model, self.head)(hidden.last(batch["attention_mask"])).float()

    def __call__(self, model: nn.Module, batch: dict) -> tuple[torch.Tensor, dict]:
        b = self.units(batch)
        r = self.scores(model, batch)
        losses, metrics = bradley_terry_loss(r[:b], r[b:], batch.get("margin"), self.cfg.center_rewards_coefficient)
        return losses.sum(), metrics


def prepare(cfg: RunConfig, loaded: LoadedModel | None = None) -> Setup:
    tok = loaded.tokenizer if loaded is not None else load_tokenizer(cfg.model.name)
    train_items, summary = read_pairs(cfg.data.train, tok, cfg)  # bad data fails before the model loads
    print(f"[plugtune] train pairs: {summary}")
    eval_batches = None
    if cfg.data.eval:
        eval_items, eval_summary = read_pairs(cfg.data.eval, tok, cfg, limit=cfg.data.eval_limit)
        print(f"[plugtune] eval pairs: {eval_summary}")
        eval_batches = pair_batches(eval_items, cfg.training.batch_size, collate_pairs, tok.pad_token_id)
    torch.manual_seed(cfg.training.seed)  # adapter and head initialisation are part of the run's randomness
    loaded = prepare_model(cfg, loaded)
    attach_head(loaded.model, HEAD, cfg.reward.head_init_std)  # trainable, fp32, in every checkpoint
    head = getattr(loaded.model, HEAD)
    return Setup(loaded, pair_source(train_items, cfg, collate_pairs, tok.pad_token_id),
                 lambda out: save_reward_model(loaded, head, out / "reward_model", cfg.method, cfg.model.name),
                 RewardObjective(cfg.reward),
                 eval_batches=eval_batches, summary=summary)
