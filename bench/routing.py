"""Routers compared on held-out wordings: which adapter (or the base) each request goes to.

Adapters: the skills demo's (one LoRA per skill, r 16 on q/k/v/o, trained together for 40 steps of
16 rows on the shipped demo_skills config), trained once into --pool unless it already holds them.
Every router kind (inference/routers.py) is fitted the way a multi-task run fits it: the first 256
training prompts of each skill (training templates), the shipped negatives (general-chat "fit" part,
confusable training prompts) and the threshold calibrated on the chat "calibrate" part. Measured on
sets none of them saw:

- skill prompts: each skill's 100 test prompts, written with held-out templates -> the right adapter
- general chat: the chatterbot questions of the "measure" part -> the base
- confusable: the held-out confusable requests (mention dates or prices, ask no conversion) -> the base
- exact match of the auto-routed answers on the union of the skill test sets, against the oracle
  that answers each prompt with its own adapter (same greedy decoding, 20 new tokens)
- fit seconds; per-request latency (median of 16 single-prompt routes, after one warm-up)

    python bench/routing.py [--skills dates,prices] [--pool runs/routing_bench] [--threads 2]
                            [--kinds hidden,minilm,hidden+minilm,arrow] [--out bench/results/routing.json]

Prints a table and writes JSON.
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch


def train_pool(skills: list[str], pool: Path, model: str, threads: int, steps: int | None) -> None:
    from dataclasses import replace

    from plugtune.config import load_run_config, validate_run_config
    from plugtune.training.run import train

    cfg = load_run_config("demo_skills", [f"output.dir={pool}", f"model.name={model}", "router.build=false",
                                          "output.overwrite=true", "training.progress=false", f"training.threads={threads}"]
                          + ([f"training.max_steps={steps}"] if steps else []))
    template = next(iter(cfg.adapters.values()))
    cfg.adapters = {s: replace(template, train=f"plugtune:skills/{s}_train.jsonl", eval="") for s in skills}
    validate_run_config(cfg)
    train(cfg)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--skills", default="dates,prices")
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--pool", default="runs/routing_bench")
    p.add_argument("--kinds", default="hidden,minilm,hidden+minilm,arrow")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--steps", type=int, default=None, help="training steps (default: the demo's 40)")
    p.add_argument("--n-test", type=int, default=100, help="held-out skill prompts per skill")
    p.add_argument("--no-exact-match", action="store_true")
    p.add_argument("--out", default="bench/results/routing.json")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)

    from plugtune.data import load_examples
    from plugtune.evaluation import exact_match
    from plugtune.inference.generate import GenerationConfig
    from plugtune.inference.language_model import LanguageModel
    from plugtune.inference.router import fit_router, routing_report
    from plugtune.models.loading import load_base
    from plugtune.tasks.skills.confusable import chat_prompts, confusable_prompts

    skills = args.skills.split(",")
    pool = Path(args.pool)
    t0 = time.perf_counter()
    if not all((pool / "adapters" / s / "adapter_config.json").is_file() for s in skills):
        print(f"[bench] training the {', '.join(skills)} adapters (the skills demo's settings) into {pool} ...")
        train_pool(skills, pool, args.model, args.threads, args.steps)
    train_seconds = time.perf_counter() - t0
    lm = LanguageModel(load_base(args.model, "auto", "auto"))
    for s in skills:
        lm.add_adapter(s, pool / "adapters" / s)
    model, tok = lm.model, lm.tokenizer
    train_prompts = {s: [ex.prompt_messages() for ex in load_examples(f"plugtune:skills/{s}_train.jsonl")][:256]
                     for s in skills}
    tests = {s: load_examples(f"plugtune:skills/{s}_test.jsonl")[:args.n_test] for s in skills}
    labelled = {**{s: [ex.prompt_messages() for ex in tests[s]] for s in skills}, None: chat_prompts("measure")}
    confusable = confusable_prompts("test")
    union = [ex for s in skills for ex in tests[s]]
    gen = GenerationConfig(max_new_tokens=20)
    oracle = None
    if not args.no_exact_match:
        oracle = exact_match(model, tok, union, gen, batch_size=32, adapter_names=[s for s in skills for _ in tests[s]])

    rows = []
    for kind in args.kinds.split(","):
        t = time.perf_counter()
        router = fit_router(model, tok, train_prompts, kind=kind)
        fit_s = time.perf_counter() - t
        report = routing_report(router, model, tok, labelled)
        conf = routing_report(router, model, tok, {None: confusable})["base"]
        singles = [p for ps in labelled.values() for p in ps[:4]][:17]
        times = []
        for prompt in singles:
            t = time.perf_counter()
            router.route(model, tok, [prompt])
            times.append(time.perf_counter() - t)
        skill_n = sum(report[s]["prompts"] for s in skills)
        row = {"kind": kind, "threshold": router.threshold, "calibration": router.calibration,
               "skills_to_right_adapter": sum(report[s]["accuracy"] * report[s]["prompts"] for s in skills) / skill_n,
               "per_skill": {s: report[s]["accuracy"] for s in skills},
               "chat_to_base": report["base"]["accuracy"], "chat_prompts": report["base"]["prompts"],
               "confusable_to_base": conf["accuracy"], "confusable_prompts": conf["prompts"],
               "routed": {k: v["routed"] for k, v in report.items()} | {"confusable": conf["routed"]},
               "fit_seconds": fit_s, "latency_ms": 1000 * statistics.median(times[1:])}
        if oracle is not None:
            names = router.route(model, tok, [ex.prompt_messages() for ex in union])
            row["auto_exact_match"] = exact_match(model, tok, union, gen, batch_size=32, adapter_names=names).accuracy
        rows.append(row)
        print(f"[bench] {kind}: skills {row['skills_to_right_adapter']:.1%}, chat {row['chat_to_base']:.1%}, "
              f"confusable {row['confusable_to_base']:.1%}, fit {fit_s:.1f} s", flush=True)

    result = {"skills": skills, "model": args.model, "threads": args.threads, "machine": platform.processor() or platform.machine(),
              "skill_prompts_per_skill": args.n_test, "oracle_exact_match": oracle.accuracy if oracle else None,
              "train_seconds": train_seconds, "total_seconds": time.perf_counter() - t0, "routers": rows}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(format_table(result))
    return result


def format_table(r: dict) -> str:
    lines = [f"\n== routing on held-out wordings: {', '.join(r['skills'])} adapters on {r['model']} ==",
             "| router | skills -> right adapter | chat -> base | confusable -> base | auto exact match | fit s | ms/request |",
             "|---|---|---|---|---|---|---|"]
    for row in r["routers"]:
        em = f"{row['auto_exact_match']:.1%}" if "auto_exact_match" in row else "-"
        lines.append(f"| {row['kind']} | {row['skills_to_right_adapter']:.1%} | {row['chat_to_base']:.1%} | "
                     f"{row['confusable_to_base']:.1%} | {em} | {row['fit_seconds']:.1f} | {row['latency_ms']:.0f} |")
    if r["oracle_exact_match"] is not None:
        lines.append(f"| oracle (each prompt's own adapter) | 100% | | | {r['oracle_exact_match']:.1%} | | |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
