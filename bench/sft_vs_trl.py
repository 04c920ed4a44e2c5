"""SFT speed, memory and loss curve: plugtune against TRL's SFTTrainer (+ PEFT LoRA), in one run.

    python bench/sft_vs_trl.py [--model smollm2-135m] [--threads 2] [--warmup 2] [--steps 10] [--rounds 1]
                               [--modes lora,full] [--layouts packed] [--out bench/results/sft_vs_trl.json]
    python bench/sft_vs_trl.py --layouts packed,rows,grouped,padded     # which plugtune layout is fastest
    python bench/sft_vs_trl.py --model /tmp/tiny --threads 1 --warmup 1 --steps 1 --peak-n 256   # smoke run
    python bench/sft_vs_trl.py --device cuda --modes lora,qlora,full --warmup 3 --steps 20   # GPU: a few minutes

CUDA (--device cuda; unmeasured so far: no GPU was lent when it was written): the same data, schedule and
settings, in bf16 mixed precision on both sides (fp32 master weights, bf16 autocast: TRL's bf16=True, use_cpu
False; plugtune's model.dtype=auto on CUDA), and a third mode, qlora: the base frozen in NF4 with double
quantization, compute in bf16 (TRL + PEFT + bitsandbytes: BitsAndBytesConfig(load_in_4bit, nf4,
double quant, bf16 compute) and prepare_model_for_kbit_training without checkpointing; plugtune:
model.quantize=nf4). Each child reports torch.cuda.max_memory_allocated (peak GPU memory) next to its peak
RSS, and the table adds x TRL peak GPU memory. Goal (issue 17): >= 1.5x TRL's tokens/s at <= 0.7x its
memory. The FLOP fraction is of the fp32 CPU peak on CPU and omitted on CUDA.

Workload (shared/bench-data/README.md): the 400 real chat conversations of ../shared/bench-data/chat_sft.jsonl
(35-250 tokens), loss on the assistant turns only, 8 conversations per optimizer step (no accumulation),
max_length 256, fp32 weights and compute, AdamW, constant learning rate (LoRA 2e-4, full 2e-5), gradient
clipping at 1.0; LoRA r 8 / alpha 16 / dropout 0 on q/k/v/o, or full fine-tuning; gradient checkpointing
off. Both engines see the same conversations in the same steps: plugtune's seeded schedule
(data.batching.batch_indices) picks them, and TRL reads them in that order (train_sampling_strategy=
"sequential"). Packing keeps that schedule (a micro-batch is still the same 8 conversations), so its loss
curve should match TRL's; length grouping (--layouts grouped) regroups conversations, so its curve differs.

TRL settings: SFTConfig(assistant_only_loss=True, bf16=False, gradient_checkpointing=False, use_cpu=True,
max_length=256, packing=False, padding_free=False, per_device_train_batch_size=8). TRL rejects SmolLM2's
stock template for assistant_only_loss (no {% generation %} markers), so it gets MARKED_TEMPLATE: the same
template with markers around each assistant turn's content and <|im_end|> (the newline after it outside,
as plugtune's labels), rendering identically (checked on the data). Each run reports the supervised and
real tokens its engine computed per step, and the parent checks that both engines agree.

plugtune layouts (--layouts): packed (the default: one row per micro-batch, attention per example, see
plugtune/models/varlen.py), rows (packed into rows of <= 256 tokens under a block-diagonal mask:
data.packed_attention=mask), grouped (padded batches grouped by length: data.packing=false), padded (plain
shuffled padded batches, as before packing existed).

Measurement: each run is its own subprocess (alternating TRL, plugtune layouts, TRL, ...), so drift hits
all alike and peak RSS is that run's alone (ru_maxrss of the child via os.wait4; model load and
tokenisation included). Step time is the wall time between consecutive optimizer steps (TRL: a
TrainerCallback's on_step_end; plugtune: the loop's elapsed_s after each step); the first --warmup steps
are dropped. Tokens/s = tokens of the timed steps / their wall time; supervised tokens are the scored
next-token targets, real tokens the non-padding ones.

FLOP accounting (model FLOPs of the work the loss needs, the same formula for both engines), per step,
with T real tokens, S supervised tokens, P = sum over sequences of L(L+1)/2 causal query-key pairs:
    forward   F = 2 * N_body * T  +  2 * V * C * S  +  4 * layers * (heads * head_dim) * P
    full fine-tuning: 3F (backward = input grads + weight grads = 2x forward)
    LoRA: 2 * (2 * N_body * T + 2 * V * C * S)  (frozen: forward + input grads)  + 3 * attention
          + 6 * N_lora * T  (the adapters' forward, input and weight grads)
          - 2 * (N_qkv + 3 * r * C) * T  (layer 0's q/k/v read the embeddings, which need no gradient)
N_body = weights of the transformer blocks' linear layers (no embedding, norms ignored), V * C = the LM head,
counted only at supervised positions (plugtune applies it nowhere else; TRL's extra head work is not
credited), N_qkv = one layer's q/k/v weights. Attention counts the causal half of each sequence's L x L
scores. tests/test_bench_sft.py checks the formula against torch's FlopCounterMode (full L x L attention
there: pairs = L^2). Achieved FLOP/s = FLOPs of the timed steps / their wall time, as a fraction of the fp32 matmul
peak measured in this run (an --peak-n square matmul loop at --threads, before and after the runs; the
higher is used).
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
DATA = ROOT.parent / "shared" / "bench-data" / "chat_sft.jsonl"
LORA = {"r": 8, "alpha": 16, "dropout": 0.0, "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj"]}
BATCH, MAX_LENGTH, SEED = 8, 256, 0
LR = {"lora": 2e-4, "qlora": 2e-4, "full": 2e-5}
MODES = ("lora", "qlora", "full")  # qlora: CUDA only (bitsandbytes NF4 on TRL's side, model.quantize=nf4 on ours)
LAYOUTS = {"packed": ["data.packing=true"], "rows": ["data.packing=true", "data.packed_attention=mask"],
           "grouped": ["data.packing=false", "data.group_by_length=true"],
           "padded": ["data.packing=false", "data.group_by_length=false"]}
MARKED_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}"
    "{% endif %}"
    "{% if message['role'] == 'assistant' %}"
    "{{ '<|im_start|>assistant\n' }}{% generation %}{{ message['content'] + '<|im_end|>' }}{% endgeneration %}{{ '\n' }}"
    "{% else %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def read_records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def schedule(n: int, steps: int, layout: str = "packed", lengths: tuple[int, ...] = ()) -> list[list[int]]:
    """Conversation indices of each step, as plugtune's SFT picks them (data.batching)."""
    from plugtune.data.batching import batch_indices, grouped_batch_indices

    if layout == "grouped":
        return [grouped_batch_indices(lengths, s, BATCH, SEED) for s in range(steps)]
    return [batch_indices(n, s, BATCH, SEED) for s in range(steps)]


# ---------------------------------------------------------------- children (one run each)


def run_trl(args, out: Path) -> dict:
    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
    import datasets
    import torch
    from transformers import AutoModelForCausalLM, TrainerCallback
    from transformers.utils import logging as hf_logging
    from trl import SFTConfig, SFTTrainer

    from plugtune.models.loading import load_tokenizer, resolve_model_dir

    hf_logging.set_verbosity_error()
    torch.set_num_threads(args.threads)
    records = read_records(args.data)
    steps = schedule(len(records), args.warmup + args.steps)
    rows = [records[j] for step in steps for j in step]
    path = resolve_model_dir(args.model)
    tokenizer = load_tokenizer(path)
    for r in rows[:50]:  # the marked copy must render exactly as the stock template
        if tokenizer.apply_chat_template(r["messages"], tokenize=False) != \
                tokenizer.apply_chat_template(r["messages"], tokenize=False, chat_template=MARKED_TEMPLATE):
            raise SystemExit("MARKED_TEMPLATE does not render like this model's chat template")
    tokenizer.chat_template = MARKED_TEMPLATE
    cuda = args.device == "cuda"
    if args.mode == "qlora":
        from peft import prepare_model_for_kbit_training
        from transformers import BitsAndBytesConfig

        quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                   bnb_4bit_compute_dtype=torch.bfloat16)
        model = AutoModelForCausalLM.from_pretrained(path, quantization_config=quant, dtype=torch.float32,
                                                     device_map={"": 0})
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    else:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    stamps: list[float] = []

    class StepTimer(TrainerCallback):
        def on_step_end(self, *unused, **kw):
            stamps.append(time.perf_counter())

    config = SFTConfig(
        output_dir=str(out / "trl"), per_device_train_batch_size=BATCH, gradient_accumulation_steps=1,
        max_steps=args.warmup + args.steps, learning_rate=LR[args.mode], lr_scheduler_type="constant",
        warmup_steps=0, weight_decay=0.0, max_grad_norm=1.0, bf16=cuda, fp16=False, gradient_checkpointing=False,
        use_cpu=not cuda, max_length=MAX_LENGTH, assistant_only_loss=True, packing=False, padding_free=False,
        train_sampling_strategy="sequential", logging_steps=1, save_strategy="no", report_to=[], disable_tqdm=True,
        seed=SEED, dataloader_num_workers=0)
    peft_config = None
    if args.mode in ("lora", "qlora"):
        from peft import LoraConfig

        peft_config = LoraConfig(r=LORA["r"], lora_alpha=LORA["alpha"], lora_dropout=LORA["dropout"],
                                 target_modules=LORA["target_modules"], task_type="CAUSAL_LM")
    trainer = SFTTrainer(model=model, args=config, train_dataset=datasets.Dataset.from_list(rows),
                         processing_class=tokenizer, peft_config=peft_config, callbacks=[StepTimer()])
    data = trainer.train_dataset
    real = [len(ids) for ids in data["input_ids"]]
    if len(data) != len(rows):
        raise SystemExit(f"TRL dropped {len(rows) - len(data)} conversations; the engines would not see the same ones")
    supervised = [sum(1 for t in labels[1:] if t != -100) for labels in data["labels"]]  # the first is no target
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h and "train_runtime" not in h]
    per_step = lambda xs: [sum(xs[s * BATCH:(s + 1) * BATCH]) for s in range(len(steps))]
    return {"stamps": stamps, "losses": losses, "real_tokens": per_step(real), "supervised_tokens": per_step(supervised),
            **gpu_peak(args)}


def gpu_peak(args) -> dict:
    """Peak GPU memory of this child (CUDA runs only)."""
    if args.device != "cuda":
        return {}
    import torch

    return {"peak_gpu_mb": torch.cuda.max_memory_allocated() / 2**20}


def plugtune_settings(args) -> list[str]:
    """The run config of a plugtune child: device, dtype and quantization by --device and --mode."""
    method = ["method=lora", *[f"adapter.{k}={json.dumps(v) if isinstance(v, list) else v}" for k, v in LORA.items()]] \
        if args.mode in ("lora", "qlora") else ["method=full"]
    device = ["model.dtype=auto", "model.device=cuda"] if args.device == "cuda" else \
        ["model.dtype=float32", "model.device=cpu"]
    quant = ["model.quantize=nf4"] if args.mode == "qlora" else []
    return [*device, *quant, *method]


def run_plugtune(args, out: Path) -> dict:
    from plugtune.config import load_run_config
    from plugtune.training.run import train

    cfg = load_run_config(None, [
        f"model.name={args.model}", f"data.train={args.data}",
        f"data.max_length={MAX_LENGTH}", "data.overflow=truncate", "data.train_on=responses", *LAYOUTS[args.layout],
        *plugtune_settings(args), f"training.batch_size={BATCH}", "training.grad_accum=1", f"training.max_steps={args.warmup + args.steps}",
        f"training.lr={LR[args.mode]}", "training.schedule=constant", "training.warmup_steps=0",
        "training.max_grad_norm=1.0", "training.weight_decay=0.0", "training.gradient_checkpointing=false",
        f"training.threads={args.threads}", f"training.seed={SEED}", "training.log_every=1", "training.progress=false",
        f"output.dir={out / 'plugtune'}", "output.resume=never"])
    report = train(cfg)
    log = [json.loads(line) for line in (out / "plugtune" / "metrics.jsonl").read_text().splitlines()]
    log = [r for r in log if r.get("kind") == "train"]
    return {"stamps": [r["elapsed_s"] for r in log], "losses": [r["loss"] for r in log],
            "supervised_tokens": [r["tokens"] for r in log], "batches": report.data.rsplit("; ", 1)[-1], **gpu_peak(args)}


# ---------------------------------------------------------------- parent


def launch(engine: str, mode: str, layout: str, args, workdir: Path) -> dict:
    """One run in a fresh interpreter; its step times, losses, tokens and peak RSS (ru_maxrss of the child)."""
    out = workdir / f"{engine}-{mode}-{layout}-{len(list(workdir.iterdir()))}"
    out.mkdir()
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", engine, "--child-out", str(out), "--mode", mode,
           "--layout", layout, "--model", args.model, "--threads", str(args.threads), "--warmup", str(args.warmup),
           "--steps", str(args.steps), "--data", str(args.data), "--device", args.device]
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "MKL_NUM_THREADS": str(args.threads),
           "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    with open(out / "log.txt", "w") as log:
        proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)
        _, status, usage = os.wait4(proc.pid, 0)
    if os.waitstatus_to_exitcode(status) != 0:
        tail = (out / "log.txt").read_text()[-3000:]
        raise RuntimeError(f"the {engine} {mode} run failed; its log ends with:\n{tail}")
    result = json.loads((out / "result.json").read_text())
    stamps = result.pop("stamps")
    if len(stamps) != args.warmup + args.steps:
        raise RuntimeError(f"{engine}: {len(stamps)} optimizer steps recorded, expected {args.warmup + args.steps}")
    times = [b - a for a, b in zip(stamps[args.warmup - 1:], stamps[args.warmup:])]
    return {"engine": engine if engine == "trl" else f"plugtune/{layout}", "mode": mode, "layout": layout,
            "step_seconds": times, "timed_seconds": sum(times), "s_per_step": sum(times) / len(times),
            "peak_rss_mb": usage.ru_maxrss / 1024, **result}  # Linux: KiB


def matmul_peak(threads: int, n: int, seconds: float) -> float:
    """Best fp32 FLOP/s of an n x n matmul loop on `threads` threads."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    a, b = torch.randn(n, n), torch.randn(n, n)
    torch.mm(a, b)
    best = 0.0
    for _ in range(3):
        count, t0 = 0, time.perf_counter()
        while time.perf_counter() - t0 < seconds / 3:
            torch.mm(a, b)
            count += 1
        best = max(best, 2 * n ** 3 * count / (time.perf_counter() - t0))
    torch.set_num_threads(before)
    return best


def model_dims(model: str) -> dict:
    from plugtune.models.loading import resolve_model_dir

    c = json.loads((resolve_model_dir(model) / "config.json").read_text())
    d, heads, kv, layers = c["hidden_size"], c["num_attention_heads"], c.get("num_key_value_heads") or c["num_attention_heads"], c["num_hidden_layers"]
    hd = c.get("head_dim") or d // heads
    qkv = d * heads * hd + 2 * d * kv * hd
    per_layer = qkv + heads * hd * d + 3 * d * c["intermediate_size"]
    lora = LORA["r"] * ((d + heads * hd) * 2 + 2 * (d + kv * hd))  # q, o: d <-> heads*hd; k, v: d -> kv*hd
    return {"hidden": d, "layers": layers, "attn_width": heads * hd, "vocab": c["vocab_size"],
            "body_params": layers * per_layer, "qkv_params": qkv, "lora_params": layers * lora}


def step_flops(dims: dict, mode: str, real: int, supervised: int, pairs: int) -> float:
    """Model FLOPs of one step (module docstring): real / supervised tokens, causal query-key pairs."""
    body = 2 * dims["body_params"] * real
    head = 2 * dims["vocab"] * dims["hidden"] * supervised
    attn = 4 * dims["layers"] * dims["attn_width"] * pairs
    if mode == "full":
        return 3 * (body + head + attn)
    first_layer_inputs = 2 * (dims["qkv_params"] + 3 * LORA["r"] * dims["hidden"]) * real
    return 2 * (body + head) + 3 * attn + 6 * dims["lora_params"] * real - first_layer_inputs


def workload(model: str, data: Path, steps: int, warmup: int) -> dict:
    """Per layout and timed step: real tokens, supervised tokens, positions computed, causal pairs."""
    from plugtune.data import load_examples, tokenize_dataset
    from plugtune.data.batching import collate
    from plugtune.data.packing import collate_packed
    from plugtune.models.loading import load_tokenizer

    tok = load_tokenizer(model)
    items, stats = tokenize_dataset(tok, load_examples(str(data)), MAX_LENGTH)
    if len(items) != len(read_records(data)):
        raise ValueError(f"{data}: conversations were dropped at max_length {MAX_LENGTH} ({stats.summary()}); the "
                         "engines would not see the same conversations")
    lengths = tuple(len(it.input_ids) for it in items)
    out = {}
    for layout in LAYOUTS:
        rows = []
        for step in schedule(len(items), warmup + steps, layout, lengths):
            chosen = [items[j] for j in step]
            batch = collate_packed(chosen, tok.pad_token_id, MAX_LENGTH, flat=layout == "packed") \
                if layout in ("packed", "rows") else collate(chosen, tok.pad_token_id)
            rows.append({"real": sum(len(it.input_ids) for it in chosen),
                         "supervised": int((batch["labels"][:, 1:] != -100).sum()),
                         "positions": batch["input_ids"].numel(),
                         "pairs": sum(len(it.input_ids) * (len(it.input_ids) + 1) // 2 for it in chosen)})
        out[layout] = rows
    return out


def summarise(runs: list[dict], work: dict, dims: dict, peak: float, args) -> dict:
    summary = {}
    for mode in args.modes:
        engines = ["trl"] + [f"plugtune/{layout}" for layout in args.layouts]
        rows = {}
        for engine in engines:
            mine = [r for r in runs if r["mode"] == mode and r["engine"] == engine]
            layout = "padded" if engine == "trl" else mine[0]["layout"]
            timed = work[layout][args.warmup:]
            seconds = statistics.median(r["timed_seconds"] for r in mine)
            flops = sum(step_flops(dims, mode, w["real"], w["supervised"], w["pairs"]) for w in timed)
            real, positions = sum(w["real"] for w in timed), sum(w["positions"] for w in timed)
            rows[engine] = {
                "s_per_step": seconds / args.steps, "supervised_tok_s": sum(w["supervised"] for w in timed) / seconds,
                "real_tok_s": real / seconds, "padding": 1 - real / positions,
                "peak_rss_mb": statistics.median(r["peak_rss_mb"] for r in mine),
                "peak_gpu_mb": statistics.median(r["peak_gpu_mb"] for r in mine) if "peak_gpu_mb" in mine[0] else None,
                "flops_per_s": flops / seconds, "fraction_of_peak": flops / seconds / peak,
                "losses": mine[0]["losses"], "runs": len(mine)}
        for engine in engines[1:]:
            p, t = rows[engine], rows["trl"]
            same_batches = engine != "plugtune/grouped"
            p["vs_trl"] = {"supervised_tok_s": p["supervised_tok_s"] / t["supervised_tok_s"],
                           "s_per_step": p["s_per_step"] / t["s_per_step"],
                           "peak_rss": p["peak_rss_mb"] / t["peak_rss_mb"],
                           "peak_gpu": p["peak_gpu_mb"] / t["peak_gpu_mb"] if p["peak_gpu_mb"] and t["peak_gpu_mb"]
                           else None,
                           "max_abs_loss_diff": max(abs(a - b) for a, b in zip(p["losses"], t["losses"]))
                           if same_batches else None}
        summary[mode] = rows
    return summary


def check_tokens(runs: list[dict], work: dict, args) -> None:
    """Both engines must compute the same conversations: the same supervised and real tokens per step."""
    for r in runs:
        expected = work["padded" if r["engine"] == "trl" else r["layout"]]
        if r["supervised_tokens"] != [w["supervised"] for w in expected]:
            raise RuntimeError(f"{r['engine']} {r['mode']}: supervised tokens per step {r['supervised_tokens']} differ "
                               f"from plugtune's tokenisation {[w['supervised'] for w in expected]}")
        if "real_tokens" in r and r["real_tokens"] != [w["real"] for w in expected]:
            raise RuntimeError(f"{r['engine']}: real tokens per step {r['real_tokens']} differ from plugtune's "
                               f"{[w['real'] for w in expected]}")


def main(argv: list[str] | None = None) -> dict | None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m", help="built-in name or local model directory")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--warmup", type=int, default=2, help="optimizer steps not timed (>= 1)")
    parser.add_argument("--steps", type=int, default=10, help="timed optimizer steps")
    parser.add_argument("--rounds", type=int, default=1, help="alternating rounds of every run")
    parser.add_argument("--modes", default="lora,full", help="comma list: lora, full, qlora (qlora: --device cuda)")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu",
                        help="cuda: bf16 mixed precision on both sides, peak GPU memory reported")
    parser.add_argument("--layouts", default="packed", help="plugtune layouts, comma list: packed, rows, grouped, padded")
    parser.add_argument("--data", type=Path, default=DATA)
    parser.add_argument("--peak-n", type=int, default=2048, help="matmul size for the fp32 peak")
    parser.add_argument("--peak-seconds", type=float, default=3.0)
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "sft_vs_trl.json"))
    parser.add_argument("--child", choices=["trl", "plugtune"], help=argparse.SUPPRESS)
    parser.add_argument("--child-out", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--mode", default="lora", help=argparse.SUPPRESS)
    parser.add_argument("--layout", default="packed", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        result = (run_trl if args.child == "trl" else run_plugtune)(args, args.child_out)
        (args.child_out / "result.json").write_text(json.dumps(result))
        return None
    args.modes, args.layouts = args.modes.split(","), args.layouts.split(",")
    if args.warmup < 1 or args.steps < 1 or args.rounds < 1:
        parser.error("--warmup, --steps and --rounds must be >= 1 (a step time needs the previous step's end)")
    if not set(args.modes) <= set(MODES) or not set(args.layouts) <= set(LAYOUTS):
        parser.error(f"--modes: {', '.join(MODES)}; --layouts: {', '.join(LAYOUTS)}")
    if "qlora" in args.modes and args.device != "cuda":
        parser.error("--modes qlora needs --device cuda (NF4 runs on bitsandbytes' CUDA kernels)")
    if not args.data.is_file():
        print(f"{args.data}: the benchmark conversations are missing (see shared/bench-data/README.md); skipped")
        return None

    import torch
    import transformers
    import trl

    work = workload(args.model, args.data, args.steps, args.warmup)
    dims = model_dims(args.model)
    cpu = args.device == "cpu"  # the FLOP fraction is of the CPU's fp32 peak: not measured for CUDA runs
    peaks = [matmul_peak(args.threads, args.peak_n, args.peak_seconds) if cpu else float("nan")]
    runs = []
    with tempfile.TemporaryDirectory(prefix="sft-bench-") as tmp:
        for r in range(args.rounds):
            for mode in args.modes:
                for engine, layout in [("trl", "padded")] + [("plugtune", layout) for layout in args.layouts]:
                    runs.append(launch(engine, mode, layout, args, Path(tmp)))
                    print(f"round {r + 1} {mode:<4} {runs[-1]['engine']:<16} {runs[-1]['s_per_step']:.3f} s/step, "
                          f"peak RSS {runs[-1]['peak_rss_mb']:.0f} MB", flush=True)
    peaks.append(matmul_peak(args.threads, args.peak_n, args.peak_seconds) if cpu else float("nan"))
    check_tokens(runs, work, args)
    summary = summarise(runs, work, dims, max(peaks), args)
    timed = work["packed"][args.warmup:]
    mean = lambda key, layout="packed": sum(w[key] for w in work[layout][args.warmup:]) / len(timed)
    print(f"\nSFT on {args.model}: {BATCH} conversations/step (real tokens {mean('real'):.0f}, supervised "
          f"{mean('supervised'):.0f}; positions computed: padded {mean('positions', 'padded'):.0f}, rows "
          f"{mean('positions', 'rows'):.0f}, packed {mean('positions'):.0f}), max_length {MAX_LENGTH}, fp32, {args.threads} threads, {args.warmup} warm-up + "
          f"{args.steps} timed steps, {args.rounds} round(s); fp32 matmul peak {max(peaks) / 1e9:.1f} GFLOP/s "
          f"({args.peak_n}x{args.peak_n}; before/after {peaks[0] / 1e9:.1f}/{peaks[1] / 1e9:.1f})")
    print(f"{'mode':<5} {'engine':<17} {'s/step':>7} {'sup tok/s':>9} {'real tok/s':>10} {'padding':>7} "
          f"{'RSS MB':>7} {'% peak':>6} {'x TRL tok/s':>11} {'x TRL RSS':>9} {'loss |diff|':>11} {'GPU MB':>7} {'x TRL GPU':>9}")
    for mode, rows in summary.items():
        for engine, s in rows.items():
            v = s.get("vs_trl", {})
            diff = v.get("max_abs_loss_diff")
            gpu = "-" if s["peak_gpu_mb"] is None else f"{s['peak_gpu_mb']:.0f}"
            gpu_x = "-" if v.get("peak_gpu") is None else f"{v['peak_gpu']:.2f}"
            print(f"{mode:<5} {engine:<17} {s['s_per_step']:>7.3f} {s['supervised_tok_s']:>9.1f} {s['real_tok_s']:>10.1f} "
                  f"{s['padding']:>7.1%} {s['peak_rss_mb']:>7.0f} {s['fraction_of_peak']:>6.1%} "
                  f"{v.get('supervised_tok_s', 1.0):>11.2f} {v.get('peak_rss', 1.0):>9.2f} "
                  f"{'-' if diff is None else f'{diff:.4f}':>11} {gpu:>7} {gpu_x:>9}")
    settings = {"model": args.model, "threads": args.threads, "warmup": args.warmup, "steps": args.steps,
                "rounds": args.rounds, "modes": args.modes, "layouts": args.layouts, "batch": BATCH,
                "max_length": MAX_LENGTH, "dtype": "float32" if args.device == "cpu" else "fp32 weights, bf16 autocast",
                "device": args.device, "lora": LORA, "lr": LR, "schedule": "constant",
                "max_grad_norm": 1.0, "gradient_checkpointing": False, "data": str(args.data),
                "trl": {"assistant_only_loss": True, "bf16": not cpu, "gradient_checkpointing": False, "use_cpu": cpu,
                        "packing": False, "padding_free": False},
                "versions": {"torch": torch.__version__, "transformers": transformers.__version__, "trl": trl.__version__},
                "cpu": platform.processor() or platform.machine(), "cpus": os.cpu_count()}
    result = {"settings": settings, "matmul_peak_flops": peaks, "model_dims": dims, "workload": work,
              "summary": summary, "runs": runs}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
