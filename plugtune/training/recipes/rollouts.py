"""Rollouts for PPO and GRPO: sample completions from the policy (KV-cache generation), score them,
and serve the optimisation passes over them as the loop's steps.

One rollout batch = `prompts_per_step` prompts x `samples_per_prompt` completions. It feeds
`epochs x minibatches` optimizer steps: step s belongs to rollout s // (epochs x minibatches), and
within it to pass e, minibatch m (a seeded permutation per pass). The buffer is part of the
source's state_dict, so a run resumed mid-rollout continues on the very same samples; a new rollout
draws its prompts from a seeded epoch order and samples with a generator seeded by its index, so
it does not depend on anything a crash could have changed.

What is computed per rollout (no grad) is the algorithm's business (`prepare`: PPO's values,
rewards and GAE; GRPO's group advantages); the source only generates, scores and batches.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable

import torch
from torch import nn

from plugtune.adapters.layers import set_active_adapters
from plugtune.data.batching import epoch_order
from plugtune.data.preference import PromptItem, load_prompts
from plugtune.data.tokenize import IGNORE_INDEX
from plugtune.inference.generate import GenerationConfig, generate_ids, stop_token_ids
from plugtune.inference.reward_model import load_reward_model
from plugtune.inference.verifiers import checked_scores, resolve_reward_function
from plugtune.models.loading import load_base
from plugtune.schema import ConfigError
from plugtune.training.compute.reference import Reference
from plugtune.training.engine.types import ParamGroup
from plugtune.training.recipes.common import Setup, attach_reference, prepare_model, save_policy

if TYPE_CHECKING:
    from plugtune.training.config import RunConfig
    from plugtune.training.engine.distributed import Distributed


@dataclass
class RolloutConfig:
    """The `rollout:` section: what PPO and GRPO generate and how it is scored."""

    prompts_per_step: int = 8  # prompts in one rollout batch
    samples_per_prompt: int = 1  # completions per prompt (GRPO's group size G; PPO usually 1)
    max_new_tokens: int = 64
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    epochs: int = 1  # optimisation passes over each rollout batch (PPO epochs / GRPO iterations)
    minibatches: int = 1  # optimizer steps per pass
    reward_functions: list[str] = field(default_factory=list)  # registered names or "module:function"
    reward_model: str = ""  # a reward model directory (plugtune train objective=reward)
    missing_eos_penalty: float = 0.0  # subtracted from the score of a completion that never ended
    # How completions are decoded (inference/generate.py): "auto" folds the policy's LoRA into a decoding
    # copy on the fast fp32 path (the same policy up to float rounding); "plain" is the Hugging Face
    # forward; "bf16" / "int8" sample from a rounded copy of the policy (faster on CPU, slightly off-policy).
    decode: str = "auto"


def check_rollout_config(cfg: RunConfig) -> None:
    """What PPO and GRPO both need of the `rollout:` section."""
    r = cfg.rollout
    if not r.reward_functions and not r.reward_model:
        raise ConfigError(f"objective={cfg.objective} needs a reward: set rollout.reward_functions (e.g. "
                          "[instructions]) or rollout.reward_model (a directory from objective=reward)")
    if min(r.prompts_per_step, r.max_new_tokens, r.epochs, r.minibatches) < 1:
        raise ConfigError("rollout.prompts_per_step, max_new_tokens, epochs and minibatches must be >= 1")
    if r.decode not in ("auto", "plain", "fp32", "bf16", "int8", "int8-body"):
        raise ConfigError(f"rollout.decode={r.decode!r}: use auto (fast fp32 where it can run), plain, fp32, bf16, int8 "
                          "or int8-body")
    if (r.prompts_per_step * r.samples_per_prompt) % r.minibatches:
        raise ConfigError(f"rollout.minibatches={r.minibatches} must divide the rollout batch "
                          f"({r.prompts_per_step} prompts x {r.samples_per_prompt} samples)")

Scorer = Callable[[list[PromptItem], list[str], dict], torch.Tensor]  # (prompts, completions, batch) -> (N,)


def make_scorer(functions: list[Callable], reward_model=None) -> Scorer:
    """Sum of the reward functions' values and the reward model's score."""

    def score(prompts: list[PromptItem], completions: list[str], batch: dict) -> torch.Tensor:
        total = torch.zeros(len(completions))
        for fn in functions:
            total += torch.tensor(checked_scores(fn, prompts, completions))
        if reward_model is not None:  # an inference.reward_model.RewardModel: scores prompt + completion as rendered
            total += reward_model.score_ids(batch["input_ids"], batch["attention_mask"]).float().cpu()
        return total

    return score


@dataclass
class RolloutBatch:
    """A rollout as tensors (N rows = prompts x samples), right-padded, labels on completion tokens."""

    input_ids: torch.Tensor  # (N, T)
    attention_mask: torch.Tensor  # (N, T)
    labels: torch.Tensor  # (N, T): completion tokens (end token included), IGNORE elsewhere
    scores: torch.Tensor  # (N,) reward of each completion
    extra: dict  # per-algorithm tensors indexed by row (old_logps, advantages, values, ...)

    def rows(self, index: torch.Tensor) -> dict:
        batch = {"input_ids": self.input_ids[index], "attention_mask": self.attention_mask[index],
                 "labels": self.labels[index], "scores": self.scores[index]}
        batch.update({k: v[index] for k, v in self.extra.items()})
        return batch


def build_rollout(prompts: list[PromptItem], completions: list[list[int]], pad_id: int) -> dict:
    """prompt + completion rows, right-padded; labels mark the completion."""
    rows = [p.prompt_ids + c for p, c in zip(prompts, completions)]
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    labels = torch.full_like(ids, IGNORE_INDEX)
    for i, (p, c) in enumerate(zip(prompts, completions)):
        n, k = len(p.prompt_ids), len(c)
        ids[i, :n + k] = torch.tensor(p.prompt_ids + c)
        mask[i, :n + k] = 1
        labels[i, n:n + k] = torch.tensor(c, dtype=torch.long)
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


class RolloutSource:
    """A batch source that generates its own data. `prepare(model, rollout_batch_dict) -> extra`
    computes the algorithm's per-row tensors under no grad."""

    def __init__(self, prompts: list[PromptItem], tokenizer, cfg: RolloutConfig, scorer: Scorer,
                 prepare: Callable[[nn.Module, dict], dict], seed: int = 0, grad_accum: int = 1,
                 rank: int = 0, world: int = 1):
        if len(prompts) < cfg.prompts_per_step:
            raise ValueError(f"{len(prompts)} prompts but rollout.prompts_per_step={cfg.prompts_per_step}")
        self.prompts, self.tokenizer, self.cfg = prompts, tokenizer, cfg
        self.scorer, self.prepare, self.seed, self.grad_accum = scorer, prepare, seed, grad_accum
        self.rank, self.world = rank, world  # this process takes prompt groups rank::world of each rollout
        self.sample_seed = seed + 1_000_033 * rank  # each rank its own random stream (the prompts are the same)
        self.steps_per_rollout = cfg.epochs * cfg.minibatches
        self.buffer: RolloutBatch | None = None
        self.buffer_index = -1
        self.last_stats: dict = {}

    @property
    def steps_per_epoch(self) -> int:  # one pass over the prompts
        return (len(self.prompts) // self.cfg.prompts_per_step) * self.steps_per_rollout

    def _prompts_of(self, index: int) -> list[PromptItem]:
        per_epoch = len(self.prompts) // self.cfg.prompts_per_step
        epoch, k = divmod(index, per_epoch)
        order = epoch_order(len(self.prompts), self.seed, epoch)
        chosen = order[k * self.cfg.prompts_per_step:(k + 1) * self.cfg.prompts_per_step][self.rank::self.world]
        return [self.prompts[i] for i in chosen for _ in range(self.cfg.samples_per_prompt)]  # G copies in a row

    @torch.no_grad()
    def rollout(self, index: int, model: nn.Module) -> RolloutBatch:
        c = self.cfg
        prompts = self._prompts_of(index)
        gen = GenerationConfig(max_new_tokens=c.max_new_tokens, temperature=c.temperature, top_p=c.top_p,
                               top_k=c.top_k, seed=self.sample_seed * 1_000_003 + index)
        stops = stop_token_ids(self.tokenizer)
        completions = generate_ids(model, [p.prompt_ids for p in prompts], stops, self.tokenizer.pad_token_id, gen,
                                   include_stop=True, decode=c.decode)
        completions = [comp or [stops[0]] for comp in completions]  # an empty completion still ends
        batch = build_rollout(prompts, completions, self.tokenizer.pad_token_id)
        device = next(model.parameters()).device
        batch = {k: v.to(device) for k, v in batch.items()}
        texts = [self.tokenizer.decode([t for t in comp if t not in stops], skip_special_tokens=True)
                 for comp in completions]
        scores = self.scorer(prompts, texts, batch).to(device)
        ended = torch.tensor([comp[-1] in stops for comp in completions], device=device)
        if c.missing_eos_penalty:
            scores = scores - c.missing_eos_penalty * (~ended).float()
        was_training = model.training
        model.eval()
        extra = self.prepare(model, {**batch, "scores": scores})
        model.train(was_training)
        self.last_stats = {"reward": scores.mean(), "completion_tokens": batch["labels"].ne(IGNORE_INDEX).sum(1).float().mean(),
                           "ended": ended.float().mean()}
        return RolloutBatch(batch["input_ids"], batch["attention_mask"], batch["labels"], scores, extra)

    def batches(self, step: int, model: nn.Module) -> list[dict]:
        index, k = divmod(step, self.steps_per_rollout)
        if self.buffer is None or self.buffer_index != index:
            self.buffer, self.buffer_index = self.rollout(index, model), index
        epoch, minibatch = divmod(k, self.cfg.minibatches)
        n = self.buffer.input_ids.shape[0]
        g = torch.Generator().manual_seed(self.sample_seed * 7919 + index * 101 + epoch)
        order = torch.randperm(n, generator=g) if self.cfg.minibatches > 1 else torch.arange(n)
        size = n // self.cfg.minibatches
        rows = order[minibatch * size:(minibatch + 1) * size].to(self.buffer.input_ids.device)
        micro = max(1, len(rows) // self.grad_accum)
        out = []
        for start in range(0, len(rows), micro):
            batch = self.buffer.rows(rows[start:start + micro])
            batch.update({f"rollout/{k}": v for k, v in self.last_stats.items()})
            out.append(batch)
        return out

    def shard(self, d: Distributed) -> RolloutSource:
        """PPO/GRPO under DDP: each rank generates, scores and trains on its own share of every rollout
        batch (whole prompt groups rank::world, sampled with a rank-specific seed). What holds: the
        prompts of a rollout batch are the same as in one process and each GRPO group stays on one rank
        (its advantages are the group's own); the samples differ from one process's (another random
        stream), and PPO's advantage whitening and adaptive KL controller see the rank's share only.
        Each rank's buffer and objective state are saved in the checkpoint, so resuming is exact."""
        if d.mode == "fsdp":
            raise ValueError("PPO and GRPO generate completions of different lengths on each rank, and FSDP needs "
                             "every rank to run the same forwards: use training.distributed=ddp")
        c = self.cfg
        if c.prompts_per_step % d.world:
            raise ValueError(f"rollout.prompts_per_step={c.prompts_per_step} must be a multiple of the "
                             f"{d.world} processes (each generates an equal share)")
        local = c.prompts_per_step // d.world * c.samples_per_prompt
        if local % c.minibatches:
            raise ValueError(f"each process's rollout share ({local} completions) must be divisible by "
                             f"rollout.minibatches={c.minibatches}")
        return RolloutSource(self.prompts, self.tokenizer, c, self.scorer, self.prepare, seed=self.seed,
                             grad_accum=self.grad_accum, rank=d.rank, world=d.world)

    def state_dict(self) -> dict:
        if self.buffer is None:
            return {"buffer_index": -1}
        b = self.buffer
        return {"buffer_index": self.buffer_index, "stats": self.last_stats,
                "buffer": {"input_ids": b.input_ids.cpu(), "attention_mask": b.attention_mask.cpu(),
                           "labels": b.labels.cpu(), "scores": b.scores.cpu(),
                           "extra": {k: v.cpu() for k, v in b.extra.items()}}}

    def load_state_dict(self, state: dict) -> None:
        self.buffer_index = state.get("buffer_index", -1)
        saved = state.get("buffer")
        self.buffer = None if saved is None else RolloutBatch(saved["input_ids"], saved["attention_mask"],
                                                              saved["labels"], saved["scores"], saved["extra"])
        self.last_stats = state.get("stats", {})


def prepare_rl(cfg: RunConfig, loaded, make_objective: Callable) -> Setup:
    """What PPO and GRPO share: prompts (read before the model loads), the policy (an adapter, or every
    weight), the reference, the scorer (reward functions and/or a reward model on the same base), and
    the rollout source feeding the loop. `make_objective(model, reference)` -> (objective, extra groups)."""
    functions = [resolve_reward_function(name) for name in cfg.rollout.reward_functions]
    loaded = loaded or load_base(cfg.model.name, cfg.model.dtype, cfg.model.device)
    prompts = load_prompts(cfg.data.train, loaded.tokenizer)
    torch.manual_seed(cfg.training.seed)
    loaded = prepare_model(cfg, loaded)
    model = loaded.model
    reference = Reference(model, full_finetune=cfg.method == "full", adapter=attach_reference(cfg, loaded))
    reward_model = None
    if cfg.rollout.reward_model:
        # An adapter reward model shares the policy's base (per-row "reward" adapter when scoring).
        reward_model = load_reward_model(cfg.rollout.reward_model, model=model, adapter_name="reward")
        if cfg.method != "full":
            set_active_adapters(model, ["default"])
    scorer = make_scorer(functions, reward_model)
    objective, extra_groups = make_objective(model, reference)
    policy = [p for p in model.parameters() if p.requires_grad and all(p is not q for g in extra_groups for q in g.params)]
    groups = [ParamGroup("policy", policy), *extra_groups]
    source = RolloutSource(prompts, loaded.tokenizer, cfg.rollout, scorer, objective.prepare_rollout,
                           seed=cfg.training.seed, grad_accum=cfg.training.grad_accum)
    summary = f"{len(prompts)} prompts from {cfg.data.train}"
    return Setup(loaded, source, lambda out: save_policy(cfg, loaded, out), objective, groups, None, summary)
