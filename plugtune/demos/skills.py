"""The two-skill demo: several skill adapters on one base, trained together, served together.

    plugtune demo --skills dates,prices

1. trains one LoRA adapter per skill in one multi-task run (shared mixed batches, training/recipes/multitask.py);
2. scores the base and every adapter on every skill's held-out set, all in mixed batches (each
   row decodes with its own adapter);
3. checks that the mixed batch scores what each adapter scores alone (use(name), plain batches);
4. routes the union of the held-out prompts with the router the run fitted (adapters="auto", the
   default router kind: inference/router.py) and scores the routed answers against the oracle that
   answers each prompt with its own adapter;
5. measures routing where nothing was seen in fitting: the held-out skill prompts (written with
   templates no training prompt uses) to their adapter; general-chat questions (chatterbot-corpus,
   the "measure" part) and confusable requests (mention dates or prices, ask no conversion; the
   held-out templates of tasks/skills/confusable.py) to the base.
"""
from __future__ import annotations

import json
import time
from dataclasses import replace
from pathlib import Path

from plugtune.config import load_run_config, validate_run_config
from plugtune.data import load_examples
from plugtune.evaluation import exact_match
from plugtune.inference.generate import GenerationConfig
from plugtune.inference.language_model import LanguageModel
from plugtune.inference.router import load_router, routing_report
from plugtune.models.loading import load_base
from plugtune.tasks.skills.confusable import chat_prompts, confusable_prompts
from plugtune.tasks.skills.generate import SKILLS
from plugtune.training.run import train


def run_skills_demo(skills: list[str], model: str | None = None, out: str = "runs/skills", steps: int | None = None,
                    n_test: int = 50, n_chat: int | None = None, overrides: list[str] | None = None) -> dict:
    unknown = [s for s in skills if s not in SKILLS]
    if unknown or len(skills) < 2:
        raise ValueError(f"--skills needs two or more built-in skills separated by commas (got {skills}; "
                         f"built-in: {', '.join(SKILLS)})")
    extra = [f"output.dir={out}"] + ([f"model.name={model}"] if model else []) + \
            ([f"training.max_steps={steps}"] if steps else [])
    cfg = load_run_config("demo_skills", extra + list(overrides or []))
    template = next(iter(cfg.adapters.values()))  # every skill gets the shipped adapter settings
    cfg.adapters = {s: replace(template, train=f"plugtune:skills/{s}_train.jsonl", eval="") for s in skills}
    validate_run_config(cfg)
    t_start = time.perf_counter()
    loaded = load_base(cfg.model.name, cfg.model.dtype, cfg.model.device, cfg.model.quantize)
    print(f"[demo] training {len(skills)} adapters together ({', '.join(skills)}) in mixed batches ...")
    report = train(cfg, loaded)
    lm = LanguageModel(loaded)
    model_, tok = lm.model, lm.tokenizer
    gen = GenerationConfig(max_new_tokens=20)
    tests = {s: load_examples(f"plugtune:skills/{s}_test.jsonl")[:n_test] for s in skills}

    # 2. Every (adapter or base) x skill cell, in shared mixed batches.
    t0 = time.perf_counter()
    rows, names, cells = [], [], []
    for who in [None, *skills]:
        for s in skills:
            rows += tests[s]
            names += [who] * len(tests[s])
            cells += [(who or "base", s)] * len(tests[s])
    mixed = exact_match(model_, tok, rows, gen, batch_size=32, adapter_names=names)
    table = {who or "base": {} for who in [None, *skills]}
    for (who, s), sample in zip(cells, mixed.samples):
        table[who].setdefault(s, []).append(sample["correct"])
    table = {who: {s: sum(v) / len(v) for s, v in row.items()} for who, row in table.items()}
    mixed_seconds = time.perf_counter() - t0

    # 3. Each adapter alone on its own skill (plain batches, one active adapter).
    alone = {}
    for s in skills:
        lm.use(s)
        alone[s] = exact_match(model_, tok, tests[s], gen, batch_size=32).accuracy
    lm.use(None)

    # 4-5. The router, on the union of held-out prompts, general chat and confusable requests.
    router = load_router(Path(report.artifact) / "router", model_, known=skills)
    lm.router = router
    union = [ex for s in skills for ex in tests[s]]
    routed_names = router.route(model_, tok, [ex.prompt_messages() for ex in union])
    routed = exact_match(model_, tok, union, gen, batch_size=32, adapter_names=routed_names)
    own = [(who, s) for who, s in cells if who == s]  # the oracle: each prompt answered by its own adapter
    oracle = sum(sample["correct"] for (who, s), sample in zip(cells, mixed.samples) if who == s) / len(own)
    routing = routing_report(router, model_, tok, {**{s: [ex.prompt_messages() for ex in tests[s]] for s in skills},
                                                   None: chat_prompts("measure", n_chat)})
    confusable = routing_report(router, model_, tok, {None: confusable_prompts("test")})["base"]
    skill_prompts = sum(routing[s]["prompts"] for s in skills)
    result = {
        "skills": skills, "model": cfg.model.name, "steps": report.steps, "test_examples_per_skill": n_test,
        "exact_match": table, "alone": alone, "routed_exact_match": routed.accuracy, "oracle_exact_match": oracle,
        "router": {"kind": router.kind, "threshold": router.threshold, "calibration": router.calibration},
        "routing": routing, "routing_confusable": confusable,
        "routing_accuracy_skills": sum(routing[s]["accuracy"] * routing[s]["prompts"] for s in skills) / skill_prompts,
        "routing_accuracy_chat_to_base": routing["base"]["accuracy"],
        "routing_accuracy_confusable_to_base": confusable["accuracy"],
        "train_seconds": report.train_seconds, "mixed_eval_seconds": mixed_seconds,
        "mixed_eval_rows": len(rows), "total_seconds": time.perf_counter() - t_start,
        "peak_memory_mb": report.peak_memory_mb, "trainable_params": report.trainable_params,
        "adapters_dir": report.artifact,
        "mixed_batch_sample": [{"adapter": n, "prompt": s["prompt"], "answer": s["generated"], "correct": s["correct"]}
                               for n, s in zip(routed_names, routed.samples)][:: max(1, len(union) // 6)][:6],
    }
    Path(out, "skills_demo_report.json").write_text(json.dumps(result, indent=2))
    print(format_skills_table(result))
    return result


def format_skills_table(r: dict) -> str:
    skills = r["skills"]
    width = max(12, *(len(s) for s in skills))
    lines = [f"\n== plugtune demo: skills {', '.join(skills)} on {r['model']} ({r['test_examples_per_skill']} held-out "
             "examples per skill, exact match) ==",
             f"{'answered by':<{width + 8}}" + "".join(f"{s:>12}" for s in skills)]
    for who, row in r["exact_match"].items():
        label = who if who == "base" else f"{who} adapter"
        lines.append(f"{label:<{width + 8}}" + "".join(f"{row[s]:>12.1%}" for s in skills))
    lines.append(f"{'auto-routed':<{width + 8}}{r['routed_exact_match']:>12.1%}  (union of all held-out prompts; "
                 f"oracle, each prompt's own adapter: {r['oracle_exact_match']:.1%})")
    lines.append("\nmixed batch vs alone (each adapter on its own skill): " + ", ".join(
        f"{s} {r['exact_match'][s][s]:.1%} vs {r['alone'][s]:.1%}" for s in skills))
    lines.append(f"routing ({r['router']['kind']} router, threshold {r['router']['threshold']:.3f}; held-out wordings): "
                 f"{r['routing_accuracy_skills']:.1%} of held-out skill prompts to the right adapter, "
                 f"{r['routing_accuracy_chat_to_base']:.1%} of {r['routing']['base']['prompts']} general-chat "
                 f"prompts and {r['routing_accuracy_confusable_to_base']:.1%} of {r['routing_confusable']['prompts']} "
                 "confusable requests to the base")
    lines.append(f"time: train {r['train_seconds']:.0f} s ({r['steps']} steps), mixed-batch eval of "
                 f"{r['mixed_eval_rows']} rows {r['mixed_eval_seconds']:.0f} s, total {r['total_seconds']:.0f} s; "
                 f"peak RSS {r['peak_memory_mb']:.0f} MB")
    lines.append("\none mixed batch, auto-routed:")
    for s in r["mixed_batch_sample"]:
        lines.append(f"  [{s['adapter'] or 'base'}] {s['prompt'][:60]!r} -> {s['answer'][:30]!r}"
                     f" {'ok' if s['correct'] else 'wrong'}")
    return "\n".join(lines)
