"""Batched generation with a KV cache: greedy or sampling (temperature, top-k, top-p).

Prompts are left-padded so every row's next token sits at the last position; position ids come
from the attention mask so padding does not shift positions. Rows stop at an end token.
Prompt/prefix-tuning adapters are applied at prefill by `causal_lm.prepare_inputs`.

The pieces are shared with the serving engine (serve/engine.py), which schedules them itself:
`GenerationConfig` (the one sampling-parameters type), `prefill`, `decode_step` and `sample_next`.

`adapter_names` (one per prompt, None for the base) decodes requests for different adapters in
the same batch: every step is one forward pass over all rows (adapters/mixed.py).

`decode` picks the decode step (inference/fast_decode.py): "auto" (the default) runs Llama-family
models on the fast fp32 path (static KV cache, live LoRA folded into a decoding copy, no Hugging Face
per-layer overhead; the same tokens as "plain" up to float rounding) and everything else on "plain",
the Hugging Face forward with a DynamicCache. "bf16" and "int8" decode with smaller weight copies
(faster on CPU, not the same numbers: bench/decode_speed.py measures their agreement with fp32).
"cuda-graph" replays one captured CUDA graph per token and "compile" runs the step through
torch.compile (reduce-overhead): both on the static cache, for launch-bound GPU decoding.
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import nn

from plugtune.adapters.mixed import mixed_adapters
from plugtune.data.tokenize import prompt_ids
from plugtune.inference import fast_decode
from plugtune.models.causal_lm import cache_kwarg, inputs_prepared, prepare_inputs

if TYPE_CHECKING:  # transformers loads on first use: `import plugtune` stays quick
    from transformers import DynamicCache


@dataclass
class GenerationConfig:
    """How each new token is chosen, for `generate` and for every request the server decodes."""

    max_new_tokens: int = 64
    temperature: float = 0.0  # 0 = greedy
    top_k: int = 0  # 0 = off
    top_p: float = 1.0  # 1 = off
    seed: int | None = None  # None: unseeded

    def __post_init__(self):
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0 (0 = greedy), got {self.temperature}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0 (0 = off), got {self.top_k}")
        if not 0 <= self.top_p <= 1:
            raise ValueError(f"top_p must be in [0, 1] (1 = off), got {self.top_p}")


def sample_next(logits: torch.Tensor, cfg: GenerationConfig, generator: torch.Generator | None) -> torch.Tensor:
    """logits (B, V) -> next token ids (B,)."""
    if cfg.temperature <= 0:
        return logits.argmax(dim=-1)
    logits = logits.float() / cfg.temperature
    if cfg.top_k > 0:
        kth = torch.topk(logits, min(cfg.top_k, logits.shape[-1])).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if cfg.top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        drop = cum - sorted_logits.softmax(-1) > cfg.top_p  # keep the smallest set whose mass reaches top_p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    # Inverse-CDF sampling: one uniform draw per row against the cumulative probabilities. Exact, and
    # ~10x cheaper than torch.multinomial here, which draws an exponential variate per vocabulary
    # entry (5.6 ms a step for 8 x 49,152 on 2 cores: 7% of a decode step of the default model).
    cdf = logits.softmax(-1).cumsum(-1)  # (B, V)
    u = torch.rand(cdf.shape[0], 1, generator=generator, device=cdf.device, dtype=cdf.dtype) * cdf[:, -1:]
    # the first token whose cumulative mass exceeds u (never a zero-probability one: its cdf step is flat)
    return torch.searchsorted(cdf, u, right=True).squeeze(-1).clamp(max=cdf.shape[-1] - 1)


@torch.no_grad()
def generate_ids(model: nn.Module, prompts: list[list[int]], stop_ids: list[int], pad_id: int,
                 cfg: GenerationConfig | None = None, adapter_names: list[str | None] | None = None,
                 include_stop: bool = False, decode: str = "auto") -> list[list[int]]:
    """Continue each prompt (token ids); returns the new tokens per prompt, the end token excluded
    unless `include_stop` (RL keeps it: ending is an action the policy learns).
    With `adapter_names`, row i decodes with adapter adapter_names[i] (None: the base).
    `decode`: "auto", "plain", "fp32", "bf16" or "int8" (see the module docstring)."""
    if decode not in DECODE_MODES:
        raise ValueError(f"decode must be one of {', '.join(DECODE_MODES)}, got {decode!r}")
    if adapter_names is not None:
        if len(adapter_names) != len(prompts):
            raise ValueError(f"{len(adapter_names)} adapter names for {len(prompts)} prompts; give one per prompt")
        with mixed_adapters(model, adapter_names):  # the row plan is laid out for every row: no prompt sharing
            return _decode(model, prompts, stop_ids, pad_id, cfg or GenerationConfig(), include_stop, False, decode)
    return _decode(model, prompts, stop_ids, pad_id, cfg or GenerationConfig(), include_stop, True, decode)


DECODE_MODES = ("auto", "plain", *fast_decode.WEIGHTS, "cuda-graph", "compile")
_FIXED = {"cuda-graph": {"graph": True}, "compile": {"compiled": True}}  # static-shape runners: model's own weights


def fast_weights(model: nn.Module, decode: str) -> str | None:
    """The decoding copy's weights for `decode` ("fp32", "bf16", "int8"), or None for the plain step.
    "auto" falls back to plain where the fast path cannot run; an explicit choice says why it cannot."""
    if decode == "plain":
        return None
    why = fast_decode.refusal(model)
    if why is None:
        return "fp32" if decode in ("auto", *_FIXED) else decode
    if decode == "auto":
        return None
    raise ValueError(f"decode={decode!r} cannot run this model ({why}); use decode='plain' or 'auto'")


def prefill(model: nn.Module, prompts: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor, DynamicCache]:
    """Run the prompts through the model once, left-padded, into a fresh KV cache (a DynamicCache).

    Returns the logits at each row's last position (B, V), the attention mask (B, T) and the cache.
    Virtual inputs (soft prompt / KV prefix) enter here; the mask then covers their columns, so a
    decode step only appends one token and one mask column, as for a plain model. The caller sets
    the adapters (mixed_adapters for per-row ones) and eval mode."""
    from transformers import DynamicCache

    device = next(model.parameters()).device
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long, device=device)
    mask = torch.zeros_like(ids)
    for row, p in enumerate(prompts):
        ids[row, width - len(p):] = torch.tensor(p, device=device)
        mask[row, width - len(p):] = 1
    cache = DynamicCache()
    step, _ = prepare_inputs(model, ids, mask, cache)
    step.pop("position_ids", None)  # derived from the mask, as at every decode step
    mask = step["attention_mask"]
    step_len = (step["input_ids"] if "input_ids" in step else step["inputs_embeds"]).shape[1]
    positions = (mask.cumsum(-1) - 1).clamp(min=0)[:, -step_len:]
    # Only the last position's logits are needed: skip the (B, T, V) prompt logits.
    keep = {"logits_to_keep": 1} if "logits_to_keep" in inspect.signature(model.forward).parameters else {}
    with inputs_prepared():
        logits = model(**step, position_ids=positions, use_cache=True, **keep).logits[:, -1]  # (B, V)
    return logits, mask, cache


def decode_step(model: nn.Module, tokens: torch.Tensor, mask: torch.Tensor, cache: DynamicCache,
                cache_key: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Feed each row's newest token (B,) after its cached columns; returns the next logits (B, V)
    and the mask grown by one column (B, T + 1). `cache_key` is `cache_kwarg(model)`, looked up
    once per batch by the caller (it costs ~50 us, a noticeable part of a small model's step)."""
    mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)  # finished rows' tokens are ignored
    positions = (mask.cumsum(-1) - 1)[:, -1:]  # (B, 1): each row's own next position
    with inputs_prepared():
        logits = model(input_ids=tokens.unsqueeze(1), attention_mask=mask, position_ids=positions, use_cache=True,
                       **{cache_key: cache}).logits[:, -1]  # (B, V)
    return logits, mask


def _decode(model: nn.Module, prompts: list[list[int]], stop_ids: list[int], pad_id: int, cfg: GenerationConfig,
            include_stop: bool, share_prompts: bool, decode: str = "auto") -> list[list[int]]:
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token")
    device = next(model.parameters()).device
    generator = None
    if cfg.seed is not None:
        generator = torch.Generator(device=device).manual_seed(cfg.seed)
    # Several samples of one prompt (GRPO's group, DPO's on-policy candidates) prefill it once; its
    # KV cache and last logits are then copied to every row that asked for it.
    unique: dict[tuple[int, ...], int] = {}
    source = [unique.setdefault(tuple(p), len(unique)) for p in prompts]
    shared = share_prompts and len(unique) < len(prompts)
    was_training = model.training
    model.eval()
    cache_key = cache_kwarg(model)
    stop = torch.tensor(stop_ids, device=device)
    finished = torch.zeros(len(prompts), dtype=torch.bool, device=device)
    out: list[list[int]] = [[] for _ in prompts]
    logits, mask, cache = prefill(model, [list(p) for p in unique] if shared else prompts, pad_id)
    if shared:  # one row per prompt -> one row per request
        expand = torch.tensor(source, device=device)
        logits, mask = logits[expand], mask[expand]
        cache.reorder_cache(expand)  # index_select on the batch dimension of every layer's keys and values
    weights = fast_weights(model, decode)
    if weights is not None:
        out = _decode_fast(fast_decode.decoding_copy(model, weights), logits, mask, cache, stop, pad_id, cfg,
                           generator, include_stop, _FIXED.get(decode))
        model.train(was_training)
        return out
    for i in range(cfg.max_new_tokens):
        nxt = sample_next(logits, cfg, generator)
        nxt = torch.where(finished, torch.full_like(nxt, pad_id), nxt)
        for row in torch.nonzero(~finished).flatten().tolist():
            tok = int(nxt[row])
            if include_stop or tok not in stop_ids:
                out[row].append(tok)
        finished |= torch.isin(nxt, stop)
        if bool(finished.all()) or i == cfg.max_new_tokens - 1:
            break
        logits, mask = decode_step(model, nxt, mask, cache, cache_key)
    model.train(was_training)
    return out


def _decode_fast(copy: fast_decode.DecodingCopy, logits: torch.Tensor, mask: torch.Tensor, cache, stop: torch.Tensor,
                 pad_id: int, cfg: GenerationConfig, generator, include_stop: bool,
                 fixed: dict | None = None) -> list[list[int]]:
    """The decode loop on a decoding copy and a static cache. Tokens stay in one (B, N) tensor and are
    read back once at the end; the all-finished check is one host sync per step on CPU (it costs
    microseconds there) and one per 8 steps on an accelerator, where syncs stall the launch queue."""
    static = fast_decode.StaticCache.from_dynamic(cache, mask, cfg.max_new_tokens)
    del cache
    if fixed is None:
        def step(tokens):
            return copy.step(tokens, static)
    else:  # static shapes: a CUDA graph or torch.compile (`fixed` says which), captured once per generation
        step = fast_decode.FixedStep(copy, static, **fixed)
    rows = logits.shape[0]
    tokens = torch.full((rows, cfg.max_new_tokens), pad_id, dtype=torch.long, device=logits.device)
    finished = torch.zeros(rows, dtype=torch.bool, device=logits.device)
    check_every = 1 if logits.device.type == "cpu" else 8
    steps = 0
    for i in range(cfg.max_new_tokens):
        nxt = sample_next(logits, cfg, generator)
        nxt = torch.where(finished, torch.full_like(nxt, pad_id), nxt)
        tokens[:, i] = nxt
        finished |= torch.isin(nxt, stop)
        steps = i + 1
        if i == cfg.max_new_tokens - 1 or ((i + 1) % check_every == 0 and bool(finished.all())):
            break
        logits = step(nxt)
    out = []
    stop_set = set(stop.tolist())
    for row in tokens[:, :steps].tolist():
        new = []
        for tok in row:
            if tok in stop_set:
                if include_stop:
                    new.append(tok)
                break
            new.append(tok)
        out.append(new)
    return out


def stop_token_ids(tokenizer) -> list[int]:
    ids = {tokenizer.eos_token_id}
    for token in ("<|im_end|>", "<|eot_id|>", "<|endoftext|>", "<end_of_turn>"):
        tid = tokenizer.convert_tokens_to_ids(token)
        if isinstance(tid, int) and tid != tokenizer.unk_token_id and tid is not None:
            ids.add(tid)
    return sorted(i for i in ids if i is not None)


def generate(model: nn.Module, tokenizer, prompts: list[str] | list[list[dict]], cfg: GenerationConfig | None = None,
             batch_size: int = 16, chat: bool = True, adapter_names: list[str | None] | None = None) -> list[str]:
    """Generate a reply for each prompt: a user message string, or a list of chat messages.
    `adapter_names` gives each prompt its own adapter (None: the base), decoded in shared batches."""
    if adapter_names is not None and len(adapter_names) != len(prompts):
        raise ValueError(f"{len(adapter_names)} adapter names for {len(prompts)} prompts; give one per prompt")
    encoded = []
    for p in prompts:
        if chat:
            messages = [{"role": "user", "content": p}] if isinstance(p, str) else p
            encoded.append(prompt_ids(tokenizer, messages))
        else:
            encoded.append(tokenizer(p, add_special_tokens=True)["input_ids"])
    stops = stop_token_ids(tokenizer)
    texts: list[str] = []
    for i in range(0, len(encoded), batch_size):
        names = adapter_names[i:i + batch_size] if adapter_names is not None else None
        new = generate_ids(model, encoded[i:i + batch_size], stops, tokenizer.pad_token_id, cfg, names)
        texts += [tokenizer.decode(t, skip_special_tokens=True) for t in new]
    return texts
