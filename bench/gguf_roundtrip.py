"""GGUF export checked by llama.cpp itself: greedy generations and the demo's held-out accuracy.

llama.cpp runs through a pinned llama-cpp-python, compiled here (not a plugtune dependency, not in
the default test run):

    flock /tmp/plugtune-cpu.lock env CMAKE_BUILD_PARALLEL_LEVEL=2 pip install llama-cpp-python==0.3.36

What it does, on the default model and the demo's LoRA adapter (runs/demo/adapter, from `plugtune demo`):
1. `plugtune export`: the merged model (one GGUF per --quants), the base alone (f32) and the adapter
   alone as a llama.cpp LoRA GGUF (f32).
2. 20 prompts (the first 10 held-out prompts of the skill and 10 general-chat questions the adapter
   never saw), chat template applied by plugtune, --new-tokens greedy tokens each, by plugtune (base +
   adapter, unmerged, as `plugtune generate` runs it) and by llama.cpp (merged GGUF; base GGUF with
   `--lora`). Both start from the same prompt token ids; llama.cpp's own tokenization of the rendered
   prompt is compared with plugtune's separately. Token agreement = positions where both produced the
   same token / the longer of the two sequences, summed over prompts; also how many of the 20
   sequences are identical.
3. The demo's held-out set (--n-test prompts, the whole test split by default), 24 new tokens as the
   demo: exact match by plugtune and by llama.cpp (answers detokenized by llama.cpp).

    python bench/gguf_roundtrip.py [--model smollm2-135m] [--adapter runs/demo/adapter] [--skill dates]
                                   [--quants f32,f16,q8_0] [--n-test 100] [--new-tokens 32] [--threads 2]
                                   [--out bench/results/gguf_roundtrip.json]

Prints a table and writes JSON (every generation included).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from plugtune.api import load  # noqa: E402
from plugtune.data import load_examples  # noqa: E402
from plugtune.data.tokenize import prompt_ids, render  # noqa: E402
from plugtune.evaluation import normalise_answer  # noqa: E402
from plugtune.export import export_gguf  # noqa: E402
from plugtune.inference.generate import GenerationConfig, generate_ids, stop_token_ids  # noqa: E402
from plugtune.tasks.chat import general_chat_prompts  # noqa: E402


def plugtune_greedy(lm, prompts: list[list[int]], new_tokens: int, stops: list[int]) -> tuple[list[list[int]], float]:
    t0 = time.perf_counter()
    out = generate_ids(lm.model, prompts, stops, lm.tokenizer.pad_token_id, GenerationConfig(max_new_tokens=new_tokens))
    return out, time.perf_counter() - t0


def llamacpp_greedy(llm, prompts: list[list[int]], new_tokens: int, stops: list[int]) -> tuple[list[list[int]], float]:
    """Greedy (temperature 0: llama.cpp's greedy sampler), no repetition penalty, stop tokens excluded."""
    t0 = time.perf_counter()
    outs = []
    for ids in prompts:
        new: list[int] = []
        if len(ids) + new_tokens > llm.n_ctx():
            raise ValueError(f"a prompt of {len(ids)} tokens does not fit n_ctx {llm.n_ctx()}")
        for tok in llm.generate(ids, temp=0.0, top_k=1, top_p=1.0, min_p=0.0, repeat_penalty=1.0):
            if tok in stops:
                break
            new.append(tok)
            if len(new) >= new_tokens:
                break
        outs.append(new)
    return outs, time.perf_counter() - t0


def agreement(ours: list[list[int]], theirs: list[list[int]]) -> dict:
    same = total = identical = 0
    for a, b in zip(ours, theirs):
        same += sum(x == y for x, y in zip(a, b))
        total += max(len(a), len(b), 1)
        identical += a == b
    return {"token_agreement": same / total, "identical_sequences": identical, "sequences": len(ours)}


def open_llama(path: Path, threads: int, lora: Path | None = None, n_ctx: int = 512):
    from llama_cpp import Llama

    return Llama(model_path=str(path), lora_path=str(lora) if lora else None, n_ctx=n_ctx, n_batch=n_ctx,
                 n_threads=threads, n_threads_batch=threads, seed=0, verbose=False)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--adapter", default=str(ROOT / "runs/demo/adapter"))
    ap.add_argument("--skill", default="dates", help="whose held-out split to score (the adapter's skill)")
    ap.add_argument("--quants", default="f32,f16,q8_0", help="merged-model GGUFs to check")
    ap.add_argument("--n-test", type=int, default=100, help="held-out prompts for exact match (0: none)")
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--workdir", default=None, help="where the GGUF files go (default: a temporary folder)")
    ap.add_argument("--out", default=str(ROOT / "bench/results/gguf_roundtrip.json"))
    args = ap.parse_args(argv)
    import llama_cpp

    torch.set_num_threads(args.threads)
    adapter = Path(args.adapter)
    if not (adapter / "adapter_config.json").is_file():
        raise SystemExit(f"{adapter} is not an adapter directory: run `plugtune demo` (writes runs/demo/adapter) "
                         "or pass --adapter DIR")
    work = Path(args.workdir or tempfile.mkdtemp(prefix="gguf-roundtrip-"))
    work.mkdir(parents=True, exist_ok=True)

    # 1. Exports
    exports = {}
    quants = [q for q in args.quants.split(",") if q]
    for q in quants:
        exports[f"merged-{q}"] = export_gguf(work / f"merged-{q}.gguf", args.model, adapter, quant=q, overwrite=True)
    exports["base-f32"] = export_gguf(work / "base-f32.gguf", args.model, quant="f32", overwrite=True)
    exports["lora-f32"] = export_gguf(work / "lora-f32.gguf", args.model, adapter, adapter_only=True, overwrite=True)
    export_rows = {k: {"seconds": round(r.seconds, 2), "mb": round(r.path.stat().st_size / 2**20, 1)}
                   for k, r in exports.items()}

    # 2. Prompts, plugtune's generations
    lm = load(args.model, str(adapter), "float32", "cpu")
    tok = lm.tokenizer
    stops = stop_token_ids(tok)
    test = load_examples(f"plugtune:skills/{args.skill}_test.jsonl")
    n_test = min(args.n_test, len(test)) if args.n_test else 0
    prompts_text = [ex.prompt_messages()[-1]["content"] for ex in test[:10]] + general_chat_prompts(10)
    messages = [[{"role": "user", "content": p}] for p in prompts_text]
    ids20 = [prompt_ids(tok, m) for m in messages]
    ours20, ours20_s = plugtune_greedy(lm, ids20, args.new_tokens, stops)
    held = test[:n_test]
    held_ids = [prompt_ids(tok, ex.prompt_messages()) for ex in held]
    ours_held, ours_held_s = plugtune_greedy(lm, held_ids, 24, stops) if held else ([], 0.0)

    def accuracy(answers: list[str]) -> float:
        return sum(normalise_answer(a) == normalise_answer(ex.reference) for a, ex in zip(answers, held)) / len(held)

    ours_answers = [tok.decode(t, skip_special_tokens=True) for t in ours_held]
    rows = [{"runner": "plugtune (base + adapter, fp32)", "file": None, "token_agreement": 1.0,
             "identical_sequences": 20, "accuracy": accuracy(ours_answers) if held else None,
             "seconds_20": round(ours20_s, 2), "seconds_held_out": round(ours_held_s, 2)}]
    samples = {"plugtune": [tok.decode(t) for t in ours20]}

    # 3. llama.cpp: each merged GGUF, and the base GGUF + the LoRA GGUF
    cases = [(f"llama.cpp merged {q}", work / f"merged-{q}.gguf", None) for q in quants]
    cases.append(("llama.cpp base f32 + LoRA f32", work / "base-f32.gguf", work / "lora-f32.gguf"))
    tokenizer_match = None
    for label, path, lora in cases:
        llm = open_llama(path, args.threads, lora)
        if tokenizer_match is None:  # llama.cpp's own tokenization of the rendered prompts
            texts = [render(tok, m, add_generation_prompt=True) for m in messages] + \
                    [render(tok, ex.prompt_messages(), add_generation_prompt=True) for ex in held]
            theirs_tok = [llm.tokenize(t.encode(), add_bos=False, special=True) for t in texts]
            tokenizer_match = sum(a == b for a, b in zip(theirs_tok, ids20 + held_ids)) / len(texts)
        theirs20, s20 = llamacpp_greedy(llm, ids20, args.new_tokens, stops)
        theirs_held, s_held = llamacpp_greedy(llm, held_ids, 24, stops) if held else ([], 0.0)
        answers = [llm.detokenize(t).decode("utf-8", errors="replace") for t in theirs_held]
        rows.append({"runner": label, "file": path.name + (f" + {lora.name}" if lora else ""),
                     **agreement(ours20, theirs20), "accuracy": accuracy(answers) if held else None,
                     "seconds_20": round(s20, 2), "seconds_held_out": round(s_held, 2),
                     "held_out_answers_equal_plugtune": sum(a == b for a, b in zip(answers, ours_answers))})
        samples[label] = [tok.decode(t) for t in theirs20]
        del llm

    result = {
        "command": "python bench/gguf_roundtrip.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "model": args.model, "adapter": str(adapter), "skill": args.skill, "held_out_prompts": len(held),
        "new_tokens_20": args.new_tokens, "threads": args.threads, "llama_cpp_python": llama_cpp.__version__,
        "torch": torch.__version__, "machine": platform.processor() or platform.machine(),
        "llamacpp_tokenization_equal_to_plugtune": tokenizer_match, "exports": export_rows, "rows": rows,
        "prompts_20": prompts_text, "generations_20": samples,
    }
    print(f"\nGGUF round trip: {args.model} + {adapter}; 20 prompts x {args.new_tokens} greedy tokens; "
          f"exact match on {len(held)} held-out '{args.skill}' prompts; llama-cpp-python {llama_cpp.__version__}")
    print(f"llama.cpp tokenizes the rendered prompts exactly as plugtune: {tokenizer_match:.0%}")
    print(f"{'runner':34} {'token agr.':>10} {'identical':>9} {'accuracy':>8} {'s (20)':>7} {'s (held)':>8}")
    for r in rows:
        acc = f"{r['accuracy']:.1%}" if r["accuracy"] is not None else "-"
        print(f"{r['runner']:34} {r['token_agreement']:>10.1%} {r['identical_sequences']:>6}/20 {acc:>8} "
              f"{r['seconds_20']:>7} {r['seconds_held_out']:>8}")
    for k, v in export_rows.items():
        print(f"  export {k}: {v['mb']} MiB in {v['seconds']} s")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(f"wrote {args.out}")
    return result


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
