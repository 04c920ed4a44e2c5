"""A trained reward model as a scorer, and its file format: a scalar head reads the last non-padding
token of prompt + completion (training: training/recipes/reward_model.py, Bradley–Terry on pairs).

Saved layout (`train` objective=reward writes it to OUTPUT/reward_model/):

    reward_model/
      adapter_config.json, adapter_model.safetensors, plugtune_adapter.json   method != full: the adapter
                                                                              (PEFT format) for the base
      config.json, model.safetensors, tokenizer files                         method == full: the whole
                                                                              causal LM (plain transformers)
      reward_head.safetensors     "weight" (1, C), "bias" (1,): score = h_last · weight + bias
      reward_head.json            {"format": "plugtune-reward-model", "version": 1, "method", "hidden_size",
                                   "base_model", "base_fingerprint" (adapter only), "adapter": bool}

Scoring: `load_reward_model(path)` -> a `RewardModel`; `.score(prompts, completions)` or
`.score_ids(input_ids, attention_mask)`. An adapter reward model can be loaded onto a model that is
already in use (e.g. a PPO policy) under its own adapter name, so both share one base:

    rm = load_reward_model("runs/rm/reward_model", model=policy, tokenizer=tok, adapter_name="reward")
    rewards = rm.score(prompts, completions)       # (N,) float32, no grad; only 'reward' is applied
    rewards = rm.score_ids(input_ids, attention_mask)   # rollout rows (prompt + generated ids, right-padded)

A generated row that stops at the end-of-turn token gets the template's trailing tokens (ChatML's
newline) before scoring, so it is scored at the position training scored (see `score_ids`).

The head is kept on the RewardModel, not attached to the shared model, so the policy's parameters,
checkpoints and saved files never see it.
"""
from __future__ import annotations

import contextlib
import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from plugtune.adapters import adapter_layers, adapter_state, base_fingerprint, load_adapter, save_adapter
from plugtune.adapters.mixed import mixed_adapters
from plugtune.data.batching import collate
from plugtune.data.preference import PreferencePair, collate_pairs, tokenize_conversation, tokenize_preferences
from plugtune.data.tokenize import IGNORE_INDEX, Tokenized
from plugtune.models.causal_lm import hidden_states
from plugtune.models.heads import ScalarHead, heads_detached, last_token
from plugtune.models.loading import LoadedModel, load_base, load_tokenizer, read_safetensors

HEAD_WEIGHTS, HEAD_META = "reward_head.safetensors", "reward_head.json"
FORMAT = "plugtune-reward-model"


def save_reward_model(loaded: LoadedModel, head: ScalarHead, out: Path, method: str, base_name: str) -> Path:
    """Write the adapter named 'default' (or, method=full, the whole model) and the head to `out` (the
    layout in the module docstring)."""
    model = loaded.model
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    if method == "full":
        with heads_detached(model):  # model.safetensors: the plain causal LM, which transformers loads
            model.save_pretrained(out, safe_serialization=True)
        loaded.tokenizer.save_pretrained(out)
        fingerprint = None
    else:
        save_adapter(model, out, "default", base_name=base_name)
        fingerprint = base_fingerprint(model)  # heads are no part of a base fingerprint
    save_file({"weight": head.score.weight.detach().cpu().contiguous(),
               "bias": head.score.bias.detach().cpu().contiguous()}, str(out / HEAD_WEIGHTS))
    meta = {"format": FORMAT, "version": 1, "method": method, "adapter": method != "full",
            "hidden_size": int(head.score.weight.shape[1]), "base_model": base_name,
            "base_fingerprint": fingerprint}
    (out / HEAD_META).write_text(json.dumps(meta, indent=2))
    return out


@dataclass
class RewardModel:
    """A trained reward model, ready to score. `adapter`: the adapter name on `model` that scores (only
    it is applied, whatever else is active); None for a full model."""

    model: nn.Module
    tokenizer: object
    head: ScalarHead
    adapter: str | None = None
    _turn_end: tuple | None = field(default=None, init=False, repr=False)

    @torch.no_grad()
    def score_ids(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, complete_turns: bool = True) -> torch.Tensor:
        """(N, T) right-padded prompt + completion ids -> (N,) float32 rewards: the head at each row's
        last real token, no grad, only this reward model's adapter applied.

        Training rendered each pair through the chat template, so its last token is whatever the
        template puts after the reply's end-of-turn token (ChatML: '<|im_end|>' then a newline, and
        the newline is the token scored). Generated completions stop at the end-of-turn token; with
        `complete_turns`, rows that end on it get the template's trailing tokens appended first, so
        they are scored where training scored them. Rows that end otherwise are scored as they are."""
        if complete_turns:
            input_ids, attention_mask = self.complete_turns(input_ids, attention_mask)
        device = next(self.model.parameters()).device
        input_ids, attention_mask = input_ids.to(device), attention_mask.to(device)
        was_training = self.model.training
        self.model.eval()  # no adapter dropout while scoring
        try:
            rows = mixed_adapters(self.model, [self.adapter] * input_ids.shape[0]) if self.adapter \
                else contextlib.nullcontext()
            with rows:
                hidden = hidden_states(self.model, input_ids, attention_mask)  # (N, T, C)
        finally:
            self.model.train(was_training)
        return self.head(last_token(hidden, attention_mask)).float()

    def turn_end(self) -> tuple[int, list[int]]:
        """(the last labelled token of a rendered reply, the template's tokens after it)."""
        if self._turn_end is None:
            tok = self.tokenize(["hi"], ["hello"])[0]
            last = max(i for i, label in enumerate(tok.labels) if label != IGNORE_INDEX)
            self._turn_end = (tok.input_ids[last], tok.input_ids[last + 1:])
        return self._turn_end

    def complete_turns(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Append the template's trailing tokens to rows whose last real token ends a turn."""
        if self.tokenizer is None:
            return input_ids, attention_mask
        end, suffix = self.turn_end()
        lengths = attention_mask.sum(-1)
        last = input_ids[torch.arange(input_ids.shape[0]), (lengths - 1).clamp(min=0)]
        ends = (last == end).tolist()
        if not suffix or not any(ends):
            return input_ids, attention_mask
        rows = [Tokenized(ids[:n].tolist() + (suffix if e else []), []) for ids, n, e in zip(input_ids, lengths.tolist(), ends)]
        width = max(len(r.input_ids) for r in rows)
        ids = input_ids.new_full((len(rows), width), self.tokenizer.pad_token_id)
        mask = attention_mask.new_zeros((len(rows), width))
        for i, r in enumerate(rows):
            ids[i, :len(r.input_ids)] = torch.tensor(r.input_ids)
            mask[i, :len(r.input_ids)] = 1
        return ids, mask

    def tokenize(self, prompts: list, completions: list) -> list[Tokenized]:
        """prompt (str or turns ending with a user turn) + completion (str or assistant turns), rendered
        as the pairs were in training."""
        if len(prompts) != len(completions):
            raise ValueError(f"{len(prompts)} prompts for {len(completions)} completions")
        out = []
        for p, c in zip(prompts, completions):
            prompt = [{"role": "user", "content": p}] if isinstance(p, str) else list(p)
            completion = [{"role": "assistant", "content": c}] if isinstance(c, str) else list(c)
            ids, labels, _ = tokenize_conversation(self.tokenizer, prompt, completion)
            out.append(Tokenized(ids, labels))
        return out

    def score(self, prompts: list, completions: list, batch_size: int = 16, max_length: int | None = None) -> torch.Tensor:
        """(N,) rewards of the N (prompt, completion) pairs; sequences over max_length keep their start."""
        items = self.tokenize(prompts, completions)
        if max_length:
            items = [Tokenized(it.input_ids[:max_length], it.labels[:max_length]) for it in items]
        pad = self.tokenizer.pad_token_id
        parts = [self.score_ids(**{k: v for k, v in collate(items[i:i + batch_size], pad).items() if k != "labels"})
                 for i in range(0, len(items), batch_size)]
        return torch.cat(parts) if parts else torch.zeros(0)


def read_meta(path: str | Path) -> dict:
    path = Path(path)
    meta_file = path / HEAD_META
    if not meta_file.is_file() or not (path / HEAD_WEIGHTS).is_file():
        raise FileNotFoundError(f"{path} is not a reward model directory: {HEAD_META} or {HEAD_WEIGHTS} is missing "
                                "(train one with objective=reward; it is written to OUTPUT/reward_model)")
    meta = json.loads(meta_file.read_text())
    if meta.get("format") != FORMAT:
        raise ValueError(f"{meta_file}: not a plugtune reward model (format {meta.get('format')!r})")
    return meta


def load_reward_model(path: str | Path, model: nn.Module | LoadedModel | str | None = None, *, tokenizer=None,
                      adapter_name: str = "reward", dtype: str = "auto", device: str = "auto",
                      force: bool = False) -> RewardModel:
    """Load a reward model saved by `train` (objective=reward).

    path: the reward model directory (OUTPUT/reward_model).
    model: for an adapter reward model, the base to put it on: None (load the base recorded at
      training), a model name or directory, a LoadedModel, or an nn.Module already in use (e.g. a PPO
      policy with its own adapter): the reward adapter is added as `adapter_name`, frozen and left
      inactive, so the model's own forward passes are unchanged. For a full reward model, leave it
      None (the directory is the model) or pass it already loaded (LoadedModel).
    tokenizer: needed with an nn.Module `model` if you call `score` (text); default: the base's.
    force: load an adapter onto a base whose fingerprint differs.
    """
    path = Path(path)
    meta = read_meta(path)
    if not meta["adapter"]:
        if isinstance(model, nn.Module):
            raise ValueError(f"{path} is a full reward model (its own weights); it cannot share a base model: "
                             "call load_reward_model without `model`")
        loaded = model if isinstance(model, LoadedModel) else load_base(str(model or path), dtype, device)
        loaded.model.requires_grad_(False)
        loaded.model.eval()
        return RewardModel(loaded.model, loaded.tokenizer, _load_head(path, meta, loaded.model), None)
    if isinstance(model, nn.Module):
        base = model
        tokenizer = tokenizer or (load_tokenizer(meta["base_model"]) if meta.get("base_model") else None)
    else:
        loaded = model if isinstance(model, LoadedModel) else load_base(model or meta["base_model"], dtype, device)
        base, tokenizer = loaded.model, tokenizer or loaded.tokenizer
        base.requires_grad_(False)  # a base of its own: nothing in it trains
        base.eval()
    load_adapter(base, path, adapter_name, force=force, trainable=False)  # checks the base's fingerprint
    for p in adapter_state(base, adapter_name).values():
        p.requires_grad_(False)
    for _, layer in adapter_layers(base):  # loading activates an adapter; scoring applies it per row instead
        layer.active_adapters = [a for a in layer.active_adapters if a != adapter_name]
    return RewardModel(base, tokenizer, _load_head(path, meta, base), adapter_name)


def _load_head(path: Path, meta: dict, model: nn.Module) -> ScalarHead:
    state = read_safetensors(path / HEAD_WEIGHTS, "Train the reward model again, or copy its directory again")
    hidden = model.get_input_embeddings().weight.shape[1]
    if hidden != meta["hidden_size"] or tuple(state["weight"].shape) != (1, hidden):
        raise ValueError(f"{path}: the reward head reads {meta['hidden_size']}-wide hidden states; this model's are "
                         f"{hidden} wide (another base?)")
    head = ScalarHead(hidden)
    with torch.no_grad():
        head.score.weight.copy_(state["weight"])
        head.score.bias.copy_(state["bias"])
    return head.requires_grad_(False).to(next(model.parameters()).device)


@torch.no_grad()
def pairwise_accuracy(scorer: RewardModel, pairs: list[PreferencePair], max_length: int = 512,
                      batch_size: int = 8) -> dict:
    """Share of held-out pairs whose chosen completion scores strictly higher, the mean margin
    r_c − r_r, and the count (pairs tokenized as in training: data.max_length, truncate)."""
    if not pairs or not all(isinstance(p, PreferencePair) for p in pairs):
        raise ValueError("pairwise accuracy needs preference pairs (prompt, chosen, rejected)")
    items, stats = tokenize_preferences(scorer.tokenizer, pairs, max_length)
    if not items:
        raise ValueError(f"no usable pairs after tokenization ({stats.summary()})")
    diffs = []
    for i in range(0, len(items), batch_size):
        batch = collate_pairs(items[i:i + batch_size], scorer.tokenizer.pad_token_id)
        r = scorer.score_ids(batch["input_ids"], batch["attention_mask"])  # (2b,)
        b = r.shape[0] // 2
        diffs.append(r[:b] - r[b:])
    d = torch.cat(diffs)
    return {"pairwise_accuracy": float((d > 0).float().mean()), "mean_margin": float(d.mean()), "pairs": len(items)}
