"""fp32 vs quantized bases (int8, int4; nf4 on CUDA) on the default model, in one run.

    flock /tmp/plugtune-cpu.lock env OMP_NUM_THREADS=2 python bench/quantization.py

For each scheme, in its own process (so peak memory is that scheme's):
  - memory: process RSS once the base is loaded (and quantized), and the peak RSS of the whole process
    (the base is read in fp32 and quantized layer by layer, so the load itself peaks near the fp32 size);
  - greedy decode tokens/s at batch 1 and batch 8 (the base, `--decode-tokens` new tokens, no end token);
  - the demo's quality: ONE LoRA adapter trained on the fp32 base (`plugtune demo`'s adapter,
    runs/demo/adapter, trained here first if missing) evaluated on each base: held-out loss on the
    demo's 100 held-out examples, and exact match on them (greedy, as `plugtune demo`);
  - LoRA training step time: a fresh demo LoRA (r 16 on q/k/v/o, batch 16) for `--train-steps` steps
    on the scheme's base (median step time, first step excluded).
Prints a table and writes bench/results/quantization.json.
"""
from __future__ import annotations

import argparse
import gc
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # plugtune from this checkout, installed or not

DEMO_ADAPTER = ROOT / "runs" / "demo" / "adapter"


def rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def decode_tps(model, tokenizer, prompts: list[list[int]], tokens: int, repeats: int = 2) -> float:
    import torch

    from plugtune.inference.generate import GenerationConfig, generate_ids

    cfg = GenerationConfig(max_new_tokens=tokens)
    generate_ids(model, prompts, [], tokenizer.pad_token_id, GenerationConfig(max_new_tokens=2))  # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        with torch.no_grad():
            out = generate_ids(model, prompts, [], tokenizer.pad_token_id, cfg)  # no stop token: exactly `tokens`
        times.append(time.perf_counter() - t0)
        assert all(len(o) == tokens for o in out)
    return len(prompts) * tokens / statistics.median(times)


def worker(scheme: str, args) -> dict:
    import torch

    from plugtune.adapters import load_adapter
    from plugtune.config import load_run_config
    from plugtune.data import load_examples
    from plugtune.data.tokenize import prompt_ids
    from plugtune.evaluation import exact_match, loss_and_perplexity
    from plugtune.inference.generate import GenerationConfig
    from plugtune.models.loading import load_base
    from plugtune.models.quantize import quantized_layers
    from plugtune.adapters.layers import set_active_adapters
    from plugtune.training.run import train

    torch.manual_seed(0)
    t0 = time.perf_counter()
    loaded = load_base(args.model, quantize="none" if scheme == "fp32" else scheme)
    gc.collect()
    model, tok = loaded.model.eval(), loaded.tokenizer
    row = {"scheme": scheme, "load_s": time.perf_counter() - t0, "rss_loaded_mb": rss_mb(),
           "quantized_layers": len(quantized_layers(model)),
           "linear_weight_mb": sum((m.storage_bytes() if hasattr(m, "storage_bytes") else m.weight.numel() * 4)
                                   for n, m in model.named_modules()
                                   if (hasattr(m, "storage_bytes") or isinstance(m, torch.nn.Linear))
                                   and "lm_head" not in n) / 2**20}
    test = load_examples("plugtune:skills/dates_test.jsonl")[:args.n_test]
    prompts = [prompt_ids(tok, ex.prompt_messages()) for ex in test[:8]]
    row["decode_tps_b1"] = decode_tps(model, tok, prompts[:1], args.decode_tokens)
    row["decode_tps_b8"] = decode_tps(model, tok, prompts[:8], args.decode_tokens)

    load_adapter(model, args.adapter, "demo")
    set_active_adapters(model, "demo")
    model.eval()
    row["heldout_loss"] = loss_and_perplexity(model, tok, test, max_length=96)["loss"]
    em = exact_match(model, tok, test, GenerationConfig(max_new_tokens=24))
    row["exact_match"] = em.accuracy
    row["exact_match_s"] = em.seconds
    set_active_adapters(model, None)

    with tempfile.TemporaryDirectory() as out:
        cfg = load_run_config("demo_lora", [f"model.name={args.model}", f"output.dir={out}", "data.eval=",
                                            f"training.max_steps={args.train_steps}", "training.progress=false",
                                            "output.plot=false",
                                            f"model.quantize={'none' if scheme == 'fp32' else scheme}"])
        report = train(cfg, loaded)
        steps = [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]
    elapsed = [s["elapsed_s"] for s in steps if "elapsed_s" in s]
    step_s = [b - a for a, b in zip(elapsed, elapsed[1:])]  # the first step (warm-up) excluded
    row["train_step_s"] = statistics.median(step_s) if step_s else report.train_seconds / report.steps
    row["train_loss"] = report.train_loss
    row["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return row


def ensure_adapter(path: Path, model: str) -> Path:
    if (path / "adapter_config.json").is_file():
        return path
    from plugtune.config import load_run_config
    from plugtune.training.run import train

    print(f"[bench] no demo adapter at {path}: training one on the fp32 base (demo_lora, 40 steps)", flush=True)
    train(load_run_config("demo_lora", [f"model.name={model}", f"output.dir={path.parent}", "output.plot=false"]))
    return path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--schemes", nargs="*", default=None, help="default: fp32 int8 int4 (+ nf4 on CUDA)")
    ap.add_argument("--adapter", default=str(DEMO_ADAPTER), help="the fp32-trained LoRA evaluated on every base")
    ap.add_argument("--n-test", type=int, default=100)
    ap.add_argument("--decode-tokens", type=int, default=32)
    ap.add_argument("--train-steps", type=int, default=4)
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "quantization.json"))
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--worker-out", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        Path(args.worker_out).write_text(json.dumps(worker(args.worker, args)))
        return
    import torch

    schemes = args.schemes or ["fp32", "int8", "int4"] + (["nf4"] if torch.cuda.is_available() else [])
    args.adapter = str(ensure_adapter(Path(args.adapter), args.model))
    rows = []
    for scheme in schemes:
        with tempfile.NamedTemporaryFile(suffix=".json") as f:
            cmd = [sys.executable, __file__, "--worker", scheme, "--worker-out", f.name, "--model", args.model,
                   "--adapter", args.adapter, "--n-test", str(args.n_test), "--decode-tokens",
                   str(args.decode_tokens), "--train-steps", str(args.train_steps)]
            t0 = time.perf_counter()
            subprocess.run(cmd, check=True)
            rows.append(json.loads(Path(f.name).read_text()))
            print(f"[bench] {scheme}: {time.perf_counter() - t0:.0f} s {rows[-1]}", flush=True)
    base = rows[0]
    print(f"\nquantized bases on {args.model} ({torch.get_num_threads()} threads; decode {args.decode_tokens} new "
          f"tokens; one fp32-trained demo LoRA evaluated on each base, {args.n_test} held-out examples)")
    print("| base | linear weights | RSS loaded | peak RSS | LoRA step (batch 16) | decode b1 | decode b8 | "
          "held-out loss | exact match |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['scheme']} | {r['linear_weight_mb']:.0f} MB | {r['rss_loaded_mb']:.0f} MB | {r['peak_rss_mb']:.0f} MB "
              f"| {r['train_step_s']:.2f} s ({base['train_step_s'] / r['train_step_s']:.2f}x) "
              f"| {r['decode_tps_b1']:.1f} tok/s ({r['decode_tps_b1'] / base['decode_tps_b1']:.2f}x) "
              f"| {r['decode_tps_b8']:.1f} tok/s ({r['decode_tps_b8'] / base['decode_tps_b8']:.2f}x) "
              f"| {r['heldout_loss']:.4f} | {r['exact_match']:.1%} |")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"model": args.model, "threads": torch.get_num_threads(), "n_test": args.n_test,
                                          "decode_tokens": args.decode_tokens, "train_steps": args.train_steps,
                                          "adapter": args.adapter, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
