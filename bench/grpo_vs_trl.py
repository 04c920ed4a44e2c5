"""GRPO training step time and peak memory: plugtune against TRL's GRPOTrainer (no vLLM) + PEFT LoRA, in one run.

    python bench/grpo_vs_trl.py [--model smollm2-135m] [--threads 2] [--warmup 1] [--steps 4] [--rounds 2]
                                [--group 4] [--prompts-per-step 2] [--max-new-tokens 32] [--beta 0]
                                [--also-decode bf16] [--out bench/results/grpo_vs_trl.json]
    python bench/grpo_vs_trl.py --model /tmp/tiny --threads 1 --warmup 1 --steps 1 --rounds 1 \\
                                --group 2 --prompts-per-step 1 --max-new-tokens 4              # smoke run

Workload: the first prompts_per_step x (warmup + steps) verifiable-instruction prompts of
plugtune/tasks/instructions/train.jsonl, as conversational prompts ([{"role": "user", ...}]) rendered by the
tokenizer's chat template on both sides (checked: the token ids are compared before the runs). Each
optimizer step generates G (--group) completions for each of its --prompts-per-step prompts, at most
--max-new-tokens tokens, temperature 1.0, no top-p/top-k, stopping at EOS; scores them with the
instruction checker (plugtune.tasks.instructions.checkers.compliance_reward, wrapped to TRL's reward signature
`(prompts, completions, **kwargs) -> list[float]`); normalises the rewards per group (mean and std); and
takes one optimizer step on all of them: one optimisation pass per generation batch, so the policy ratio
is exactly 1 (plugtune: rollout.epochs=1, rollout.minibatches=1; TRL: num_iterations=1 and
steps_per_generation=1). Loss aggregation: TRL 1.16's default loss_type="dapo" (token losses summed and
divided by the completion tokens of the whole batch) = plugtune's grpo.loss_aggregation=token_mean. Clip
range 0.2 both ways, beta 0 (no reference pass; --beta > 0 turns the k3 KL to the base, adapter off, on
in both). fp32 weights and compute, AdamW, constant learning rate, gradient clipping at 1.0, LoRA r 8 /
alpha 16 / dropout 0 on q/k/v/o. Both see the same prompts in the same steps: plugtune's seeded epoch
order picks them, and TRL reads them in that order (shuffle_dataset=False).

TRL settings: GRPOConfig(use_cpu=True, bf16=False, fp16=False, gradient_checkpointing=False,
use_vllm=False, per_device_train_batch_size=prompts_per_step x G (TRL counts completions, not prompts),
gradient_accumulation_steps=1 (so steps_per_generation=1 and generation_batch_size=prompts_per_step x G),
num_generations=G, max_completion_length, temperature=1.0, num_iterations=1, loss_type="dapo",
scale_rewards="group", epsilon=0.2, beta, lr_scheduler_type="constant", shuffle_dataset=False,
report_to=[], save_strategy="no"), the model loaded in float32 and given with a PEFT LoraConfig. TRL 1.16
defaults to bf16 and gradient checkpointing, both very slow on CPUs without bf16 units. TRL generates
with model.generate (left-padded batch, DynamicCache); plugtune with its own KV-cache sampler.

plugtune decodes rollouts with rollout.decode=auto: the fast decoder, the policy's LoRA folded into an fp32
decoding copy (the same policy up to float rounding). --also-decode X adds a third engine, plugtune/X, that
samples rollouts with rollout.decode=X (bf16 or int8: a rounded copy of the policy, slightly off-policy),
alternating with the other two.

Completion lengths are not forced: both stop at EOS, so the table gives each side's mean completion
tokens (EOS included, as both count it) and the fraction that ended, and generated tokens per second
alongside steps per second.

Measurement: each run is its own subprocess, alternating TRL, plugtune, TRL, plugtune, ... (--rounds
pairs), so drift hits both alike and peak RSS is that run's alone: ru_maxrss of the child, read with
os.wait4 (model load included). Step time is the wall time between consecutive optimizer steps
(generation, scoring and the update; TRL: a TrainerCallback's on_step_end; plugtune: the loop's elapsed_s
after each optimizer step); the first --warmup steps are dropped and the next --steps are timed. A
table row is the median over rounds. Prints a table and writes JSON with every raw number.
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
PROMPTS = ROOT / "plugtune" / "tasks" / "instructions" / "train.jsonl"
LORA = {"r": 8, "alpha": 16, "dropout": 0.0, "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj"]}
LR, TEMPERATURE, CLIP, SEED = 5e-4, 1.0, 0.2, 0


# ---------------------------------------------------------------- the shared workload


def prompt_records(args) -> list[dict]:
    """The first prompts_per_step x (warmup + steps) records, each prompt as one user turn."""
    n = args.prompts_per_step * (args.warmup + args.steps)
    lines = [line for line in args.prompts.read_text().splitlines() if line.strip()]
    if len(lines) < n:
        raise SystemExit(f"{args.prompts}: {len(lines)} prompts, the run needs {n}")
    records = [json.loads(line) for line in lines[:n]]
    for r in records:
        if isinstance(r["prompt"], str):
            r["prompt"] = [{"role": "user", "content": r["prompt"]}]
    return records


def step_order(n: int) -> list[int]:
    """Record indices in the order plugtune's rollouts consume them (RolloutSource._prompts_of, epoch 0:
    n is exactly one epoch), so TRL, reading sequentially, puts the same prompts in the same steps."""
    from plugtune.data.batching import epoch_order

    return epoch_order(n, SEED, 0)


def compliance(prompts, completions, constraints_json, **unused) -> list[float]:
    """compliance_reward in TRL's reward signature. The constraints travel as JSON text: an Arrow column
    of dicts would merge every constraint's kwargs into one struct (missing keys as None)."""
    from plugtune.tasks.instructions.checkers import compliance_reward

    texts = [c[-1]["content"] if isinstance(c, list) else c for c in completions]  # conversational: a turn
    return compliance_reward([{"constraints": json.loads(c)} for c in constraints_json], texts)


# ---------------------------------------------------------------- children (one run each)


def run_trl(args, out: Path) -> dict:
    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
    import datasets
    import torch
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, TrainerCallback
    from transformers.utils import logging as hf_logging
    from trl import GRPOConfig, GRPOTrainer

    from plugtune.models.loading import load_tokenizer, resolve_model_dir

    hf_logging.set_verbosity_error()
    torch.set_num_threads(args.threads)
    records = prompt_records(args)
    rows = [{"prompt": records[i]["prompt"], "constraints_json": json.dumps(records[i]["constraints"])}
            for i in step_order(len(records))]
    path = resolve_model_dir(args.model)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    stamps: list[float] = []

    class StepTimer(TrainerCallback):
        def on_step_end(self, *unused, **kw):
            stamps.append(time.perf_counter())

    completions = args.prompts_per_step * args.group
    config = GRPOConfig(
        output_dir=str(out / "trl"), per_device_train_batch_size=completions, gradient_accumulation_steps=1,
        num_generations=args.group, max_completion_length=args.max_new_tokens, temperature=TEMPERATURE, top_p=1.0,
        top_k=0, num_iterations=1, beta=args.beta, epsilon=CLIP, loss_type="dapo", scale_rewards="group",
        shuffle_dataset=False, max_steps=args.warmup + args.steps, learning_rate=LR, lr_scheduler_type="constant",
        warmup_steps=0, weight_decay=0.0, max_grad_norm=1.0, bf16=False, fp16=False, use_cpu=True, use_vllm=False,
        # transformers 5 renamed gradient_checkpointing (TRL's default: True) to activation_checkpointing
        gradient_checkpointing=False, activation_checkpointing=False,
        logging_steps=1, save_strategy="no", report_to=[], disable_tqdm=True, seed=SEED, dataloader_num_workers=0)
    if (config.generation_batch_size, config.steps_per_generation) != (completions, 1):
        raise RuntimeError(f"TRL would generate {config.generation_batch_size} completions every "
                           f"{config.steps_per_generation} steps, not {completions} every step")
    lora = LoraConfig(r=LORA["r"], lora_alpha=LORA["alpha"], lora_dropout=LORA["dropout"],
                      target_modules=LORA["target_modules"], task_type="CAUSAL_LM")
    trainer = GRPOTrainer(model=model, reward_funcs=compliance, args=config,
                          train_dataset=datasets.Dataset.from_list(rows), processing_class=load_tokenizer(path),
                          peft_config=lora, callbacks=[StepTimer()])
    checkpointing = trainer.model.is_activation_checkpointing  # the settings took: no recomputation
    trainer.train()
    logs = [h for h in trainer.state.log_history if "reward" in h]
    return {"stamps": stamps, "losses": [h["loss"] for h in logs], "rewards": [h["reward"] for h in logs],
            "completion_tokens": [h["completions/mean_length"] for h in logs],
            "ended": [1 - h["completions/clipped_ratio"] for h in logs], "stop_ids": list(trainer.eos_token_ids),
            "generation_batch_size": config.generation_batch_size, "steps_per_generation": config.steps_per_generation,
            "activation_checkpointing": checkpointing, "dtype": str(next(trainer.model.parameters()).dtype)}


def run_plugtune(args, out: Path) -> dict:
    import torch

    from plugtune.config import load_run_config
    from plugtune.inference.generate import stop_token_ids
    from plugtune.models.loading import load_tokenizer
    from plugtune.training.run import train

    torch.set_num_threads(args.threads)
    prompts = out / "prompts.jsonl"  # in file order: the rollout source applies the seeded order itself
    prompts.write_text("".join(json.dumps(r) + "\n" for r in prompt_records(args)))
    adapter = [f"adapter.{k}={json.dumps(v) if isinstance(v, list) else v}" for k, v in LORA.items()]
    cfg = load_run_config(None, [
        "objective=grpo", f"model.name={args.model}", "model.dtype=float32", "model.device=cpu",
        f"data.train={prompts}", "method=lora", *adapter,
        f"rollout.prompts_per_step={args.prompts_per_step}", f"rollout.samples_per_prompt={args.group}",
        f"rollout.max_new_tokens={args.max_new_tokens}", f"rollout.temperature={TEMPERATURE}", "rollout.top_p=1.0",
        "rollout.top_k=0", "rollout.epochs=1", "rollout.minibatches=1", 'rollout.reward_functions=["instructions"]',
        "rollout.missing_eos_penalty=0.0", f"rollout.decode={args.decode}", f"grpo.beta={args.beta}", f"grpo.clip_low={CLIP}", f"grpo.clip_high={CLIP}",
        "grpo.scale_rewards=true", "grpo.loss_aggregation=token_mean",
        "training.grad_accum=1", f"training.max_steps={args.warmup + args.steps}", f"training.lr={LR}",
        "training.schedule=constant", "training.warmup_steps=0", "training.weight_decay=0.0",
        "training.max_grad_norm=1.0", f"training.seed={SEED}", "training.log_every=1", "training.progress=false",
        f"output.dir={out / 'plugtune'}", "output.resume=never"])
    train(cfg)
    log = [json.loads(line) for line in (out / "plugtune" / "metrics.jsonl").read_text().splitlines()]
    log = [r for r in log if r.get("kind") == "train"]
    return {"stamps": [r["elapsed_s"] for r in log], "losses": [r["loss"] for r in log],
            "rewards": [r["reward"] for r in log], "completion_tokens": [r["rollout/completion_tokens"] for r in log],
            "ended": [r["rollout/ended"] for r in log], "stop_ids": stop_token_ids(load_tokenizer(args.model))}


# ---------------------------------------------------------------- parent


def child_args(args) -> list[str]:
    return ["--model", args.model, "--threads", str(args.threads), "--warmup", str(args.warmup), "--steps",
            str(args.steps), "--group", str(args.group), "--prompts-per-step", str(args.prompts_per_step),
            "--max-new-tokens", str(args.max_new_tokens), "--beta", str(args.beta), "--prompts", str(args.prompts)]


def engines(args) -> list[tuple[str, str]]:
    """(engine name, plugtune rollout.decode) of each run in a round, TRL first."""
    return [("trl", "auto"), ("plugtune", "auto")] + [(f"plugtune/{d}", d) for d in args.also_decode]


def launch(engine: str, args, workdir: Path, decode: str = "auto") -> dict:
    """One run in a fresh interpreter; its step times, per-step numbers and peak RSS (ru_maxrss of that child)."""
    out = workdir / f"{engine.replace('/', '-')}-{len(list(workdir.iterdir()))}"
    out.mkdir()
    child = "trl" if engine == "trl" else "plugtune"
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", child, "--child-out", str(out), *child_args(args),
           "--decode", decode]
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "MKL_NUM_THREADS": str(args.threads),
           "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    with open(out / "log.txt", "w") as log:
        proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)
        _, status, usage = os.wait4(proc.pid, 0)
    code = os.waitstatus_to_exitcode(status)
    if code != 0:
        tail = (out / "log.txt").read_text()[-3000:]
        raise RuntimeError(f"the {engine} run failed (exit {code}); its log ends with:\n{tail}")
    result = json.loads((out / "result.json").read_text())
    total = args.warmup + args.steps
    if len(result["stamps"]) != total or len(result["rewards"]) != total:
        raise RuntimeError(f"{engine}: {len(result['stamps'])} optimizer steps timed and {len(result['rewards'])} "
                           f"logged, expected {total}")
    stamps, timed = result.pop("stamps"), slice(args.warmup, total)
    times = [b - a for a, b in zip(stamps[args.warmup - 1:], stamps[args.warmup:])]
    mean = lambda xs: sum(xs) / len(xs)
    s = mean(times)
    tokens = mean(result["completion_tokens"][timed])
    return {"engine": engine, "step_seconds": times, "s_per_step": s, "peak_rss_mb": usage.ru_maxrss / 1024,  # KiB
            "completion_tokens_mean": tokens, "ended_mean": mean(result["ended"][timed]),
            "reward_mean": mean(result["rewards"][timed]),
            "generated_tokens_per_s": tokens * args.prompts_per_step * args.group / s, **result}


def check_prompts(args) -> dict:
    """plugtune's prompt ids against TRL's rendering (apply_chat_template, tokenize=True) of the same turns."""
    from plugtune.data.tokenize import prompt_ids
    from plugtune.models.loading import load_tokenizer

    tok = load_tokenizer(args.model)
    ours = [prompt_ids(tok, r["prompt"]) for r in prompt_records(args)]
    theirs = tok.apply_chat_template([r["prompt"] for r in prompt_records(args)], add_generation_prompt=True,
                                     tokenize=True, return_dict=True)["input_ids"]
    return {"identical": ours == [list(t) for t in theirs], "prompt_tokens_mean": sum(map(len, ours)) / len(ours)}


def summarise(runs: list[dict]) -> dict:
    out = {}
    for engine in dict.fromkeys(r["engine"] for r in runs):
        mine = [r for r in runs if r["engine"] == engine]
        med = lambda key: statistics.median(r[key] for r in mine)
        s = med("s_per_step")
        out[engine] = {"s_per_step": s, "steps_per_s": 1 / s, "completion_tokens_mean": med("completion_tokens_mean"),
                       "ended_mean": med("ended_mean"), "generated_tokens_per_s": med("generated_tokens_per_s"),
                       "peak_rss_mb": med("peak_rss_mb"), "reward_mean": med("reward_mean"), "runs": len(mine)}
    out["speedup_steps_per_s"] = out["plugtune"]["steps_per_s"] / out["trl"]["steps_per_s"]
    out["speedup_generated_tokens_per_s"] = (out["plugtune"]["generated_tokens_per_s"]
                                             / out["trl"]["generated_tokens_per_s"])
    out["peak_rss_ratio"] = out["plugtune"]["peak_rss_mb"] / out["trl"]["peak_rss_mb"]
    for engine in [e for e in out if e.startswith("plugtune/")]:
        out[engine]["speedup_steps_per_s"] = out[engine]["steps_per_s"] / out["trl"]["steps_per_s"]
    return out


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def main(argv: list[str] | None = None) -> dict | None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m", help="built-in name or local model directory")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--warmup", type=int, default=1, help="optimizer steps not timed (>= 1)")
    parser.add_argument("--steps", type=int, default=4, help="timed optimizer steps")
    parser.add_argument("--rounds", type=int, default=2, help="TRL, plugtune pairs of runs, alternating")
    parser.add_argument("--group", type=int, default=4, help="G: completions per prompt (>= 2)")
    parser.add_argument("--prompts-per-step", type=int, default=2)
    parser.add_argument("--max-new-tokens", type=int, default=32, help="max completion length")
    parser.add_argument("--beta", type=float, default=0.0, help="KL to the reference (adapter off), both engines")
    parser.add_argument("--prompts", type=Path, default=PROMPTS, help="prompt records with constraints (JSONL)")
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "grpo_vs_trl.json"))
    parser.add_argument("--child", choices=["trl", "plugtune"], help=argparse.SUPPRESS)
    parser.add_argument("--child-out", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--decode", default="auto", help=argparse.SUPPRESS)
    parser.add_argument("--also-decode", nargs="*", default=[], choices=["plain", "bf16", "int8", "int8-body"],
                        help="extra plugtune engines whose rollouts use rollout.decode=X")
    args = parser.parse_args(argv)
    if args.warmup < 1 or args.steps < 1 or args.rounds < 1:
        parser.error("--warmup, --steps and --rounds must be >= 1 (a step time needs the previous step's end)")
    if args.group < 2:
        parser.error("--group must be >= 2 (group-normalised advantages; TRL refuses fewer)")
    if args.child:
        result = (run_trl if args.child == "trl" else run_plugtune)(args, args.child_out)
        (args.child_out / "result.json").write_text(json.dumps(result))
        return None

    import torch
    import transformers
    import trl

    prompts = check_prompts(args)
    if not prompts["identical"]:
        print("WARNING: plugtune and TRL render the prompts to different token ids", flush=True)
    runs = []
    with tempfile.TemporaryDirectory(prefix="grpo-bench-") as tmp:
        for r in range(args.rounds):
            for engine, decode in engines(args):
                runs.append(launch(engine, args, Path(tmp), decode))
                print(f"round {r + 1} {engine:<8} {runs[-1]['s_per_step']:.3f} s/step, "
                      f"{runs[-1]['completion_tokens_mean']:.1f} completion tokens, "
                      f"peak RSS {runs[-1]['peak_rss_mb']:.0f} MB", flush=True)
    summary = summarise(runs)
    settings = {"model": args.model, "threads": args.threads, "warmup": args.warmup, "steps": args.steps,
                "rounds": args.rounds, "group": args.group, "prompts_per_step": args.prompts_per_step,
                "completions_per_step": args.group * args.prompts_per_step, "max_new_tokens": args.max_new_tokens,
                "temperature": TEMPERATURE, "top_p": 1.0, "top_k": 0, "dtype": "float32", "lora": LORA, "lr": LR,
                "schedule": "constant", "max_grad_norm": 1.0, "beta": args.beta, "clip": CLIP,
                "scale_rewards": "group", "loss_aggregation": {"trl": "dapo", "plugtune": "token_mean"},
                "passes_per_generation": 1, "plugtune_rollout_decode": ["auto", *args.also_decode], "reward": "plugtune.tasks.instructions.checkers.compliance_reward",
                "prompts_file": str(args.prompts), "prompts": prompts,
                "trl": {"bf16": False, "fp16": False, "gradient_checkpointing": False, "use_cpu": True,
                        "activation_checkpointing": False,
                        "use_vllm": False, "per_device_train_batch_size": args.group * args.prompts_per_step,
                        "gradient_accumulation_steps": 1, "num_iterations": 1, "loss_type": "dapo",
                        "shuffle_dataset": False},
                "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                             "trl": trl.__version__, "python": platform.python_version()},
                "cpu": cpu_name(), "cpus": os.cpu_count(), "platform": platform.platform()}
    print(f"\nGRPO on {args.model}: {args.prompts_per_step} prompts x G {args.group} = "
          f"{args.group * args.prompts_per_step} completions/step, at most {args.max_new_tokens} new tokens "
          f"(prompt {prompts['prompt_tokens_mean']:.0f} tokens on average), fp32, LoRA r 8 q/k/v/o, beta {args.beta}, "
          f"{args.threads} threads, {args.warmup} warm-up + {args.steps} timed steps, {args.rounds} round(s)")
    print(f"{'engine':<14} {'s/step':>8} {'steps/s':>8} {'compl tok':>10} {'ended':>6} {'gen tok/s':>10} "
          f"{'peak RSS MB':>12} {'reward':>7}")
    for engine, _ in engines(args):
        s = summary[engine]
        print(f"{engine:<14} {s['s_per_step']:>8.3f} {s['steps_per_s']:>8.3f} {s['completion_tokens_mean']:>10.1f} "
              f"{s['ended_mean']:>6.0%} {s['generated_tokens_per_s']:>10.1f} {s['peak_rss_mb']:>12.0f} "
              f"{s['reward_mean']:>7.3f}")
    print(f"plugtune / TRL: {summary['speedup_steps_per_s']:.2f}x steps/s, "
          f"{summary['speedup_generated_tokens_per_s']:.2f}x generated tokens/s, "
          f"{summary['peak_rss_ratio']:.2f}x peak RSS" + "".join(
              f"; {e} / TRL: {summary[e]['speedup_steps_per_s']:.2f}x steps/s" for e, _ in engines(args)[2:]))
    result = {"settings": settings, "summary": summary, "runs": runs}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
