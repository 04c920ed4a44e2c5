"""CUDA paths and timings, in one run on a GPU machine (CPU CI never runs this; everything here is also
tested on CPU). No downloads: tiny random models for correctness, a random model of SmolLM2-135M's
shape for timings.

    python bench/cuda_check.py [--out bench/results/cuda_check.json]

Checks (each prints PASS/FAIL with its numbers; exit 1 if any fails):
  forward     LoRA model, fp32 on CUDA vs CPU: logits close
  mixed       per-row mixed batch of 3 LoRA adapters (grouped and stacked paths) on CUDA = each row alone
  generate    greedy KV-cache generation on CUDA = on CPU (fp32, tiny model); repeated prompts prefill once
  fast_decode the fast decoder (static cache; LoRA folded), its static-shape step and, on CUDA, its CUDA
              graph give the plain path's greedy tokens (fp32, tiny model; the CPU test runs all but the graph)
  trees       prompt-sharing forward (pairs.pack_trees) on CUDA = the padded forward, values and gradients
  sft         plugtune.train on CUDA (auto dtype: fp32 weights, bf16 autocast; auto layout):
              loss falls, finite; the saved adapter reloads on CPU with the same logits (bf16 tolerance)
  dpo, grpo   one short run of each objective on CUDA: finite losses, adapters written
Timings (SmolLM2-135M shape, random weights, bf16 autocast): LoRA SFT step (8 sequences of 64-255 tokens,
packed with per-example attention vs padded) and KV-cache decode tokens/s at batch 8 and 64: today's path
(fp32 weights, bf16 autocast, Hugging Face forward, DynamicCache: 76 tok/s at batch 8 on an H100 before),
and on a bf16 copy of the model the plain path, the fast decoder (static cache), its CUDA graph
(decode="cuda-graph") and torch.compile mode reduce-overhead (decode="compile"), all in the same run, with
greedy agreement against the bf16 plain path. Goal (issue 17): >= 5x today's tok/s at batch 8. The
decode part alone: `python bench/cuda_check.py --only decode`.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from plugtune.adapters import adapter_state, attach_adapter  # noqa: E402
from plugtune.models.tiny import build_model  # noqa: E402

RESULTS: dict = {}


def check(name: str, ok: bool, **numbers) -> None:
    RESULTS[name] = {"pass": bool(ok), **numbers}
    print(f"{'PASS' if ok else 'FAIL'} {name} {json.dumps(numbers)}", flush=True)


def lora_model(seed=0, names=("default",), ranks=(4,)):
    model = build_model("llama", 400, seed=seed)
    for name, r in zip(names, ranks):
        attach_adapter(model, "lora", {"r": r, "alpha": 2 * r}, name=name)
    torch.manual_seed(seed + 1)
    with torch.no_grad():
        for name in names:
            for key, p in adapter_state(model, name).items():
                if "lora_B" in key:
                    p.normal_(0, 0.2)
    return model


def forward_check(dev):
    model = lora_model()
    ids = torch.randint(3, 400, (4, 17))
    cpu = model(input_ids=ids).logits
    gpu = model.to(dev)(input_ids=ids.to(dev)).logits.cpu()
    err = (cpu - gpu).abs().max().item()
    check("forward", err < 1e-3, max_abs_diff=err)


def mixed_check(dev):
    from plugtune.adapters.layers import set_active_adapters
    from plugtune.adapters.mixed import mixed_adapters

    model = lora_model(names=("a", "b", "c"), ranks=(4, 8, 16)).to(dev).eval()
    ids = torch.randint(3, 400, (6, 11), device=dev)
    names = ["a", None, "b", "c", "a", "c"]
    with torch.no_grad(), mixed_adapters(model, names):
        mixed = model(input_ids=ids).logits
    errs = []
    with torch.no_grad():
        for i, n in enumerate(names):
            set_active_adapters(model, [n] if n else [])
            errs.append((model(input_ids=ids[i:i + 1]).logits[0] - mixed[i]).abs().max().item())
    check("mixed", max(errs) < 1e-3, max_abs_diff=max(errs))


def generate_check(dev):
    from plugtune.inference.generate import GenerationConfig, generate_ids

    model = lora_model()
    g = torch.Generator().manual_seed(0)
    a, b = (torch.randint(3, 400, (n,), generator=g).tolist() for n in (6, 9))
    prompts = [a, b, a, a]
    cfg = GenerationConfig(max_new_tokens=12)
    cpu = generate_ids(model, prompts, [2], 0, cfg)
    gpu = generate_ids(model.to(dev), prompts, [2], 0, cfg)
    sampled = generate_ids(model, prompts, [2], 0, GenerationConfig(max_new_tokens=12, temperature=1.0, seed=3))
    check("generate", cpu == gpu and all(len(s) > 0 for s in sampled), same_tokens=cpu == gpu)


def fast_decode_check(dev):
    from plugtune.inference import fast_decode
    from plugtune.inference.generate import GenerationConfig, generate_ids

    model = lora_model().to(dev).eval()
    g = torch.Generator().manual_seed(2)
    prompts = [torch.randint(3, 400, (n,), generator=g).tolist() for n in (6, 9, 4, 6)]
    cfg = GenerationConfig(max_new_tokens=12)
    plain = generate_ids(model, prompts, [2], 0, cfg, decode="plain")
    modes = ["fp32"] + (["cuda-graph"] if dev.type == "cuda" else [])
    same = {m: generate_ids(model, prompts, [2], 0, cfg, decode=m) == plain for m in modes}
    # the static-shape step (what the graph captures), run eagerly, against the plain greedy tokens
    copy = fast_decode.decoding_copy(model)
    from plugtune.inference.generate import prefill

    logits, mask, cache = prefill(model, prompts, 0)
    static = fast_decode.StaticCache.from_dynamic(cache, mask, 12)
    step = fast_decode.FixedStep(copy, static)
    tokens, nxt = [], logits.argmax(-1)
    for _ in range(11):
        tokens.append(nxt)
        nxt = step(nxt).argmax(-1)
    tokens.append(nxt)
    eager = torch.stack(tokens, 1).tolist()
    unstopped = generate_ids(model, prompts, [], 0, cfg, decode="plain")
    same["fixed_eager"] = eager == unstopped
    check("fast_decode", all(same.values()), **same)


def trees_check(dev):
    from plugtune.data.preference import PromptItem
    from plugtune.training.compute.token_logps import token_logps
    from plugtune.training.recipes.rollouts import build_rollout

    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(3, 400, (n,), generator=g).tolist() for n in (7, 12)]
    rows = [(p, torch.randint(3, 400, (int(k),), generator=g).tolist()) for p in prompts for k in (3, 5, 1, 4)]
    batch = build_rollout([PromptItem(p) for p, _ in rows], [c for _, c in rows], pad_id=0)
    batch = {k: v.to(dev) for k, v in batch.items()}
    out = []
    for share in (True, False):
        model = lora_model().to(dev)
        lp = token_logps(model, batch, share_prefixes=share)
        lp.per_token.sum().backward()
        out.append((lp.per_token.detach(), {k: p.grad.clone() for k, p in adapter_state(model, "default").items()}))
    val = (out[0][0] - out[1][0]).abs().max().item()
    grad = max((out[0][1][k] - out[1][1][k]).abs().max().item() for k in out[0][1])
    check("trees", val < 1e-4 and grad < 1e-4, max_value_diff=val, max_grad_diff=grad)


def _rows(path: Path, n: int, kind: str) -> Path:
    import random

    rng = random.Random(0)
    words = ["alpha", "beta", "gamma", "delta", "omega", "sigma"]
    rows = []
    for i in range(n):
        q = f"{rng.choice(words)} {rng.choice(words)} {i}"
        if kind == "sft":
            rows.append({"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": q.upper()}]})
        elif kind == "pairs":
            rows.append({"prompt": q, "chosen": "yes good", "rejected": "no bad"})
        else:
            rows.append({"prompt": [{"role": "user", "content": q}]})
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def train_checks(dev, work: Path):
    from plugtune.config import load_run_config
    from plugtune.models.tiny import save_tiny_model_dir
    from plugtune.training.run import train

    model_dir = save_tiny_model_dir(work / "tiny")
    common = [f"model.name={model_dir}", f"model.device={dev.type}", "training.progress=false", "output.resume=never",
              "training.schedule=constant"]
    sft = load_run_config(None, ["objective=sft", f"data.train={_rows(work / 'sft.jsonl', 64, 'sft')}", "data.eval=",
                                 f"output.dir={work / 'sft'}", "training.max_steps=20", "training.batch_size=8",
                                 "training.lr=5e-3", "adapter.r=8", *common])
    t = time.perf_counter()
    report = train(sft)
    losses = [json.loads(l)["loss"] for l in (work / "sft" / "metrics.jsonl").read_text().splitlines() if '"loss"' in l]
    # the saved adapter, reloaded on CPU in fp32, gives the logits the CUDA model gives (bf16 autocast tolerance)
    import plugtune

    lm_cpu = plugtune.load(str(model_dir), adapter={"default": str(work / "sft" / "adapter")}, device="cpu")
    ids = torch.randint(3, 200, (2, 9))
    with torch.no_grad():
        cpu_logits = lm_cpu.model(input_ids=ids).logits
        lm_gpu = plugtune.load(str(model_dir), adapter={"default": str(work / "sft" / "adapter")}, device=dev.type)
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=dev.type == "cuda"):
            gpu_logits = lm_gpu.model(input_ids=ids.to(dev)).logits.float().cpu()
    err = (cpu_logits - gpu_logits).abs().max().item() / cpu_logits.abs().max().item()
    check("sft", all(map(lambda x: x == x, losses)) and losses[-1] < losses[0] and err < 0.05,
          first_loss=losses[0], last_loss=losses[-1], reload_rel_diff=err, seconds=time.perf_counter() - t,
          data=report.data if hasattr(report, "data") else None)
    for objective, extra in (("dpo", [f"data.train={_rows(work / 'pairs.jsonl', 32, 'pairs')}", "training.max_steps=6",
                                      "training.batch_size=4", "training.lr=1e-3"]),
                             ("grpo", [f"data.train={_rows(work / 'prompts.jsonl', 16, 'prompts')}",
                                       "training.max_steps=4", "rollout.max_new_tokens=8", "rollout.samples_per_prompt=4",
                                       "rollout.prompts_per_step=2",
                                       "rollout.reward_functions=[bench.cuda_check:length_reward]"])):
        cfg = load_run_config(None, [f"objective={objective}", "data.eval=", f"output.dir={work / objective}", *extra,
                                     *common])
        rep = train(cfg)
        lines = [json.loads(l) for l in (work / objective / "metrics.jsonl").read_text().splitlines()]
        finite = all(l["loss"] == l["loss"] for l in lines if "loss" in l)
        check(objective, finite and rep.artifact is not None and Path(rep.artifact).exists(), steps=len(lines))


def length_reward(prompts, completions):
    return [min(len(c), 20) / 20 for c in completions]


def timings(dev):
    from transformers import LlamaConfig, LlamaForCausalLM

    from plugtune.inference.generate import GenerationConfig, generate_ids
    from plugtune.training.compute.token_logps import token_logps

    cfg = LlamaConfig(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                      num_key_value_heads=3, vocab_size=49152, max_position_embeddings=2048, tie_word_embeddings=True,
                      rope_theta=100000.0)
    cfg._attn_implementation = "sdpa"
    model = LlamaForCausalLM(cfg).to(dev)
    attach_adapter(model, "lora", {"r": 8, "alpha": 16, "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj"]})
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4, fused=True)
    lengths = torch.randint(64, 256, (8,), generator=torch.Generator().manual_seed(0)).tolist()
    width = max(lengths)
    ids = torch.randint(5, 49152, (8, width), device=dev)
    mask = (torch.arange(width, device=dev)[None] < torch.tensor(lengths, device=dev)[:, None]).long()
    labels = ids.masked_fill(mask == 0, -100)
    padded = {"input_ids": ids, "attention_mask": mask, "labels": labels}
    flat = torch.cat([ids[i, :n] for i, n in enumerate(lengths)])[None]
    packed = {"input_ids": flat, "position_ids": torch.cat([torch.arange(n, device=dev) for n in lengths])[None],
              "labels": torch.cat([labels[i, :n] for i, n in enumerate(lengths)])[None]}
    out = {}
    from plugtune.models import varlen

    for name, batch in (("padded", padded), ("packed_varlen", packed)):
        varlen.switch(model, varlen.NAME if name == "packed_varlen" else "sdpa")
        times = []
        for step in range(8):
            torch.cuda.synchronize()
            t = time.perf_counter()
            with torch.autocast("cuda", dtype=torch.bfloat16):
                lp = token_logps(model, batch)
                loss = -(lp.per_token.sum() / lp.mask.sum())
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            torch.cuda.synchronize()
            times.append(time.perf_counter() - t)
        out[f"lora_step_ms_{name}"] = 1000 * sorted(times[3:])[len(times[3:]) // 2]
    out["tokens_per_step"] = sum(lengths)
    varlen.switch(model, "sdpa")
    for b in (8, 64):
        prompts = [torch.randint(5, 49152, (40,)).tolist() for _ in range(b)]
        gen = GenerationConfig(max_new_tokens=64, temperature=1.0, seed=0)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            generate_ids(model, prompts[:2], [], 0, GenerationConfig(max_new_tokens=4))
            torch.cuda.synchronize()
            t = time.perf_counter()
            res = generate_ids(model, prompts, [], 0, gen)
            torch.cuda.synchronize()
        out[f"decode_tok_s_batch{b}"] = sum(len(r) for r in res) / (time.perf_counter() - t)
    out["peak_mb"] = torch.cuda.max_memory_allocated() / 2**20
    out.update(decode_timings(model, dev))
    check("timings", True, **out)


def decode_timings(model, dev, batches=(8, 64), new_tokens=64) -> dict:
    """Greedy decode tok/s of today's path and of the fast decoder's CUDA variants, alternating inside each
    of 3 repeats; each variant's greedy tokens against the bf16 plain path's."""
    import copy as copy_module

    from plugtune.inference.generate import GenerationConfig, generate_ids

    bf16 = copy_module.deepcopy(model).to(torch.bfloat16).eval()
    gen = GenerationConfig(max_new_tokens=new_tokens)
    cases = {"today (fp32 weights, autocast, plain)": (model, "plain", True), "bf16 plain": (bf16, "plain", False),
             "bf16 static cache": (bf16, "fp32", False), "bf16 cuda-graph": (bf16, "cuda-graph", False),
             "bf16 compile": (bf16, "compile", False)}
    out: dict = {}
    for b in batches:
        prompts = [torch.randint(5, 49152, (40,), generator=torch.Generator().manual_seed(i)).tolist() for i in range(b)]
        runs: dict = {name: [] for name in cases}
        tokens: dict = {}
        for rep in range(4):  # repeat 0 warms up (and compiles)
            for name, (m, decode, autocast) in cases.items():
                try:
                    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast):
                        torch.cuda.synchronize()
                        t = time.perf_counter()
                        res = generate_ids(m, prompts, [], 0, gen, decode=decode)
                        torch.cuda.synchronize()
                except Exception as exc:  # one broken variant must not hide the others
                    out[f"{name} error"] = f"{type(exc).__name__}: {exc}"
                    continue
                tokens[name] = res
                if rep:
                    runs[name].append(sum(len(r) for r in res) / (time.perf_counter() - t))
        today = sorted(runs[next(iter(cases))])[1] if runs[next(iter(cases))] else None
        for name, tps in runs.items():
            if not tps:
                continue
            med = sorted(tps)[len(tps) // 2]
            ref = tokens.get("bf16 plain")
            same = sum(x == y for a, c in zip(ref, tokens[name]) for x, y in zip(a, c)) / (b * new_tokens) if ref else None
            out[f"decode b{b} {name}"] = {"tok_s": med, "x_today": med / today if today else None,
                                          "same_tokens_vs_bf16_plain": same}
    return out


def decode_only(dev):
    """The decode timings alone, on the same random model of SmolLM2-135M's shape."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                      num_key_value_heads=3, vocab_size=49152, max_position_embeddings=2048, tie_word_embeddings=True,
                      rope_theta=100000.0)
    cfg._attn_implementation = "sdpa"
    model = LlamaForCausalLM(cfg).to(dev).eval()
    check("decode_timings", True, **decode_timings(model, dev))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "cuda_check.json"))
    parser.add_argument("--only", choices=["decode"], help="run the decode check and timings only (a few minutes)")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("no CUDA device: nothing to check here (every path is tested on CPU)")
        return 0
    dev = torch.device("cuda")
    RESULTS["device"] = torch.cuda.get_device_name(0)
    RESULTS["torch"] = torch.__version__
    with tempfile.TemporaryDirectory() as tmp:
        steps = (forward_check, mixed_check, generate_check, fast_decode_check, trees_check,
                 lambda d: train_checks(d, Path(tmp)), timings)
        if args.only == "decode":
            steps = (fast_decode_check, decode_only)
        for fn in steps:
            try:
                fn(dev)
            except Exception as exc:  # report and go on: one broken path must not hide the others
                import traceback

                traceback.print_exc()
                check(getattr(fn, "__name__", "train"), False, error=f"{type(exc).__name__}: {exc}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(RESULTS, indent=2))
    failed = [k for k, v in RESULTS.items() if isinstance(v, dict) and not v["pass"]]
    print(f"wrote {args.out}; {'all passed' if not failed else 'FAILED: ' + ', '.join(failed)}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
