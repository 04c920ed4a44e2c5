"""Each adapter method on the demo task at one fixed budget: accuracy, parameters, time, size.

    python bench/adapter_methods.py [--steps 30] [--n-test 50] [--skill dates]

Same base (SmolLM2-135M-Instruct), data, steps, batch size and greedy decoding for every method;
the learning rate is each method's own (the usual ranges: prompt/prefix tuning and IA3 need
larger rates than LoRA). Prints a table and writes bench/results/adapter_methods.json.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

# variant -> (overrides of the demo config)
VARIANTS = {
    "lora r=16": ["method=lora", "training.lr=2e-3"],
    "dora r=16": ["method=lora", "adapter.use_dora=true", "training.lr=2e-3"],
    "rslora r=16": ["method=lora", "adapter.use_rslora=true", "adapter.alpha=8", "training.lr=2e-3"],
    "ia3": ["method=ia3", "adapter={}", "training.lr=1e-2"],
    "houlsby rf=16": ["method=bottleneck", "adapter={}", "adapter.variant=houlsby", "training.lr=3e-3"],
    "pfeiffer rf=16": ["method=bottleneck", "adapter={}", "adapter.variant=pfeiffer", "training.lr=3e-3"],
    "prompt tuning 20": ["method=prompt_tuning", "adapter={}", "adapter.num_virtual_tokens=20", "training.lr=3e-2"],
    "prefix tuning 20": ["method=prefix_tuning", "adapter={}", "adapter.num_virtual_tokens=20", "training.lr=1e-2"],
}


def main() -> None:
    from plugtune.demos.skill import run_demo

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--skill", default="dates")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--n-test", type=int, default=50)
    parser.add_argument("--only", nargs="*", default=None, help="variants to run (default: all)")
    parser.add_argument("--out", default="bench/results/adapter_methods.json")
    args = parser.parse_args()

    rows, before = [], None
    for variant, overrides in VARIANTS.items():
        if args.only and variant not in args.only:
            continue
        r = run_demo(skill=args.skill, out=f"runs/bench-{variant.replace(' ', '_').replace('=', '')}",
                     steps=args.steps, n_test=args.n_test, overrides=[*overrides, "training.progress=false"],
                     before=before, samples=0)
        before = r.pop("before_result")
        rows.append({"variant": variant, **{k: r[k] for k in ("method", "adapter", "lr", "steps", "accuracy_before",
                     "accuracy_after", "trainable_params", "trainable_pct", "train_seconds", "adapter_mb",
                     "peak_memory_mb")}})
    print(f"\n{args.skill}: {args.steps} steps x batch 16, exact match on {args.n_test} held-out examples")
    print(f"{'method':<18} {'trainable':>10} {'% base':>7} {'lr':>7} {'before':>7} {'after':>7} {'train s':>8} {'MB':>6}")
    for r in rows:
        print(f"{r['variant']:<18} {r['trainable_params']:>10,} {r['trainable_pct']:>6.3f}% {r['lr']:>7.0e} "
              f"{r['accuracy_before']:>6.0%} {r['accuracy_after']:>7.0%} {r['train_seconds']:>8.0f} {r['adapter_mb']:>6.2f}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"skill": args.skill, "steps": args.steps, "n_test": args.n_test,
                                          "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
