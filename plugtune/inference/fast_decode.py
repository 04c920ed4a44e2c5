"""A leaner decode step for Llama-family models: a decoding copy of the weights and a static KV cache.

Profiling a decode step of the default model (SmolLM2-135M, 30 layers) at batch 8 on 2 CPU cores put
~80% of the time in the weights' matmuls (fp32: 540 MB read per step), ~10% in growing the
`DynamicCache` by concatenation (every step copies every layer's keys and values), and the rest in
Hugging Face's per-layer Python (mask building, kwargs, cache bookkeeping). This module removes the
last two and offers smaller weights for the first:

- `DecodingCopy`: per layer, one callable per projection. A plain `nn.Linear` keeps its weight (no
  copy). A LoRA wrapper whose adapters are live is folded into a decoding-only weight W + s·B·A
  (the policy itself is never touched; exact up to float rounding), unless a per-row plan is set
  (mixed adapters), where the wrapper itself runs. `weights="int8"` packs every folded weight for
  fbgemm's int8 GEMM (weights int8 per output channel, activations quantized per call: PyTorch's
  dynamic quantized linear, `torch.ops.quantized.linear_dynamic`; measured 7.7x faster than fp32 over
  the default model's matmuls at batch 8, where `aten._weight_int8pack_mm` was 8x slower than fp32 on
  these CPUs); `weights="bf16"` keeps bfloat16 copies. Both change the numbers: their agreement with
  fp32 greedy output is measured by bench/decode_speed.py.
- `StaticCache`: keys and values written in place into buffers sized for the whole generation
  (prompt + max_new_tokens columns, grown in chunks when a serving batch outlives them), with the
  attention mask alongside. Rows are left-padded as in `generate.prefill`, so one column per step.

The prompt is prefilled by the plain Hugging Face forward (`generate.prefill`: virtual inputs, the same
numbers), its cache copied once into the static one. `refusal(model)` says when this path cannot run
(another architecture, live prefix/prompt tuning, an adapter it cannot fold or run per row); callers
then use the plain `decode_step`.
"""
from __future__ import annotations

import warnings
import weakref
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from plugtune.adapters.layers import AdapterLayer
from plugtune.adapters.methods.lora import LoraLinear

WEIGHTS = ("fp32", "bf16", "int8", "int8-body")  # int8-body: int8 blocks, the LM head kept in fp32
_PROJ = (("self_attn", "q_proj"), ("self_attn", "k_proj"), ("self_attn", "v_proj"), ("self_attn", "o_proj"),
         ("mlp", "gate_proj"), ("mlp", "up_proj"), ("mlp", "down_proj"))
_CHUNK = 64  # columns a serving cache grows by when full


def refusal(model: nn.Module) -> str | None:
    """Why the fast decode path cannot run this model as it is now (None: it can)."""
    why = architecture_refusal(model)
    if why is not None:
        return why
    allowed = {n for _, n in _PROJ} | {"embed_tokens", "lm_head"}  # modules the decoder calls or folds
    for name, module in model.named_modules():
        if isinstance(module, AdapterLayer) and (module.live_adapters() or module.row_plan is not None):
            target = name.replace(".base_layer", "").split(".")[-1]
            if target not in allowed:
                return f"{type(module).__name__} adapters on {name} sit outside the projections the decoder runs"
            if isinstance(module, LoraLinear) and module.fan_in_fan_out:
                return f"{name} stores its weight (in, out) (Conv1D)"
        if hasattr(module, "virtual_inputs") and isinstance(module, AdapterLayer) and \
                (module.live_adapters() or module.row_plan is not None):
            return "prompt or prefix tuning is live (kept on the plain path, where its virtual inputs are handled)"
    return None


def architecture_refusal(model: nn.Module) -> str | None:
    """Why this model's architecture has no fast decode step (None: Llama-family, it has)."""
    body = getattr(model, "model", None)
    layers = getattr(body, "layers", None)
    if layers is None or not hasattr(body, "rotary_emb") or not hasattr(body, "norm"):
        return f"{type(model).__name__} is not a Llama-family model (model.layers, rotary_emb, norm)"
    cfg = model.config
    if getattr(cfg, "sliding_window", None) and getattr(cfg, "use_sliding_window", True) is not False \
            and type(model).__name__ != "LlamaForCausalLM":
        return "sliding-window attention"
    for layer in layers:
        attn, mlp = getattr(layer, "self_attn", None), getattr(layer, "mlp", None)
        if attn is None or mlp is None or not all(hasattr(getattr(layer, p), n) for p, n in _PROJ):
            return f"{type(layer).__name__} does not have Llama's q/k/v/o and gate/up/down projections"
        if type(attn).__name__ not in ("LlamaAttention", "MistralAttention", "Qwen2Attention"):
            return f"attention {type(attn).__name__} (q/k norms or other extras) is not handled"
        if not hasattr(mlp, "act_fn"):
            return f"MLP {type(mlp).__name__} has no act_fn"
    return None


def _fold(module: nn.Module) -> tuple[torch.Tensor, torch.Tensor | None] | None:
    """(weight (out, in), bias) with every live LoRA folded in, or None when the module must run itself
    (a per-row plan, another adapter method). The base weight is returned as is (no copy) when nothing is live."""
    chain = []
    inner = module
    while isinstance(inner, AdapterLayer):
        chain.append(inner)
        inner = inner.base_layer
    if not isinstance(inner, nn.Linear):
        return None
    weight = inner.weight.detach()
    for wrapper in reversed(chain):  # inner wrappers first, as merge() requires
        live = wrapper.live_adapters()
        if wrapper.row_plan is not None or (live and not isinstance(wrapper, LoraLinear)):
            return None
        for name in live:
            weight = wrapper.merged_weight(name, weight).to(inner.weight.dtype).detach()
    bias = inner.bias.detach() if inner.bias is not None else None
    return weight, bias


class _Dense:
    def __init__(self, weight, bias):
        self.weight, self.bias = weight, bias

    def __call__(self, x):
        return F.linear(x, self.weight, self.bias)


class _Bf16:
    def __init__(self, weight, bias):
        self.weight = weight.to(torch.bfloat16)
        self.bias = bias

    def __call__(self, x):
        y = F.linear(x.to(torch.bfloat16), self.weight).to(x.dtype)
        return y if self.bias is None else y + self.bias


class _Int8:
    """fbgemm int8 GEMM: weight int8 per output channel (symmetric), activations quantized per call."""

    def __init__(self, weight, bias):
        w = weight.float()
        scale = (w.abs().amax(dim=1) / 127).clamp(min=1e-12).double()
        with warnings.catch_warnings():  # PyTorch marks its quantized tensor types deprecated (still shipped)
            warnings.simplefilter("ignore")
            q = torch.quantize_per_channel(w, scale, torch.zeros_like(scale, dtype=torch.long), 0, torch.qint8)
            self.packed = torch.ops.quantized.linear_prepack(q, None if bias is None else bias.float())

    def __call__(self, x):
        shape = x.shape
        return torch.ops.quantized.linear_dynamic(x.reshape(-1, shape[-1]), self.packed).view(*shape[:-1], -1)


class _Module:
    def __init__(self, module):
        self.module = module

    def __call__(self, x):
        return self.module(x)


class _RowLora:
    """A per-row mixed batch on one LoRA layer: the base projection (any weights above) plus each row's
    own x A_r^T B_r^T (s folded into B), with every row's factors gathered once per row plan (Punica's
    gather-matmul, BGMV) instead of at every step as the layer's own per-row forward does."""

    def __init__(self, base, layer: LoraLinear):
        order = tuple(layer.lora_A.keys())
        a_all, b_all = layer.stacked_factors(order, layer.row_plan)  # (n+1, r, in), (n+1, out, r); 0 = none
        slots = layer.row_plan.slots(order)
        self.base = base
        self.a = a_all[slots].transpose(1, 2).contiguous()  # (B, in, r)
        self.b = b_all[slots].transpose(1, 2).contiguous()  # (B, r, out)

    def __call__(self, x):  # (B, 1, in)
        return self.base(x) + torch.bmm(torch.bmm(x.to(self.a.dtype), self.a), self.b).to(x.dtype)


def _row_lora(module: nn.Module) -> bool:
    """A lone LoRA layer over nn.Linear under a row plan, whose present adapters are plain LoRA (no DoRA,
    no dropout: eval): its rows can take `_RowLora`."""
    if not (isinstance(module, LoraLinear) and module.row_plan is not None and isinstance(module.base_layer, nn.Linear)):
        return False
    if module.disabled or module.training or module.fan_in_fan_out or not module.lora_A:
        return False
    present = [n for n in module.row_plan.present if n in module.configs]
    return bool(present) and not any(n in module.variants for n in present) and \
        all(isinstance(module.lora_dropout[n], nn.Identity) for n in module.lora_A)


def _dense(weight, bias, weights: str):
    if weights in ("int8", "int8-body"):
        if "fbgemm" not in torch.backends.quantized.supported_engines or weight.device.type != "cpu":
            raise ValueError("decode weights 'int8' need PyTorch's fbgemm CPU kernels (x86 CPU); use fp32 or bf16")
        return _Int8(weight, bias)
    if weights == "bf16":
        return _Bf16(weight, bias)
    return _Dense(weight, bias)


def _proj(module: nn.Module, weights: str):
    if _row_lora(module):
        inner = module.base_layer
        bias = inner.bias.detach() if inner.bias is not None else None
        return _RowLora(_dense(inner.weight.detach(), bias, weights), module)
    folded = _fold(module)
    if folded is None:
        return _Module(module)
    return _dense(*folded, weights)


def _fingerprint(model: nn.Module) -> tuple:
    """Changes whenever a weight changes (optimizer steps bump version counters) or the adapter state does."""
    params = tuple((p.data_ptr(), p._version) for p in model.parameters())
    state = tuple((tuple(m.live_adapters()), m.row_plan is not None) for m in model.modules()
                  if isinstance(m, AdapterLayer))
    return params, state


class DecodingCopy:
    """What one decode step needs of a model, built once per weights version."""

    def __init__(self, model: nn.Module, weights: str = "fp32"):
        if weights not in WEIGHTS:
            raise ValueError(f"decode weights must be one of {', '.join(WEIGHTS)}, got {weights!r}")
        why = refusal(model)
        if why is not None:
            raise ValueError(f"the fast decoder cannot run this model: {why}")
        self.weights = weights
        body = model.model
        cfg = model.config
        self.embed = body.embed_tokens
        self.rotary = body.rotary_emb
        self.norm = body.norm
        self.n_heads = cfg.num_attention_heads
        self.n_kv = getattr(cfg, "num_key_value_heads", None) or self.n_heads
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // self.n_heads
        self.scaling = body.layers[0].self_attn.scaling
        self.layers = []
        for layer in body.layers:
            projs = [_proj(getattr(getattr(layer, p), n), weights) for p, n in _PROJ]
            self.layers.append((layer.input_layernorm, layer.post_attention_layernorm, layer.mlp.act_fn, projs))
        self.head = _proj(model.get_output_embeddings(), "fp32" if weights == "int8-body" else weights)
        self.dtype = next(model.parameters()).dtype

    def empty_cache(self, batch: int, capacity: int, device) -> StaticCache:
        shape = (batch, self.n_kv, capacity, self.head_dim)
        return StaticCache([torch.zeros(shape, dtype=self.dtype, device=device) for _ in self.layers],
                           [torch.zeros(shape, dtype=self.dtype, device=device) for _ in self.layers],
                           torch.zeros(batch, capacity, dtype=torch.long, device=device), 0)

    @torch.no_grad()
    def step(self, tokens: torch.Tensor, cache: StaticCache) -> torch.Tensor:
        """Each row's newest token (B,) after its cached columns -> next logits (B, V); the cache grows by
        one column in place (as `generate.decode_step` grows a DynamicCache)."""
        cache.ensure(cache.length + 1)
        t = cache.length
        positions = cache.mask[:, :t].sum(-1, keepdim=True)  # (B, 1): the row's own next position
        cache.mask[:, t] = 1
        cache.length = t + 1
        x = self.embed(tokens.unsqueeze(1))  # (B, 1, C)
        allowed = cache.mask[:, None, None, :t + 1].bool()  # (B, 1, 1, t + 1)

        def write(keys, values, k, v):  # one new column, then attend over the t + 1 written ones
            keys[:, :, t:t + 1] = k
            values[:, :, t:t + 1] = v
            return keys[:, :, :t + 1], values[:, :, :t + 1]

        return self._layers(x, positions, cache, allowed, write)

    def _layers(self, x: torch.Tensor, positions: torch.Tensor, cache: StaticCache, allowed: torch.Tensor,
                write) -> torch.Tensor:
        """The decoder blocks and the head for one new token per row. `write(keys, values, k, v)` stores
        the new keys/values in the layer's cache and returns what attention reads: how `step` and
        `step_fixed` differ (a growing slice vs every column of the cache)."""
        batch = x.shape[0]
        cos, sin = self.rotary(x, positions)
        cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)  # (B, 1, 1, D)
        for (in_norm, post_norm, act, (q_p, k_p, v_p, o_p, g_p, u_p, d_p)), keys, values in zip(
                self.layers, cache.keys, cache.values):
            h = in_norm(x)
            q = q_p(h).view(batch, 1, self.n_heads, self.head_dim).transpose(1, 2)
            k = k_p(h).view(batch, 1, self.n_kv, self.head_dim).transpose(1, 2)
            v = v_p(h).view(batch, 1, self.n_kv, self.head_dim).transpose(1, 2)
            q = q * cos + _rotate_half(q) * sin
            k = k * cos + _rotate_half(k) * sin
            keys_read, values_read = write(keys, values, k, v)
            a = F.scaled_dot_product_attention(q, keys_read, values_read, attn_mask=allowed, scale=self.scaling,
                                               enable_gqa=self.n_kv != self.n_heads)
            x = x + o_p(a.transpose(1, 2).reshape(batch, 1, -1))
            h = post_norm(x)
            x = x + d_p(act(g_p(h)) * u_p(h))
        return self.head(self.norm(x))[:, -1]  # (B, V)

    @torch.no_grad()
    def step_fixed(self, tokens: torch.Tensor, cache: StaticCache, column: torch.Tensor) -> torch.Tensor:
        """`step` with shapes that never change, for CUDA graphs and torch.compile: attention runs over every
        column of the cache (the mask hides the unwritten ones, which are 0), and the column written is a
        (1,) tensor. The caller advances `cache.length`. Same numbers as `step` up to float rounding."""
        positions = cache.mask.sum(-1, keepdim=True)  # (B, 1): tokens so far = the next position
        cache.mask.index_fill_(1, column, 1)
        x = self.embed(tokens.unsqueeze(1))
        allowed = cache.mask[:, None, None, :].bool()  # (B, 1, 1, capacity)

        def write(keys, values, k, v):  # the column given as a tensor; attention reads the whole cache
            keys.index_copy_(2, column, k)
            values.index_copy_(2, column, v)
            return keys, values

        return self._layers(x, positions, cache, allowed, write)


class FixedStep:
    """Runs `DecodingCopy.step_fixed` on one static cache, through a captured CUDA graph (`graph=True`: one
    launch per token instead of ~20 kernels per layer, the cure for launch-bound GPU decoding), through
    `torch.compile` (`compiled=True`, mode reduce-overhead: CUDA graphs of the compiled step), or eagerly
    (the CPU reference the tests compare against). The cache keeps its capacity: no growth mid-generation."""

    def __init__(self, copy: DecodingCopy, cache: StaticCache, graph: bool = False, compiled: bool = False):
        self.copy, self.cache = copy, cache
        device = cache.mask.device
        self.tokens = torch.zeros(cache.batch, dtype=torch.long, device=device)
        self.column = torch.zeros(1, dtype=torch.long, device=device)
        self.fn = torch.compile(copy.step_fixed, mode="reduce-overhead") if compiled else copy.step_fixed
        self.graph = None
        if graph:
            if device.type != "cuda":
                raise ValueError("CUDA graphs need a CUDA device")
            last = cache.capacity - 1  # warm-up and capture write the last column, then give it back
            self.column.fill_(last)
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                for _ in range(2):
                    cache.mask[:, last] = 0
                    self.copy.step_fixed(self.tokens, cache, self.column)
            torch.cuda.current_stream().wait_stream(side)
            cache.mask[:, last] = 0
            self.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.graph):
                self.logits = self.copy.step_fixed(self.tokens, cache, self.column)
            cache.mask[:, last] = 0

    def __call__(self, tokens: torch.Tensor) -> torch.Tensor:
        cache = self.cache
        if cache.length >= cache.capacity:
            raise ValueError(f"the static cache is full ({cache.capacity} columns)")
        self.tokens.copy_(tokens)
        self.column.fill_(cache.length)
        cache.length += 1
        if self.graph is not None:
            self.graph.replay()
            return self.logits
        return self.fn(self.tokens, cache, self.column)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


@dataclass
class StaticCache:
    """Per layer keys and values (B, H_kv, capacity, D); columns [0, length) hold tokens or left padding,
    `mask` (B, capacity) is 1 where a row has a token. Written in place; reallocated only to grow."""

    keys: list[torch.Tensor]
    values: list[torch.Tensor]
    mask: torch.Tensor
    length: int

    @classmethod
    def from_dynamic(cls, cache, mask: torch.Tensor, extra: int) -> StaticCache:
        """Copy a prefilled DynamicCache (and its (B, T) mask) into buffers with room for `extra` more columns."""
        width = mask.shape[1]
        keys, values = [], []
        for layer in cache.layers:
            b, h, t, d = layer.keys.shape
            if t != width:
                raise ValueError(f"cache holds {t} columns but the mask {width}")
            k = layer.keys.new_zeros(b, h, width + extra, d)
            v = layer.values.new_zeros(b, h, width + extra, d)
            k[:, :, :width] = layer.keys
            v[:, :, :width] = layer.values
            keys.append(k)
            values.append(v)
        full = mask.new_zeros(mask.shape[0], width + extra)
        full[:, :width] = mask
        return cls(keys, values, full, width)

    @property
    def capacity(self) -> int:
        return self.mask.shape[1]

    @property
    def batch(self) -> int:
        return self.mask.shape[0]

    def ensure(self, columns: int) -> None:
        """Room for `columns` columns (serving batches can outlive the first guess)."""
        if columns <= self.capacity:
            return
        grow = max(_CHUNK, columns - self.capacity)
        self.keys = [_pad_right(k, grow, 2) for k in self.keys]
        self.values = [_pad_right(v, grow, 2) for v in self.values]
        self.mask = _pad_right(self.mask, grow, 1)

    def active_mask(self) -> torch.Tensor:
        return self.mask[:, :self.length]

    def as_dynamic(self):
        """A DynamicCache over the filled columns (views, no copy), for a plain decode step."""
        from transformers import DynamicCache

        cache = DynamicCache()
        for i, (k, v) in enumerate(zip(self.keys, self.values)):
            cache.update(k[:, :, :self.length], v[:, :, :self.length], i)
        return cache

    def absorb(self, cache, mask: torch.Tensor) -> None:
        """Take the columns a plain decode step appended to `as_dynamic()`'s cache (and its grown mask)."""
        width = mask.shape[1]
        self.ensure(width)
        for layer, k, v in zip(cache.layers, self.keys, self.values):
            k[:, :, self.length:width] = layer.keys[:, :, self.length:width]
            v[:, :, self.length:width] = layer.values[:, :, self.length:width]
        self.mask[:, self.length:width] = mask[:, self.length:width]
        self.length = width


def _pad_right(x: torch.Tensor, n: int, dim: int) -> torch.Tensor:
    shape = list(x.shape)
    shape[dim] = n
    return torch.cat([x, x.new_zeros(shape)], dim=dim)


_COPIES: "weakref.WeakKeyDictionary[nn.Module, dict]" = weakref.WeakKeyDictionary()


def decoding_copy(model: nn.Module, weights: str = "fp32") -> DecodingCopy:
    """The model's decoding copy. fp32 is rebuilt at every call: it copies nothing but the folded LoRA
    weights (a few ms), so a rollout after an optimizer step always decodes the current policy, however
    the weights were written. bf16 and int8 copies cost a pass over every weight (~1 s for the default
    model): they are kept per model and rebuilt when a parameter's storage or version counter changes
    (writes through `.data` bypass the counter: call `forget(model)` after them)."""
    if weights == "fp32":
        return DecodingCopy(model, weights)
    key = _fingerprint(model)
    slot = _COPIES.setdefault(model, {})
    hit = slot.get(weights)
    if hit is not None and hit[0] == key:
        return hit[1]
    copy = DecodingCopy(model, weights)
    slot[weights] = (key, copy)
    return copy


def forget(model: nn.Module) -> None:
    """Drop the model's kept bf16/int8 decoding copies."""
    _COPIES.pop(model, None)
