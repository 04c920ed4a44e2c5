"""The pick guide from synthetic measured results: a clear winner is named with its numbers; a tie is
"too weak" and falls back on cost, said as such; nothing beats the base -> no pick; no sweep -> not
measured; assistant-like behaviour always points to the instruction-tuning pipeline."""
import pytest

from plugtune.compare.guide import guide_markdown, pick_guide
from plugtune.compare.results import analyse


def seed_row(name, method, correct, params, disk, family="adapters", n=100, retention=1.0, seed=0):
    items = [1] * correct + [0] * (n - correct)
    return {"name": name, "family": family, "method": method, "adapter": {}, "seed": seed, "training_seed": seed,
            "exact_match": correct / n, "correct": correct, "total": n, "item_correct": items,
            "item_loss": [[(1.0 - c) * 3 + 0.5, 5] for c in items], "heldout_loss": None,
            "retention_items": [[retention * 4, 4]] * 20, "retention_loss": retention,
            "trainable_params": params, "trainable_pct": 100 * params / 1e6, "checkpoint_bytes": disk,
            "peak_memory_mb": 100.0, "memory_over_base_mb": 10.0, "train_seconds": 1.0, "seconds_per_step": 0.1,
            "examples_per_second": 1.0, "tokens_per_second": 1.0, "loss_curve": [[1, 2.0]], "run_dir": "x",
            "steps": 10, "batch_size": 8, "grad_accum": 1}


def fill_loss(row):
    row["heldout_loss"] = sum(s for s, _ in row["item_loss"]) / sum(n for _, n in row["item_loss"])
    return row


def report_of(rows, sweep=(), base_correct=2):
    base = fill_loss({"model": "m", "params": 10**6, "correct": base_correct, "total": 100,
                      "exact_match": base_correct / 100, "item_correct": [1] * base_correct + [0] * (100 - base_correct),
                      "item_loss": [[3.5, 5]] * 100, "retention_items": [[4.0, 4]] * 20, "retention_loss": 1.0})
    analysis = analyse(base, [fill_loss(r) for r in rows], list(sweep), 1000)
    report = {"base": base, **analysis}
    report["guide"] = pick_guide(report)
    return report


def sweep_point(name, n, correct):
    items = [1] * correct + [0] * (100 - correct)
    return {"method": name, "examples": n, "all": n == 1000, "reused_main_run": False, "seed": 0, "epochs": 1.0,
            "steps": 10, "batch_size": 8, "exact_match": correct / 100, "correct": correct, "total": 100,
            "heldout_loss": None, "train_seconds": 1.0, "item_correct": items, "item_loss": None}


def by_scenario(report):
    return {g["scenario"].split(",")[0].split(" (")[0]: g for g in report["guide"]}


def test_clear_winner_is_picked_with_its_numbers():
    rows = [seed_row("full", "full", 70, 10**6, 500 * 2**20, family="full fine-tuning"),
            seed_row("LoRA", "lora", 97, 20_000, 7 * 2**20),
            seed_row("IA3", "ia3", 60, 600, 2**18)]
    sweep = [sweep_point("LoRA", 8, 90), sweep_point("IA3", 8, 30), sweep_point("LoRA", 1000, 97),
             sweep_point("IA3", 1000, 60)]
    g = by_scenario(report_of(rows, sweep))
    narrow = g["One narrow domain"]
    assert narrow["pick"] == "LoRA" and narrow["evidence"] == "significant"
    assert "97.0%" in narrow["because"] and "full at 70.0%" in narrow["because"] and "McNemar" in narrow["because"]
    many = g["Many skills on one base"]
    assert many["pick"] == "LoRA" and "500 MB model per skill" in many["because"]
    little = g["Little data"]
    assert little["pick"] == "LoRA" and little["evidence"] == "significant" and "at 8 examples" in little["because"]
    assistant = g["Assistant-like behaviour"]
    assert "plugtune demo --align" in assistant["because"] and "align_pipeline.yaml" in assistant["because"]


def test_tie_is_too_weak_and_falls_back_on_cost():
    rows = [seed_row("LoRA", "lora", 95, 20_000, 7 * 2**20), seed_row("DoRA", "lora", 96, 21_000, 8 * 2**20),
            seed_row("IA3", "ia3", 94, 600, 2**18), seed_row("prompt", "prompt_tuning", 40, 100, 2**12)]
    sweep = [sweep_point("LoRA", 8, 50), sweep_point("IA3", 8, 49)]
    g = by_scenario(report_of(rows, sweep))
    narrow = g["One narrow domain"]
    assert narrow["evidence"] == "too weak" and "Too weak to choose on quality" in narrow["because"]
    assert narrow["pick"] == "IA3" and "Chosen on cost" in narrow["because"]  # fewest parameters among the tied
    assert "prompt" not in narrow["because"].split("Chosen")[0]  # 40% is significantly below: not among the tied
    assert g["Many skills on one base"]["pick"] == "IA3"  # smallest file among the tied
    little = g["Little data"]
    assert little["pick"] is None and little["evidence"] == "too weak"
    md = guide_markdown(report_of(rows, sweep)["guide"])
    assert md.count("\n") == 3 and "too weak" in md


def test_nothing_above_the_base_is_no_pick_and_no_sweep_is_not_measured():
    rows = [seed_row("LoRA", "lora", 3, 20_000, 7 * 2**20), seed_row("IA3", "ia3", 2, 600, 2**18)]
    g = by_scenario(report_of(rows, sweep=(), base_correct=2))
    assert g["One narrow domain"]["pick"] is None and "not significantly above the untrained base" in \
        g["One narrow domain"]["because"]
    assert g["Little data"]["evidence"] == "not measured"


def test_seeds_are_pooled_with_a_spread():
    rows = [seed_row("LoRA", "lora", 90, 20_000, 2**20, seed=0), seed_row("LoRA", "lora", 80, 20_000, 2**20, seed=1),
            seed_row("IA3", "ia3", 50, 600, 2**18, seed=0), seed_row("IA3", "ia3", 40, 600, 2**18, seed=1)]
    report = report_of(rows)
    lora = next(r for r in report["rows"] if r["name"] == "LoRA")
    assert lora["seeds"] == 2 and lora["exact_match"] == pytest.approx(0.85) and lora["correct"] == 170 and lora["total"] == 200
    assert abs(lora["exact_match_spread"] - 0.0707107) < 1e-6 and len(lora["item_correct"]) == 200
    assert lora["exact_match_ci"][0] < 0.85 < lora["exact_match_ci"][1]
    assert "± 7.1 over 2 seeds" in by_scenario(report)["One narrow domain"]["because"]


def test_among_tied_methods_one_that_forgets_is_passed_over():
    rows = [seed_row("Pfeiffer", "bottleneck", 96, 10_000, 2**20, retention=2.0),  # general-text loss doubles
            seed_row("LoRA", "lora", 95, 20_000, 7 * 2**20)]
    g = by_scenario(report_of(rows))["One narrow domain"]
    assert g["pick"] == "LoRA" and "(Pfeiffer forgets)" in g["because"] and "no measurable forgetting" in g["because"]
