"""DPO training step time and peak memory: plugtune against TRL's DPOTrainer + PEFT LoRA, in one run.

    python bench/dpo_vs_trl.py [--model smollm2-135m] [--threads 2] [--warmup 2] [--steps 8] [--rounds 2]
                               [--precompute-ref] [--out bench/results/dpo_vs_trl.json]
    python bench/dpo_vs_trl.py --model /tmp/tiny --threads 1 --warmup 1 --steps 1 --rounds 1   # smoke run

Workload (shared/bench-data/README.md): the 64 real chat pairs of ../shared/bench-data/prefs.jsonl,
4 pairs per optimizer step (no accumulation), max_length 256, fp32 weights and compute, AdamW, constant
learning rate, gradient clipping at 1.0, LoRA r 8 / alpha 16 / dropout 0 on q/k/v/o, sigmoid DPO with
beta 0.1. The reference is the base with the adapter switched off in both, computed every step (TRL's
default precompute_ref_log_probs=False, plugtune's dpo.precompute_ref=false); --precompute-ref turns
the cache on in both. Both see the same pairs in the same steps: plugtune's seeded schedule picks them,
and TRL reads them in that order (train_sampling_strategy="sequential").

TRL settings: DPOConfig(bf16=False, gradient_checkpointing=False, use_cpu=True, max_length=256,
per_device_train_batch_size=4, lr_scheduler_type="constant", max_grad_norm=1.0), the model loaded in
float32 and given with a PEFT LoraConfig. TRL 1.16 defaults to bf16 and gradient checkpointing, both
very slow on CPUs without bf16 units; TRL's padding_free is disabled in 1.16. TRL's completion also
scores the newline after <|im_end|> (one more token per sequence than plugtune, whose labels stop at
<|im_end|>, as in its SFT).

Measurement: each run is its own subprocess, alternating TRL, plugtune, TRL, plugtune, ... (--rounds
pairs), so drift hits both alike and peak RSS is that run's alone: ru_maxrss of the child, read with
os.wait4 (model load and tokenisation included). Step time is the wall time between consecutive
optimizer steps (TRL: a TrainerCallback's on_step_end; plugtune: the loop's elapsed_s after each
optimizer step); the first --warmup steps are dropped and the next --steps are timed. s/step is the
timed wall time over the timed steps; a run's table row is the median over rounds. Prints a table and
writes JSON with every raw step time.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # plugtune from this checkout, installed or not
PAIRS = ROOT.parent / "shared" / "bench-data" / "prefs.jsonl"
LORA = {"r": 8, "alpha": 16, "dropout": 0.0, "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj"]}
PAIRS_PER_STEP, MAX_LENGTH, BETA, LR, SEED = 4, 256, 0.1, 1e-4, 0


def read_pairs(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def schedule(n_pairs: int, steps: int) -> list[list[int]]:
    """Pair indices of each step: plugtune's seeded order (data.batching.batch_indices)."""
    from plugtune.data.batching import batch_indices

    return [batch_indices(n_pairs, s, PAIRS_PER_STEP, SEED) for s in range(steps)]


# ---------------------------------------------------------------- children (one run each)


def run_trl(args, out: Path) -> dict:
    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
    import datasets
    import torch
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, TrainerCallback
    from transformers.utils import logging as hf_logging
    from trl import DPOConfig, DPOTrainer

    from plugtune.models.loading import load_tokenizer, resolve_model_dir

    hf_logging.set_verbosity_error()
    torch.set_num_threads(args.threads)
    records = read_pairs(args.pairs)
    rows = [records[j] for step in schedule(len(records), args.warmup + args.steps) for j in step]
    path = resolve_model_dir(args.model)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    stamps: list[float] = []

    class StepTimer(TrainerCallback):
        def on_step_end(self, *unused, **kw):
            stamps.append(time.perf_counter())

    config = DPOConfig(
        output_dir=str(out / "trl"), per_device_train_batch_size=PAIRS_PER_STEP, gradient_accumulation_steps=1,
        max_steps=args.warmup + args.steps, learning_rate=LR, lr_scheduler_type="constant", warmup_steps=0,
        weight_decay=0.0, max_grad_norm=1.0, bf16=False, fp16=False, gradient_checkpointing=False, use_cpu=True,
        max_length=MAX_LENGTH, beta=BETA, loss_type=["sigmoid"], precompute_ref_log_probs=args.precompute_ref,
        train_sampling_strategy="sequential", logging_steps=1, save_strategy="no", report_to=[], disable_tqdm=True,
        seed=SEED, dataloader_num_workers=0)
    lora = LoraConfig(r=LORA["r"], lora_alpha=LORA["alpha"], lora_dropout=LORA["dropout"],
                      target_modules=LORA["target_modules"], task_type="CAUSAL_LM")
    trainer = DPOTrainer(model=model, args=config, train_dataset=datasets.Dataset.from_list(rows),
                         processing_class=load_tokenizer(path), peft_config=lora, callbacks=[StepTimer()])
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h and "rewards/chosen" in h]
    return {"stamps": stamps, "losses": losses}


def run_plugtune(args, out: Path) -> dict:
    import torch

    from plugtune.config import load_run_config
    from plugtune.training.run import train

    torch.set_num_threads(args.threads)
    adapter = [f"adapter.{k}={json.dumps(v) if isinstance(v, list) else v}" for k, v in LORA.items()]
    cfg = load_run_config(None, [
        "objective=dpo", f"model.name={args.model}", "model.dtype=float32", "model.device=cpu",
        f"data.train={args.pairs}", f"data.max_length={MAX_LENGTH}", "data.overflow=truncate", "method=lora", *adapter,
        "dpo.loss=sigmoid", f"dpo.beta={BETA}", f"dpo.precompute_ref={str(args.precompute_ref).lower()}",
        f"training.batch_size={PAIRS_PER_STEP}", "training.grad_accum=1", f"training.max_steps={args.warmup + args.steps}",
        f"training.lr={LR}", "training.schedule=constant", "training.warmup_steps=0", "training.max_grad_norm=1.0",
        f"training.seed={SEED}", "training.log_every=1", "training.progress=false", f"output.dir={out / 'plugtune'}",
        "output.resume=never"])
    train(cfg)
    log = [json.loads(line) for line in (out / "plugtune" / "metrics.jsonl").read_text().splitlines()]
    log = [r for r in log if r.get("kind") == "train"]
    return {"stamps": [r["elapsed_s"] for r in log], "losses": [r["loss"] for r in log]}


# ---------------------------------------------------------------- parent


def launch(engine: str, args, workdir: Path) -> dict:
    """One run in a fresh interpreter; its step times, losses and peak RSS (ru_maxrss of that child)."""
    out = workdir / f"{engine}-{len(list(workdir.iterdir()))}"
    out.mkdir()
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", engine, "--child-out", str(out),
           "--model", args.model, "--threads", str(args.threads), "--warmup", str(args.warmup),
           "--steps", str(args.steps), "--pairs", str(args.pairs)] + (["--precompute-ref"] if args.precompute_ref else [])
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "MKL_NUM_THREADS": str(args.threads),
           "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    with open(out / "log.txt", "w") as log:
        proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)
        _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        tail = (out / "log.txt").read_text()[-3000:]
        raise RuntimeError(f"the {engine} run failed (exit {proc.returncode}); its log ends with:\n{tail}")
    result = json.loads((out / "result.json").read_text())
    stamps = result["stamps"]
    if len(stamps) != args.warmup + args.steps:
        raise RuntimeError(f"{engine}: {len(stamps)} optimizer steps recorded, expected {args.warmup + args.steps}")
    times = [b - a for a, b in zip(stamps[args.warmup - 1:], stamps[args.warmup:])]
    return {"engine": engine, "step_seconds": times, "s_per_step": sum(times) / len(times),
            "peak_rss_mb": usage.ru_maxrss / 1024, "losses": result["losses"]}  # Linux: KiB


def tokens_per_step(model: str, pairs: Path, steps: list[list[int]]) -> dict:
    """What one step holds: real (non-padding) tokens of its 8 rows, and the completion tokens scored."""
    from plugtune.data.preference import collate_pairs, load_preferences, tokenize_preferences
    from plugtune.models.loading import load_tokenizer

    tok = load_tokenizer(model)
    items, stats = tokenize_preferences(tok, load_preferences(pairs), MAX_LENGTH)
    if len(items) != len(load_preferences(pairs)):
        raise ValueError(f"{pairs}: pairs were dropped at max_length {MAX_LENGTH} ({stats.summary()}); the two "
                         "engines would not see the same pairs")
    real, scored, padded = [], [], []
    for step in steps:
        batch = collate_pairs([items[j] for j in step], tok.pad_token_id)
        real.append(int(batch["attention_mask"].sum()))
        scored.append(int((batch["labels"][:, 1:] != -100).sum()))
        padded.append(batch["input_ids"].numel())
    mean = lambda xs: round(sum(xs) / len(xs), 1)
    return {"real_tokens": mean(real), "padded_positions": mean(padded), "completion_tokens": mean(scored)}


def summarise(runs: list[dict]) -> dict:
    out = {}
    for engine in ("trl", "plugtune"):
        mine = [r for r in runs if r["engine"] == engine]
        s = statistics.median(r["s_per_step"] for r in mine)
        out[engine] = {"s_per_step": s, "steps_per_s": 1 / s, "peak_rss_mb": statistics.median(r["peak_rss_mb"] for r in mine),
                       "runs": len(mine)}
    out["speedup_steps_per_s"] = out["plugtune"]["steps_per_s"] / out["trl"]["steps_per_s"]
    out["peak_rss_ratio"] = out["plugtune"]["peak_rss_mb"] / out["trl"]["peak_rss_mb"]
    return out


def main(argv: list[str] | None = None) -> dict | None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m", help="built-in name or local model directory")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--warmup", type=int, default=2, help="optimizer steps not timed (>= 1)")
    parser.add_argument("--steps", type=int, default=8, help="timed optimizer steps")
    parser.add_argument("--rounds", type=int, default=2, help="TRL, plugtune pairs of runs, alternating")
    parser.add_argument("--precompute-ref", action="store_true", help="cache reference log-probs (both engines)")
    parser.add_argument("--pairs", type=Path, default=PAIRS)
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "dpo_vs_trl.json"))
    parser.add_argument("--child", choices=["trl", "plugtune"], help=argparse.SUPPRESS)
    parser.add_argument("--child-out", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.warmup < 1 or args.steps < 1 or args.rounds < 1:
        parser.error("--warmup, --steps and --rounds must be >= 1 (a step time needs the previous step's end)")
    if args.child:
        result = (run_trl if args.child == "trl" else run_plugtune)(args, args.child_out)
        (args.child_out / "result.json").write_text(json.dumps(result))
        return None
    if not args.pairs.is_file():
        raise SystemExit(f"{args.pairs}: the benchmark pairs are missing (see shared/bench-data/README.md)")

    import torch
    import transformers
    import trl

    steps = schedule(len(read_pairs(args.pairs)), args.warmup + args.steps)
    workload = tokens_per_step(args.model, args.pairs, steps[args.warmup:])
    runs = []
    with tempfile.TemporaryDirectory(prefix="dpo-bench-") as tmp:
        for r in range(args.rounds):
            for engine in ("trl", "plugtune"):
                runs.append(launch(engine, args, Path(tmp)))
                print(f"round {r + 1} {engine:<8} {runs[-1]['s_per_step']:.3f} s/step, "
                      f"peak RSS {runs[-1]['peak_rss_mb']:.0f} MB", flush=True)
    summary = summarise(runs)
    settings = {"model": args.model, "threads": args.threads, "warmup": args.warmup, "steps": args.steps,
                "rounds": args.rounds, "pairs_per_step": PAIRS_PER_STEP, "max_length": MAX_LENGTH, "dtype": "float32",
                "lora": LORA, "beta": BETA, "lr": LR, "schedule": "constant", "max_grad_norm": 1.0,
                "precompute_ref": args.precompute_ref, "trl": {"bf16": False, "gradient_checkpointing": False,
                                                               "use_cpu": True, "padding_free": False},
                "pairs_file": str(args.pairs), "versions": {"torch": torch.__version__, "transformers":
                                                            transformers.__version__, "trl": trl.__version__},
                "cpu": platform.processor() or platform.machine(), "cpus": os.cpu_count()}
    print(f"\nDPO on {args.model}: {PAIRS_PER_STEP} pairs/step (real tokens {workload['real_tokens']:.0f}, padded "
          f"{workload['padded_positions']:.0f}, scored {workload['completion_tokens']:.0f} per step), fp32, LoRA r 8 "
          f"q/k/v/o, {args.threads} threads, {args.warmup} warm-up + {args.steps} timed steps, {args.rounds} round(s)"
          + (", reference cached" if args.precompute_ref else ""))
    print(f"{'engine':<10} {'s/step':>8} {'steps/s':>8} {'peak RSS MB':>12}")
    for engine in ("trl", "plugtune"):
        s = summary[engine]
        print(f"{engine:<10} {s['s_per_step']:>8.3f} {s['steps_per_s']:>8.3f} {s['peak_rss_mb']:>12.0f}")
    print(f"plugtune / TRL: {summary['speedup_steps_per_s']:.2f}x steps/s, {summary['peak_rss_ratio']:.2f}x peak RSS")
    result = {"settings": settings, "workload_per_step": workload, "summary": summary, "runs": runs}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
