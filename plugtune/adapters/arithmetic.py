"""Adapter arithmetic: combine saved LoRA adapters into a new, ordinary LoRA adapter directory.

Pure tensor work on the files (no model in memory). Each input i and module gives

    dW_i = s_i B_i A_i        A_i: (r_i, in), B_i: (out, r_i), s_i = alpha_i / r_i (rsLoRA: alpha_i / sqrt(r_i))

Methods (PEFT's add_weighted_adapter names, so results compare one to one):
  linear (= PEFT "cat")  exact sum_i w_i dW_i, factors concatenated along the rank
  svd                    sum_i w_i dW_i, then truncated SVD to `rank`
  ties, dare_linear, dare_ties            TIES / DARE on the A and B factors separately (equal ranks)
  ties_svd, dare_linear_svd, dare_ties_svd  TIES / DARE on each dW_i, then truncated SVD
PEFT's own factor-wise "linear" (sum of sqrt-weighted A's times sum of B's) has cross terms
B_i A_j and is not offered: our `linear` is the exact one.
The output always has lora_alpha = r and use_rslora = false (s = 1): the factors carry every scale.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file

from plugtune.adapters.io import (CONFIG_FILE, META_FILE, WEIGHTS_FILE, _PEFT_PREFIX, read_adapter_config,
                                  read_adapter_weights)

METHODS = ("linear", "svd", "ties", "ties_svd", "dare_linear", "dare_linear_svd", "dare_ties", "dare_ties_svd")
_SIGN_ELECTING = ("ties", "dare_ties")
# (A suffix, B suffix) as PEFT saves them: Linear / Conv1D layers, and embeddings (A: (r, vocab), B: (dim, r)).
_PAIRS = ((".lora_A.weight", ".lora_B.weight"), (".lora_embedding_A", ".lora_embedding_B"))
# PEFT options whose adapters are not a plain s * B A on the unchanged base.
_UNSUPPORTED = {
    "use_dora": "DoRA's magnitude vectors do not combine linearly; merge each DoRA adapter into the base instead",
    "lora_bias": "the extra LoRA bias vectors are not part of B A",
    "alpha_pattern": "per-module alphas are not supported; re-save the adapter without alpha_pattern",
    "modules_to_save": "whole trained modules cannot be summed as low-rank deltas",
    "trainable_token_indices": "trainable token rows are not LoRA factors",
    "target_parameters": "LoRA on nn.Parameter targets is not supported",
    "layer_replication": "replicated layers change the base",
    "alora_invocation_tokens": "aLoRA is only active after its invocation tokens",
}
_BASE_CHANGING_INITS = ("pissa", "olora", "corda", "loftq")  # these move the base weights at init


# --- the core operations, on tensors -------------------------------------------------------------------------

def magnitude_trim(t: torch.Tensor, density: float) -> torch.Tensor:
    """TIES step 1 "trim" (Yadav et al. 2023, Algorithm 1): keep the int(density * n) largest |t|, zero the rest."""
    if density >= 1:
        return t
    keep = torch.topk(t.abs().reshape(-1), k=int(density * t.numel())).indices
    mask = torch.zeros(t.numel(), dtype=t.dtype)
    mask[keep] = 1
    return t * mask.view(t.shape)


def dare_rescale(t: torch.Tensor, keep: torch.Tensor, density: float) -> torch.Tensor:
    """DARE (Yu et al. 2023, sec. 3): drop with rate p, rescale the rest, d_hat = keep * d / (1 - p),
    p = 1 - density, so E[d_hat] = d when keep ~ Bernoulli(1 - p). keep: 0/1, same shape as t."""
    return t * keep / density


def dare_prune(t: torch.Tensor, density: float, generator: torch.Generator) -> torch.Tensor:
    """DARE with a random mask: the same torch.bernoulli draw as PEFT's random_pruning."""
    if density >= 1:  # nothing dropped; PEFT draws no mask either, so the random streams stay aligned
        return t
    return dare_rescale(t, torch.bernoulli(torch.full_like(t, density), generator=generator), density)


def elect_sign(stacked: torch.Tensor, method: str = "total") -> torch.Tensor:
    """TIES step 2 "elect": per entry, gamma = sgn(sum_t tau_t) ("total" mass, Algorithm 1) or the sign held by
    more tasks ("frequency"); ties go to +. stacked: (n_tasks, ...) -> bool mask (n_tasks, ...) of the entries
    that agree with the elected sign (zeros never agree)."""
    sign = stacked.sign()
    if method == "total":
        score = stacked.sum(0)
    elif method == "frequency":
        score = sign.sum(0)
    else:
        raise ValueError(f"majority_sign must be 'total' or 'frequency', got {method!r}")
    return sign == torch.where(score >= 0, 1.0, -1.0).to(sign.dtype)


def disjoint_merge(weighted: torch.Tensor, agree: torch.Tensor) -> torch.Tensor:
    """TIES step 3 "disjoint merge": per entry, the mean over the tasks that agree with the elected sign,
    tau_m = 1/|A| sum_{t in A} tau_t (entries nobody keeps stay 0). (n_tasks, ...) -> (...)."""
    return (weighted * agree).sum(0) / agree.sum(0).clamp(min=1)


def merge_tensors(tensors: list[torch.Tensor], weights: list[float], method: str = "linear", density: float = 1.0,
                  majority_sign: str = "total", generator: torch.Generator | None = None) -> torch.Tensor:
    """Merge same-shape task tensors: method in linear | ties | dare_linear | dare_ties.
    As in PEFT, trimming and sign election see the unweighted tensors; weights w_t scale each task before the
    sum (linear, DARE) or the disjoint mean (TIES, where they stand in for the paper's single lambda)."""
    if method == "ties":
        tensors = [magnitude_trim(t, density) for t in tensors]
    elif method.startswith("dare"):
        tensors = [dare_prune(t, density, generator) for t in tensors]
    stacked = torch.stack(tensors)  # (n, ...)
    w = torch.tensor(weights, dtype=stacked.dtype).view(-1, *[1] * (stacked.dim() - 1))
    if method in _SIGN_ELECTING:
        return disjoint_merge(stacked * w, elect_sign(stacked, majority_sign))
    return (stacked * w).sum(0)


def truncated_svd(delta: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """dW (out, in) -> A (rank, in) = V_r^T, B (out, rank) = U_r S_r: the best rank-r approximation (Eckart-Young).
    S goes wholly into B, as in PEFT. The reduced SVD gives the same leading factors as PEFT's full_matrices=True
    at less cost; PEFT's optional quantile clamp is off by default and not offered. Columns past min(out, in)
    are zero so every module has the same rank."""
    U, S, Vh = torch.linalg.svd(delta, full_matrices=False)  # U (out, k), S (k,), Vh (k, in)
    k = min(rank, S.numel())
    A = delta.new_zeros(rank, delta.shape[1])
    B = delta.new_zeros(delta.shape[0], rank)
    A[:k], B[:, :k] = Vh[:k], U[:, :k] * S[:k]
    return A, B


# --- reading the inputs --------------------------------------------------------------------------------------

@dataclass
class _Lora:
    path: Path
    config: dict
    factors: dict[str, tuple[torch.Tensor, torch.Tensor]]  # module -> (A (r, in), B (out, r)), float32
    keys: dict[str, tuple[str, str]]  # module -> the (A, B) keys as saved
    extras: dict[str, torch.Tensor]  # other tensors, e.g. PEFT's copy of an adapted embedding table
    meta: dict | None
    dtype: torch.dtype

    def scaling(self, module: str) -> float:
        r = self.factors[module][0].shape[0]  # the module's own rank, so PEFT's rank_pattern is honoured
        alpha = float(self.config.get("lora_alpha", 8))
        return alpha / (math.sqrt(r) if self.config.get("use_rslora") else r)

    def delta(self, module: str) -> torch.Tensor:
        A, B = self.factors[module]
        return (B @ A) * self.scaling(module)  # (out, in); an embedding's is (dim, vocab)


def _read_lora(path: str | Path) -> _Lora:
    path = Path(path)
    cfg = read_adapter_config(path)
    if cfg.get("peft_type") != "LORA":
        raise ValueError(f"{path} is a {cfg.get('peft_type')} adapter; only LoRA adapters can be combined")
    for key, why in _UNSUPPORTED.items():
        if cfg.get(key):
            raise ValueError(f"{path} uses {key}={cfg[key]!r}, which cannot be combined: {why}")
    init = cfg.get("init_lora_weights")
    if isinstance(init, str) and init.lower().startswith(_BASE_CHANGING_INITS):
        raise ValueError(f"{path} was initialised with {init!r}, which changes the base weights, so B A is not a "
                         "delta on the original base; convert it to a plain LoRA first (PEFT's "
                         "path_initial_model_for_weight_conversion)")
    if not (path / WEIGHTS_FILE).is_file():
        raise FileNotFoundError(f"{path / WEIGHTS_FILE} is missing")
    state, _ = read_adapter_weights(path)
    factors, keys, extras = {}, {}, {}
    b_keys = {k for _, b in _PAIRS for k in state if k.endswith(b)}
    for key, t in state.items():
        pair = next(((a, b) for a, b in _PAIRS if key.endswith(a)), None)
        if pair is None:
            if key not in b_keys:
                if "lora_" in key:
                    raise ValueError(f"{path}: tensor {key} is not a LoRA A/B factor and cannot be combined")
                extras[key] = t
            continue
        module = key[: -len(pair[0])]
        b_key = module + pair[1]
        if b_key not in state:
            raise ValueError(f"{path}: {key} has no matching {b_key}; the adapter file is incomplete")
        if t.dim() != 2:
            raise ValueError(f"{path}: {key} has shape {tuple(t.shape)}; only Linear and Embedding LoRA combine")
        factors[module] = (t.float(), state[b_key].float())
        keys[module] = (key, b_key)
    if not factors:
        raise ValueError(f"{path} holds no LoRA factors")
    meta_file = path / META_FILE
    meta = json.loads(meta_file.read_text()) if meta_file.is_file() else None
    dtype = state[next(iter(keys.values()))[0]].dtype  # the saved precision, kept for the output
    return _Lora(path, cfg, factors, keys, extras, meta, dtype)


def _natural_key(module: str) -> tuple:
    # layers.2 before layers.10. The model's own order is unknown from the files; for DARE, masks are drawn in
    # this order, which matches PEFT's wherever it agrees with the model's (e.g. q_proj, v_proj).
    return tuple((0, int(p), "") if p.isdigit() else (1, 0, p) for p in module.split("."))


# --- combining -----------------------------------------------------------------------------------------------

def _check_arguments(adapters, weights, method, rank, density, majority_sign) -> None:
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose one of {', '.join(METHODS)}")
    if not adapters:
        raise ValueError("no adapters given; pass at least one adapter directory")
    if len(weights) != len(adapters):
        raise ValueError(f"got {len(weights)} weight(s) for {len(adapters)} adapters; give one weight per adapter")
    if len(adapters) < 2 and method.removesuffix("_svd") in _SIGN_ELECTING:
        raise ValueError(f"{method} elects a sign across adapters and needs at least 2; "
                         "use svd to re-rank a single adapter or dare_linear to sparsify one")
    if rank is not None and rank < 1:
        raise ValueError(f"rank must be >= 1, got {rank}")
    if rank is not None and not method.endswith("svd"):
        raise ValueError(f"rank is chosen by the SVD methods only; {method} keeps the input ranks "
                         "(use svd, ties_svd, dare_linear_svd or dare_ties_svd to set one)")
    if not 0 < density <= 1:
        raise ValueError(f"density must be in (0, 1] (the fraction of values kept), got {density}")
    if density < 1 and method in ("linear", "svd"):
        raise ValueError(f"density only applies to the TIES and DARE methods, not to {method}")
    if majority_sign not in ("total", "frequency"):
        raise ValueError(f"majority_sign must be 'total' or 'frequency', got {majority_sign!r}")


def _check_shapes(module: str, present: list[_Lora]) -> None:
    first = present[0]
    for other in present[1:]:
        (a0, b0), (a1, b1) = first.factors[module], other.factors[module]
        if (b0.shape[0], a0.shape[1]) != (b1.shape[0], a1.shape[1]):
            raise ValueError(f"{module.removeprefix(_PEFT_PREFIX)} is (out, in) = {(b0.shape[0], a0.shape[1])} in "
                             f"{first.path} but {(b1.shape[0], a1.shape[1])} in {other.path}: the adapters were "
                             "made for different base models; combine adapters of the same base only")


def _combined_meta(inputs: list[_Lora], record: dict) -> dict | None:
    """The sidecar: copied when every input has one for the same base; different bases are an error."""
    carrying = [x for x in inputs if x.meta is not None]
    for x in carrying[1:]:
        if x.meta.get("base_fingerprint") != carrying[0].meta.get("base_fingerprint"):
            raise ValueError(f"{carrying[0].path} and {x.path} were made for different base models (their "
                             f"{META_FILE} fingerprints differ); combine adapters of the same base only")
    if not inputs or len(carrying) < len(inputs):
        return None
    return {**carrying[0].meta, "combined_from": record}


def _target_modules(inputs: list[_Lora], modules: list[str]) -> list[str]:
    lists = [x.config.get("target_modules") for x in inputs]
    narrowed = any(x.config.get(k) for x in inputs for k in ("layers_to_transform", "layers_pattern", "exclude_modules"))
    if all(isinstance(t, list) for t in lists) and not narrowed:
        return sorted(set().union(*lists))  # each list matched exactly its own modules, so the union is exact
    # A regex or a list narrowed to some layers: name every module in full, which PEFT and plugtune both match.
    return [m.removeprefix(_PEFT_PREFIX) for m in modules]


def _combine_module(module, inputs, weights, method, rank, density, majority_sign, gen):
    """-> A (rank, in), B (out, rank) with s = 1."""
    present = [(x, w) for x, w in zip(inputs, weights) if module in x.factors]  # absent inputs contribute zero
    _check_shapes(module, [x for x, _ in present])
    if method == "linear":
        # sum_i w_i s_i B_i A_i = [B_1 .. B_n] [w_1 s_1 A_1; ..; w_n s_n A_n]: exact (PEFT's "cat").
        A = torch.cat([w * x.scaling(module) * x.factors[module][0] for x, w in present])  # (sum r_i, in)
        B = torch.cat([x.factors[module][1] for x, _ in present], dim=1)  # (out, sum r_i)
        pad = rank - A.shape[0]  # zero rows/columns where fewer inputs target this module
        return torch.nn.functional.pad(A, (0, 0, 0, pad)), torch.nn.functional.pad(B, (0, pad))
    base = "linear" if method == "svd" else method.removesuffix("_svd")
    ws = [w for _, w in present]
    if method.endswith("svd"):
        delta = merge_tensors([x.delta(module) for x, _ in present], ws, base, density, majority_sign, gen)
        return truncated_svd(delta, rank)
    # Factor-wise (PEFT's ties / dare_*): merge the A's and the B's separately, w_i s_i split as
    # sign * sqrt|w_i s_i| on A and sqrt|w_i s_i| on B. Approximate: B A gains cross terms B_i A_j.
    ws_full = [w * x.scaling(module) for x, w in present]
    wa = [math.copysign(math.sqrt(abs(v)), v) for v in ws_full]  # the sign on one side only, as PEFT
    wb = [math.sqrt(abs(v)) for v in ws_full]
    A = merge_tensors([x.factors[module][0] for x, _ in present], wa, base, density, majority_sign, gen)
    B = merge_tensors([x.factors[module][1] for x, _ in present], wb, base, density, majority_sign, gen)
    return A, B


def combine_adapters(adapters: list[str | Path], weights: list[float], out_dir: str | Path,
                     method: str = "linear", rank: int | None = None, density: float = 1.0,
                     majority_sign: str = "total", seed: int = 0) -> Path:
    """Combine saved LoRA adapters (same base) into a new LoRA adapter directory; returns `out_dir`.

    DARE masks come from torch.Generator().manual_seed(seed), drawn module by module (natural name order),
    per module the inputs' A's, then their B's (factor-wise) or their dW's (*_svd), as PEFT draws them.
    """
    method = "linear" if method == "cat" else method
    _check_arguments(adapters, weights, method, rank, density, majority_sign)
    inputs = [_read_lora(p) for p in adapters]
    modules = sorted({m for x in inputs for m in x.factors}, key=_natural_key)
    ranks = {m: [x.factors[m][0].shape[0] for x in inputs if m in x.factors] for m in modules}
    if method == "linear":
        new_rank = max(sum(r) for r in ranks.values())  # sum_i r_i where every input targets the module
    elif method.endswith("svd"):
        new_rank = rank or max(max(r) for r in ranks.values())  # PEFT's default: the largest input rank
    else:
        distinct = {r for rs in ranks.values() for r in rs}
        if len(distinct) > 1:
            raise ValueError(f"{method} merges the A and B factors entry by entry and needs equal ranks, got ranks "
                             f"{sorted(distinct)}; use {method}_svd, which works on B A and allows any ranks")
        new_rank = distinct.pop()
    record = {"adapters": [str(p) for p in adapters], "weights": list(weights), "method": method,
              "rank": new_rank, "density": density, "majority_sign": majority_sign, "seed": seed}
    meta = _combined_meta(inputs, record)
    gen = torch.Generator().manual_seed(seed)
    dtypes = {x.dtype for x in inputs}
    dtype = dtypes.pop() if len(dtypes) == 1 else torch.float32
    state = {}
    for module in modules:
        A, B = _combine_module(module, inputs, weights, method, new_rank, density, majority_sign, gen)
        key_a, key_b = next(x.keys[module] for x in inputs if module in x.factors)
        state[key_a], state[key_b] = A.to(dtype).contiguous(), B.to(dtype).contiguous()
    for x in inputs:  # tensors that are not factors (PEFT's embedding copy) must agree, then pass through
        for key, t in x.extras.items():
            if key in state and not torch.equal(state[key], t):
                raise ValueError(f"{key} differs between the inputs: the adapters were made for different bases")
            state[key] = t
    cfg = {**inputs[0].config, "r": new_rank, "lora_alpha": new_rank, "use_rslora": False, "use_dora": False,
           "target_modules": _target_modules(inputs, modules), "rank_pattern": {}, "alpha_pattern": {},
           "layers_to_transform": None, "layers_pattern": None, "exclude_modules": None,
           "init_lora_weights": True, "inference_mode": True}
    return _write(Path(out_dir), state, cfg, meta)


def _write(out: Path, state: dict, cfg: dict, meta: dict | None) -> Path:
    # Temporary names, then rename (as save_adapter): a crash never leaves a half-written adapter.
    out.mkdir(parents=True, exist_ok=True)
    tmp_w, tmp_c, tmp_m = (out / (name + ".tmp") for name in (WEIGHTS_FILE, CONFIG_FILE, META_FILE))
    save_file(state, str(tmp_w), metadata={"format": "pt"})
    tmp_c.write_text(json.dumps(cfg, indent=2, sort_keys=True))
    if meta is not None:
        tmp_m.write_text(json.dumps(meta, indent=2, sort_keys=True))
    tmp_w.replace(out / WEIGHTS_FILE)
    tmp_c.replace(out / CONFIG_FILE)
    if meta is not None:
        tmp_m.replace(out / META_FILE)
    else:  # a stale sidecar from an earlier run would vouch for a base this result was not checked against
        (out / META_FILE).unlink(missing_ok=True)
    return out


# --- CLI -----------------------------------------------------------------------------------------------------

def cmd_adapters_combine(args) -> None:
    out = combine_adapters(args.adapter, args.weights, args.out, method=args.method, rank=args.rank,
                           density=args.density, majority_sign=args.majority_sign, seed=args.seed)
    r = read_adapter_config(out)["r"]
    print(f"combined {len(args.adapter)} adapters ({args.method}) into {out}: LoRA rank {r}")


def add_combine_parser(adapters_subparsers) -> None:
    """Register `plugtune adapters combine --adapter DIR --adapter DIR --weights 0.6 0.4 --method linear --out DIR`."""
    p = adapters_subparsers.add_parser("combine", help="combine LoRA adapters (exact sum, SVD, TIES, DARE) into one")
    p.add_argument("--adapter", action="append", required=True, help="input LoRA adapter directory (repeat)")
    p.add_argument("--weights", type=float, nargs="+", required=True, help="one weight per adapter (may be < 0)")
    p.add_argument("--method", default="linear", choices=METHODS + ("cat",))
    p.add_argument("--rank", type=int, default=None, help="output rank for the *svd methods (default: largest input)")
    p.add_argument("--density", type=float, default=1.0, help="fraction of values kept by TIES / DARE")
    p.add_argument("--majority-sign", default="total", choices=("total", "frequency"))
    p.add_argument("--seed", type=int, default=0, help="seed of the DARE masks")
    p.add_argument("--out", required=True, help="output adapter directory")
    p.set_defaults(func=cmd_adapters_combine)
