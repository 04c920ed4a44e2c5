"""Greedy decode speed on CPU: today's decode step against the fast decoder's options, batch 1 and 8,
with each option's agreement with fp32 greedy output.

    python bench/decode_speed.py [--model smollm2-135m] [--threads 2] [--repeats 3] [--new-tokens 64]
                                 [--agree-prompts 100] [--agree-tokens 48] [--out bench/results/decode_speed.json]
    python bench/decode_speed.py --model tiny --threads 1 --repeats 1 --new-tokens 4 --agree-prompts 4 --agree-tokens 4

Cases (plugtune.inference.generate.generate_ids, `decode=`):
  plain          today's path: the Hugging Face forward per step with a DynamicCache (the code before the
                 fast decoder, kept as decode="plain")
  fp32           fast decoder: static KV cache, the model's own fp32 weights, no HF per-layer overhead
  bf16           fast decoder with bfloat16 weight copies (activations cast per matmul)
  int8           fast decoder with fbgemm int8 weights (per output channel) and per-call int8 activations
  int8-body      int8 in the transformer blocks, the LM head (tied embedding, 49152 x 576) kept in fp32
  lora plain     a LoRA r 8 adapter on q/k/v/o (random non-zero B, 10% of each weight's norm) run unmerged
                 by the HF forward: what a GRPO rollout decoded with before
  lora folded    the same adapter folded into a decoding copy (W + sBA) on the fast fp32 path: rollouts now

Speed: exactly --new-tokens per row (no end token stops a row), the first --batch prompts, prefill included,
tokens/s = rows x new tokens / wall time of the generate call. Every case runs once per repeat, in the
listed order, batch 1 then batch 8 inside the same repeat, so drift hits all cases alike; one warm-up
repeat is not timed. The table gives medians over repeats and each repeat's ratio to plain.

Agreement: --agree-prompts held-out prompts (plugtune/tasks/instructions/test.jsonl, chat template), greedy,
at most --agree-tokens new tokens, stopping at the end token, batches of 8; each option's output against
the same model's plain fp32 output (the LoRA case against lora plain): % of identical tokens position by
position (over the longer of the two outputs), % of identical outputs, and the max |logit difference| of
one decode step after the same prefill. JSON with every raw timing goes to --out.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from plugtune.adapters import adapter_state, attach_adapter  # noqa: E402
from plugtune.data.tokenize import prompt_ids  # noqa: E402
from plugtune.inference import fast_decode  # noqa: E402
from plugtune.inference.generate import (GenerationConfig, decode_step, generate_ids, prefill,  # noqa: E402
                                         stop_token_ids)
from plugtune.models.causal_lm import cache_kwarg  # noqa: E402

PROMPTS = ROOT / "plugtune" / "tasks" / "instructions" / "test.jsonl"
CASES = ("plain", "fp32", "bf16", "int8", "int8-body", "lora plain", "lora folded")


def load(model: str):
    if model == "tiny":
        from plugtune.models.tiny import build_model, build_tokenizer
        tok = build_tokenizer()
        return build_model("llama", len(tok), seed=0), tok
    from plugtune.models.loading import load_base
    lm = load_base(model, "float32", "cpu")
    return lm.model, lm.tokenizer


def held_out_prompts(tokenizer, n: int) -> list[list[int]]:
    lines = [json.loads(line) for line in PROMPTS.read_text().splitlines() if line.strip()]
    if len(lines) < n:
        raise SystemExit(f"{PROMPTS} has {len(lines)} prompts; --agree-prompts {n} asks for more")
    return [prompt_ids(tokenizer, [{"role": "user", "content": r["prompt"]}]) for r in lines[:n]]


def with_lora(model, seed: int = 0, delta: float = 0.1):
    """A copy of `model` with one LoRA adapter whose B is random, scaled so ||sBA|| = delta ||W||."""
    lora = copy.deepcopy(model)
    attach_adapter(lora, "lora", {"r": 8, "alpha": 16, "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj"]})
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, module in lora.named_modules():
            if hasattr(module, "lora_B") and "default" in module.lora_B:
                b = module.lora_B["default"].weight
                b.copy_(torch.randn(b.shape, generator=g))
                d = module.delta_weight("default")
                b.mul_(delta * module.base_module.weight.norm() / d.norm())
    assert adapter_state(lora, "default")
    return lora


def case_call(case: str, base, lora):
    model = lora if case.startswith("lora") else base
    decode = {"plain": "plain", "lora plain": "plain", "lora folded": "fp32"}.get(case, case)
    return model, decode


def timed(model, prompts, decode: str, new_tokens: int, pad_id: int) -> float:
    cfg = GenerationConfig(max_new_tokens=new_tokens)
    t = time.perf_counter()
    out = generate_ids(model, prompts, [], pad_id, cfg, decode=decode)
    dt = time.perf_counter() - t
    assert all(len(o) == new_tokens for o in out)
    return len(prompts) * new_tokens / dt


def agreement(ref: list[list[int]], got: list[list[int]]) -> dict:
    same = total = 0
    for a, b in zip(ref, got):
        n = max(len(a), len(b))
        total += n
        same += sum(x == y for x, y in zip(a, b))
    return {"identical_tokens_pct": round(100 * same / max(total, 1), 2),
            "identical_outputs_pct": round(100 * sum(a == b for a, b in zip(ref, got)) / len(ref), 2)}


@torch.no_grad()
def max_logit_diff(model, prompts, decode: str, pad_id: int) -> float:
    """One decode step after the same prefill: the plain step against this option's step."""
    model.eval()
    logits, mask, cache = prefill(model, prompts, pad_id)
    nxt = logits.argmax(-1)
    static = fast_decode.StaticCache.from_dynamic(cache, mask, 1)
    plain, _ = decode_step(model, nxt, mask, cache, cache_kwarg(model))
    fast = fast_decode.decoding_copy(model, "fp32" if decode == "plain" else decode).step(nxt, static)
    return float((plain - fast).abs().max())


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m", help="built-in name, model directory, or 'tiny'")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--agree-prompts", type=int, default=100)
    ap.add_argument("--agree-tokens", type=int, default=48)
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "decode_speed.json"))
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    base, tokenizer = load(args.model)
    base.eval()
    lora = with_lora(base)
    pad = tokenizer.pad_token_id
    prompts = held_out_prompts(tokenizer, max(args.agree_prompts, max(args.batches)))

    raw = {b: {c: [] for c in CASES} for b in args.batches}
    for rep in range(args.repeats + 1):  # repeat 0 warms up every case
        for b in args.batches:
            for case in CASES:
                model, decode = case_call(case, base, lora)
                tps = timed(model, prompts[:b], decode, args.new_tokens if rep else 2, pad)
                if rep:
                    raw[b][case].append(tps)
        if rep:
            print(f"repeat {rep}: " + "  ".join(f"b{b} {c} {raw[b][c][-1]:.1f}" for b in args.batches for c in CASES),
                  flush=True)

    stops = stop_token_ids(tokenizer)
    cfg = GenerationConfig(max_new_tokens=args.agree_tokens)
    outputs = {}
    for case in CASES:
        model, decode = case_call(case, base, lora)
        outputs[case] = []
        for i in range(0, args.agree_prompts, 8):
            outputs[case] += generate_ids(model, prompts[i:i + 8][:args.agree_prompts - i], stops, pad, cfg,
                                          decode=decode)
    agree, diffs = {}, {}
    for case in CASES:
        ref = outputs["lora plain" if case.startswith("lora") else "plain"]
        agree[case] = agreement(ref, outputs[case])
        model, decode = case_call(case, base, lora)
        diffs[case] = 0.0 if decode == "plain" else max_logit_diff(model, prompts[:8], decode, pad)

    table = {}
    for b in args.batches:
        for case in CASES:
            ref = "lora plain" if case.startswith("lora") else "plain"
            ratios = [x / y for x, y in zip(raw[b][case], raw[b][ref])]
            table[f"{case} b{b}"] = {"case": case, "batch": b, "tok_s": round(statistics.median(raw[b][case]), 2),
                                     "x_plain_per_repeat": [round(r, 3) for r in ratios],
                                     "x_plain": round(statistics.median(ratios), 3)}
    print(f"\n{'case':<14}{'batch':>6}{'tok/s':>9}{'x plain':>9}  per repeat        {'same tokens':>12}"
          f"{'same outputs':>13}{'max |dlogit|':>13}")
    for row in table.values():
        a = agree[row["case"]]
        print(f"{row['case']:<14}{row['batch']:>6}{row['tok_s']:>9.1f}{row['x_plain']:>9.2f}  "
              f"{str(row['x_plain_per_repeat']):<18}{a['identical_tokens_pct']:>11.1f}%"
              f"{a['identical_outputs_pct']:>12.1f}%{diffs[row['case']]:>13.2e}")
    result = {"model": args.model, "threads": args.threads, "repeats": args.repeats, "new_tokens": args.new_tokens,
              "agree_prompts": args.agree_prompts, "agree_tokens": args.agree_tokens, "cpu": platform.processor(),
              "torch": torch.__version__, "table": table, "agreement": agree, "max_logit_diff": diffs,
              "raw_tok_s": {str(b): v for b, v in raw.items()}}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp")
    tmp.write_text(json.dumps(result, indent=2))
    os.replace(tmp, out)
    print(f"wrote {out}")
    return result


if __name__ == "__main__":
    main()
