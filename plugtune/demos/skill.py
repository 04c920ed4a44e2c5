"""The demo: a skill the base model cannot do, before/after a LoRA adapter, in a few minutes on CPU.

Same held-out prompts and the same greedy decoding before and after; the test prompts never
appear in training (see tasks/skills/generate.py).
"""
from __future__ import annotations

import json
import time
from pathlib import Path

from plugtune.config import load_run_config
from plugtune.data import load_examples
from plugtune.evaluation import exact_match
from plugtune.inference.generate import GenerationConfig
from plugtune.models.loading import load_base
from plugtune.tasks.skills.generate import SKILLS
from plugtune.training.run import train


def dir_size_mb(path: Path, pattern: str = "*") -> float:
    return sum(f.stat().st_size for f in Path(path).glob(pattern) if f.is_file()) / 2**20


def run_demo(skill: str = "dates", model: str | None = None, out: str = "runs/demo", steps: int | None = None,
             n_test: int = 100, overrides: list[str] | None = None, samples: int = 4, before=None) -> dict:
    """Evaluate, train an adapter, evaluate again; `before` reuses an earlier base evaluation."""
    if skill not in SKILLS:
        raise ValueError(f"unknown skill '{skill}' (built-in: {', '.join(SKILLS)})")
    extra = [f"data.train=plugtune:skills/{skill}_train.jsonl", f"data.eval=plugtune:skills/{skill}_test.jsonl",
             f"output.dir={out}"]
    if model:
        extra.append(f"model.name={model}")
    if steps:
        extra.append(f"training.max_steps={steps}")
    cfg = load_run_config("demo_lora", extra + list(overrides or []))
    t_start = time.perf_counter()
    loaded = load_base(cfg.model.name, cfg.model.dtype, cfg.model.device, cfg.model.quantize)
    test = load_examples(cfg.data.eval)[:n_test]
    gen = GenerationConfig(max_new_tokens=24)  # greedy; every answer of the built-in skills is shorter

    if before is None:
        print(f"[demo] skill '{skill}': evaluating the base model on {len(test)} held-out examples ...")
        before = exact_match(loaded.model, loaded.tokenizer, test, gen)
    print(f"[demo] before: {before.accuracy:.1%} exact match ({before.seconds:.1f} s)")

    report = train(cfg, loaded)
    print(f"[demo] evaluating the adapted model on the same {len(test)} examples ...")
    after = exact_match(loaded.model, loaded.tokenizer, test, gen)
    base_params = report.total_params - report.trainable_params
    result = {
        "skill": skill, "model": cfg.model.name, "method": cfg.method, "adapter": cfg.adapter, "lr": cfg.training.lr, "test_examples": len(test), "steps": report.steps,
        "accuracy_before": before.accuracy, "accuracy_after": after.accuracy,
        "trainable_params": report.trainable_params, "base_params": base_params,
        "trainable_pct": 100 * report.trainable_params / base_params,
        "train_seconds": report.train_seconds, "eval_seconds_before": before.seconds, "eval_seconds_after": after.seconds,
        "total_seconds": time.perf_counter() - t_start, "peak_memory_mb": report.peak_memory_mb,
        "adapter_mb": dir_size_mb(Path(report.artifact)), "adapter_dir": report.artifact,
        "samples": [{"prompt": b["prompt"], "reference": b["reference"], "before": b["generated"], "after": a["generated"]}
                    for b, a in zip(before.samples[:samples], after.samples[:samples])],
    }
    Path(out, "demo_report.json").write_text(json.dumps(result, indent=2))
    print(format_demo_table(result))
    result["before_result"] = before
    return result


def format_demo_table(r: dict) -> str:
    rows = [
        ("exact match (held-out)", f"{r['accuracy_before']:.1%}", f"{r['accuracy_after']:.1%}"),
        ("trainable parameters", "0", f"{r['trainable_params']:,} ({r['trainable_pct']:.2f}% of {r['base_params']:,})"),
        ("wall time", f"eval {r['eval_seconds_before']:.1f} s",
         f"train {r['train_seconds']:.1f} s ({r['steps']} steps) + eval {r['eval_seconds_after']:.1f} s"),
        ("peak memory (process RSS)", "", f"{r['peak_memory_mb']:.0f} MB"),
        ("adapter size on disk", "", f"{r['adapter_mb']:.2f} MB"),
    ]
    width = max(len(a) for a, _, _ in rows)
    lines = [f"\n== plugtune demo: skill '{r['skill']}' on {r['model']} ({r['test_examples']} held-out examples) ==",
             f"{'':{width}}  {'before':<16}  after", "-" * (width + 60)]
    lines += [f"{a:{width}}  {b:<16}  {c}" for a, b, c in rows]
    lines.append(f"total demo time {r['total_seconds']:.0f} s\n\nsample generations:")
    for s in r["samples"]:
        lines.append(f"  prompt:    {s['prompt']}\n  reference: {s['reference']}\n"
                     f"  before:    {s['before'][:80]!r}\n  after:     {s['after'][:80]!r}\n")
    return "\n".join(lines)
