"""Weight-only quantized matmul kernels on this CPU, measured on the default model's layer shapes.

    flock /tmp/plugtune-cpu.lock env OMP_NUM_THREADS=2 python bench/quant_kernels.py

SmolLM2-135M's linear layers are (out, in) = (576, 576) attention, (1536, 576) MLP up/gate, (576, 1536)
MLP down, and the (49152, 576) LM head. Each candidate computes y = x W^T for x of 1 row (batch-1
decode), 8 rows (batch-8 decode) and 512 rows (a training micro-batch), timed as the median of repeated
calls, against fp32 `F.linear` in the same run (alternating: one call of each candidate per round).

Candidates: plugtune's layers (models/quantize.py: dequantize one layer, fp32 GEMM), PyTorch's own kernels (`aten._weight_int8pack_mm`, `aten._weight_int4pack_mm_for_cpu`),
torchao (int8 / int4 weight-only, int8 dynamic activation), bitsandbytes' CPU backend (Linear8bitLt,
Linear4bit nf4) and optimum-quanto (qint8 / qint4) and HQQ (4-bit, its PyTorch backend), each where it
installs and runs without another torch. Writes bench/results/quant_kernels.json.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # plugtune from this checkout, installed or not

SHAPES = [(576, 576), (1536, 576), (576, 1536), (49152, 576)]
ROWS = [1, 8, 512]
GROUP = 64  # int4 group size: divides 576 and 1536


def torch_int8(w: torch.Tensor):
    scales = w.abs().amax(1).clamp_min(1e-8) / 127
    q = torch.round(w / scales[:, None]).clamp(-127, 127).to(torch.int8)
    return lambda x: torch.ops.aten._weight_int8pack_mm(x, q, scales)


def torch_int4(w: torch.Tensor):
    n, k = w.shape
    g = w.reshape(n, k // GROUP, GROUP)
    lo, hi = g.amin(-1), g.amax(-1)
    scale = ((hi - lo) / 15).clamp_min(1e-8)
    q = torch.round((g - lo[..., None]) / scale[..., None]).clamp(0, 15).to(torch.int32).reshape(n, k)
    zero = lo + 8 * scale  # tinygemm's affine form: w = (q - 8) * scale + zero
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 1)
    sz = torch.stack([scale.T, zero.T], -1).contiguous()  # (k / group, n, 2)
    return lambda x: torch.ops.aten._weight_int4pack_mm_for_cpu(x, packed, GROUP, sz)


def torch_fbgemm(w: torch.Tensor):
    """PyTorch's quantized::linear_dynamic (fbgemm): int8 weights per row, activations per call (per tensor)."""
    scales = (w.abs().amax(1) / 127).clamp_min(1e-12).double()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        q = torch.quantize_per_channel(w, scales, torch.zeros_like(scales, dtype=torch.long), 0, torch.qint8)
        packed = torch.ops.quantized.linear_prepack(q, None)
    return lambda x: torch.ops.quantized.linear_dynamic(x, packed)


def _module(w: torch.Tensor) -> nn.Linear:
    lin = nn.Linear(w.shape[1], w.shape[0], bias=False)
    lin.weight.data.copy_(w)
    return lin.requires_grad_(False)


def torchao(config_name: str):
    def build(w):
        from torchao.quantization import (Int4WeightOnlyConfig, Int8DynamicActivationInt8WeightConfig,
                                          Int8WeightOnlyConfig, quantize_)
        configs = {"int8": lambda: Int8WeightOnlyConfig(),
                   "int8-dyn": lambda: Int8DynamicActivationInt8WeightConfig(),
                   "int4": lambda: Int4WeightOnlyConfig(group_size=GROUP, int4_packing_format="plain")}
        model = nn.Sequential(_module(w))
        quantize_(model, configs[config_name]())
        return model
    return build


def bnb(kind: str):
    def build(w):
        import bitsandbytes as bnbmod
        if kind == "int8":
            lin = bnbmod.nn.Linear8bitLt(w.shape[1], w.shape[0], bias=False, has_fp16_weights=False)
            lin.weight = bnbmod.nn.Int8Params(w.clone(), requires_grad=False, has_fp16_weights=False)
        else:
            lin = bnbmod.nn.Linear4bit(w.shape[1], w.shape[0], bias=False, quant_type="nf4", compute_dtype=torch.float32,
                                       compress_statistics=True)
            lin.weight = bnbmod.nn.Params4bit(w.clone(), requires_grad=False, quant_type="nf4", compress_statistics=True)
        lin = lin.to("cpu")  # quantizes on .to(device)
        lin(torch.zeros(1, w.shape[1]))
        return lin
    return build


def quanto(kind: str):
    def build(w):
        from optimum.quanto import freeze, qint4, qint8, quantize
        model = nn.Sequential(_module(w))
        quantize(model, weights=qint8 if kind == "int8" else qint4)
        freeze(model)
        return model
    return build


def hqq4(w):
    from hqq.core.quantize import BaseQuantizeConfig, HQQBackend, HQQLinear
    HQQLinear.set_backend(HQQBackend.PYTORCH)
    cfg = BaseQuantizeConfig(nbits=4, group_size=GROUP)
    return HQQLinear(_module(w), quant_config=cfg, compute_dtype=torch.float32, device="cpu")


def plugtune(scheme: str):
    def build(w):
        from plugtune.models.quantize import Int4Linear, Int8Linear
        return (Int8Linear if scheme == "int8" else Int4Linear)(w)
    return build


CANDIDATES = {
    "fp32 F.linear": lambda w: (lambda x: F.linear(x, w)),
    "plugtune int8 (chosen)": plugtune("int8"),
    "plugtune int4 g64 (chosen)": plugtune("int4"),
    "torch fbgemm int8 dyn": torch_fbgemm,
    "torch int8pack": torch_int8,
    "torch int4pack g64": torch_int4,
    "torchao int8 wo": torchao("int8"),
    "torchao int8 dyn-act": torchao("int8-dyn"),
    "torchao int4 wo g64": torchao("int4"),
    "bnb int8 (LLM.int8)": bnb("int8"),
    "bnb nf4": bnb("nf4"),
    "quanto qint8": quanto("int8"),
    "quanto qint4": quanto("int4"),
    "hqq 4bit g64": hqq4,
}


def median_ms(fns: dict, x: torch.Tensor, budget_s: float) -> dict[str, float]:
    """Median ms per call. A candidate whose timed warm-up call takes over 1 s is not repeated (its one
    call is its figure): PyTorch's packed kernels take seconds on 512 rows here."""
    slow = {}
    with torch.no_grad():
        for name, fn in fns.items():
            fn(x)  # warm-up
            t0 = time.perf_counter()
            fn(x)
            if time.perf_counter() - t0 > 1.0:
                slow[name] = 1000 * (time.perf_counter() - t0)
    fns = {k: f for k, f in fns.items() if k not in slow}
    times: dict[str, list[float]] = {k: [] for k in fns}
    with torch.no_grad():
        start = time.perf_counter()
        while time.perf_counter() - start < budget_s or min(len(t) for t in times.values()) < 3:
            for name, fn in fns.items():  # alternate candidates so drift hits all alike
                t0 = time.perf_counter()
                fn(x)
                times[name].append(time.perf_counter() - t0)
            if min(len(t) for t in times.values()) >= 50:
                break
    return {**{k: 1000 * statistics.median(v) for k, v in times.items()}, **slow}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--budget", type=float, default=1.5, help="seconds of timing per (shape, rows)")
    ap.add_argument("--only", nargs="*", help="candidate names to run (default: all)")
    ap.add_argument("--out", default="bench/results/quant_kernels.json")
    args = ap.parse_args()
    warnings.filterwarnings("ignore")
    torch.manual_seed(0)
    rows_out, errors, failed = [], {}, {}
    for n, k in SHAPES:
        w = torch.randn(n, k) * 0.02
        fns = {}
        for name, build in CANDIDATES.items():
            if args.only and name not in args.only and name != "fp32 F.linear":
                continue
            try:
                fn = build(w)
                probe = torch.randn(4, k)
                with torch.no_grad():
                    rel = ((fn(probe).float() - F.linear(probe, w)).norm() / F.linear(probe, w).norm()).item()
                fns[name] = fn
                errors.setdefault(name, {})[f"{n}x{k}"] = rel
            except Exception as exc:  # a candidate without a kernel here: recorded, not fatal
                failed[name] = f"{type(exc).__name__}: {' '.join(str(exc).split())[:160]}"
        for m in ROWS:
            ms = median_ms(fns, torch.randn(m, k), args.budget)
            for name, t in ms.items():
                rows_out.append({"shape": f"{n}x{k}", "rows": m, "candidate": name, "ms": t,
                                 "vs_fp32": ms["fp32 F.linear"] / t})
            print(f"{n}x{k} rows {m}: " + ", ".join(f"{c} {t:.3f}" for c, t in ms.items()), flush=True)
    names = list(dict.fromkeys(r["candidate"] for r in rows_out))
    cols = [(f"{n}x{k}", m) for n, k in SHAPES for m in ROWS]
    print("\nspeed vs fp32 F.linear (>1 faster), OMP threads", torch.get_num_threads())
    print("| candidate | rel. error | " + " | ".join(f"{s} b{m}" for s, m in cols) + " |")
    print("|---|---|" + "---|" * len(cols))
    for name in names:
        cell = {(r["shape"], r["rows"]): r["vs_fp32"] for r in rows_out if r["candidate"] == name}
        err = max(errors[name].values())
        print(f"| {name} | {err:.1e} | " + " | ".join(f"{cell[c]:.2f}x" for c in cols) + " |")
    for name, why in failed.items():
        print(f"FAILED {name}: {why}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"threads": torch.get_num_threads(), "torch": torch.__version__,
                                          "rows": rows_out, "rel_error": errors, "failed": failed}, indent=1))


if __name__ == "__main__":
    main()
