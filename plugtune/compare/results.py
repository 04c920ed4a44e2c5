"""From per-run outcomes to the report's numbers: one row per (method, seed) as measured, then one row
per method over its seeds (mean ± spread), with a Wilson interval on exact match and bootstrap intervals
on the losses and on forgetting, the pairwise tests between methods (compare/stats.py), how many methods
the comparison tells apart, and the data column (the smallest sweep size reaching 90% of a method's best).
"""
from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

from plugtune.compare.stats import (bootstrap_loss, mean_spread, paired_bootstrap_loss, pairwise_tests,
                                    separation_chain, wilson)

DATA_SHARE = 0.9  # the data column: the smallest size reaching this share of the method's best quality


def dir_bytes(path: str | Path) -> int:
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())


def train_records(run_dir: Path) -> list[dict]:
    # Read directly: MetricsLog(path) starts a new log, deleting the file it is given.
    path = run_dir / "metrics.jsonl"
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.is_file() else []
    return [r for r in records if r.get("kind") == "train"]


def loss_curve(run_dir: Path) -> list[list[float]]:
    return [[r["step"], r["loss"]] for r in train_records(run_dir)]


def method_row(name: str, family: str, method: str, run, result: dict, base_params: int, run_dir: Path,
               seed: int = 0) -> dict:
    tr, mem = result["train"], result["memory"]
    steps, t = tr["steps"], run.training
    examples = steps * t.batch_size * t.grad_accum
    trainable = tr["trainable_params"]
    return {
        "name": name, "family": family, "method": method, "adapter": run.adapter, "lr": t.lr, "steps": steps,
        "batch_size": t.batch_size, "grad_accum": t.grad_accum, "trainable_params": trainable,
        "base_params": base_params, "trainable_pct": 100 * trainable / base_params,
        "peak_memory_mb": mem["peak_mb"], "memory_over_base_mb": (mem["peak_mb"] - mem["after_load_mb"])
        if mem["measured"] else None, "memory_measured": mem["measured"],
        "train_seconds": tr["train_seconds"], "seconds_per_step": tr["train_seconds"] / steps,
        "examples_per_second": examples / tr["train_seconds"], "tokens_per_second": tr["tokens_per_second"],
        "checkpoint_bytes": dir_bytes(tr["artifact"]), "checkpoint": tr["artifact"],
        "heldout_loss": result["heldout_loss"], "exact_match": result["exact_match"], "correct": result["correct"],
        "total": result["total"], "retention_loss": result.get("retention_loss"),
        "eval_seconds": result["eval_seconds"],
        "data": tr["data"], "samples": result["samples"], "run_dir": str(run_dir), "loss_curve": loss_curve(run_dir),
        "seed": seed, "training_seed": run.training.seed, "item_correct": result["item_correct"],
        "item_loss": result["item_loss"], "retention_items": result.get("retention_items"),
    }


def dpo_row(d, sft: dict, run, result: dict, base_params: int, run_dir: Path, seed: int = 0) -> dict:
    """SFT -> DPO as one row: parameters, time and checkpoint of both stages; memory the larger peak;
    throughput of the DPO stage (completion tokens of chosen and rejected); quality of the final model."""
    method = f"{sft['method']} → dpo ({run.method})"
    row = method_row(d.name, "instruction tuning", method, run, result, base_params, run_dir, seed)
    dpo = {k: row[k] for k in ("trainable_params", "train_seconds", "checkpoint_bytes", "checkpoint", "steps", "lr",
                               "peak_memory_mb", "memory_over_base_mb", "adapter")}
    trainable = sft["trainable_params"] + dpo["trainable_params"]
    measured = row["memory_measured"]
    row.update(
        trainable_params=trainable, trainable_pct=100 * trainable / base_params,
        train_seconds=sft["train_seconds"] + result["pairs_seconds"] + dpo["train_seconds"],
        tokens_per_second=result["supervised_tokens"] / dpo["train_seconds"],
        checkpoint_bytes=sft["checkpoint_bytes"] + dpo["checkpoint_bytes"],
        peak_memory_mb=max(sft["peak_memory_mb"], dpo["peak_memory_mb"]) if measured else None,
        memory_over_base_mb=max(sft["memory_over_base_mb"], dpo["memory_over_base_mb"]) if measured else None,
        stages={"sft": sft["name"], "pairs": result["pairs"], "rejected_from_model": result["rejected_from_model"],
                "pairs_seconds": result["pairs_seconds"], "dpo": dpo, "dpo_config": asdict(run.dpo)})
    return row


def sweep_point(name: str, n: int, n_train: int, row: dict, reused: bool, seed: int = 0) -> dict:
    keys = ("steps", "batch_size", "exact_match", "correct", "total", "heldout_loss", "train_seconds", "item_correct",
            "item_loss")
    return {"method": name, "examples": n, "all": n == n_train, "reused_main_run": reused, "seed": seed,
            "epochs": row["steps"] * row["batch_size"] * row["grad_accum"] / n, **{k: row[k] for k in keys}}


# ---------------------------------------------------------------- over seeds, with intervals


def _item_sums(seed_rows: list[dict], key: str) -> list[list[float]]:
    """Per held-out item, [loss sum, tokens] summed over seeds: the bootstrap resamples items, and every
    seed's outcome on an item goes with it (a cluster bootstrap)."""
    lists = [r[key] for r in seed_rows if r.get(key) is not None]
    if not lists:
        return []
    return [[sum(x[i][0] for x in lists), sum(x[i][1] for x in lists)] for i in range(len(lists[0]))]


def aggregate(seed_rows: list[dict], base: dict) -> dict:
    """One method's row over its seeds: the first seed's row (files, samples, loss curve) with the quality
    figures replaced by means, spreads (sample std over seeds) and intervals on pooled items."""
    row = dict(seed_rows[0])
    em, em_sd = mean_spread([r["exact_match"] for r in seed_rows])
    loss, loss_sd = mean_spread([r["heldout_loss"] for r in seed_rows])
    correct, total = sum(r["correct"] for r in seed_rows), sum(r["total"] for r in seed_rows)
    items = _item_sums(seed_rows, "item_loss")
    row.update(
        seeds=len(seed_rows), exact_match=em, exact_match_spread=em_sd, correct=correct, total=total,
        exact_match_ci=list(wilson(correct, total)), heldout_loss=loss, heldout_loss_spread=loss_sd,
        heldout_loss_ci=list(bootstrap_loss(items)), item_correct=[c for r in seed_rows for c in r["item_correct"]],
        item_loss=items, loss_curves=[r["loss_curve"] for r in seed_rows],
        per_seed=[{k: r.get(k) for k in ("seed", "training_seed", "exact_match", "heldout_loss", "retention_loss",
                                          "train_seconds", "run_dir")} for r in seed_rows])
    for key in ("train_seconds", "seconds_per_step", "examples_per_second", "tokens_per_second"):
        row[key], row[key + "_spread"] = mean_spread([r[key] for r in seed_rows])
    peaks = [r["peak_memory_mb"] for r in seed_rows if r["peak_memory_mb"] is not None]
    row["peak_memory_mb"] = max(peaks) if peaks else None
    overs = [r["memory_over_base_mb"] for r in seed_rows if r["memory_over_base_mb"] is not None]
    row["memory_over_base_mb"] = max(overs) if overs else None
    retained = _item_sums(seed_rows, "retention_items")
    row["retention_items"] = retained
    if retained and base.get("retention_items"):
        base_items = [[s * len(seed_rows), n * len(seed_rows)] for s, n in base["retention_items"]]
        test = paired_bootstrap_loss(base_items, retained)
        row.update(retention_loss=mean_spread([r["retention_loss"] for r in seed_rows])[0],
                   retention_loss_spread=mean_spread([r["retention_loss"] for r in seed_rows])[1],
                   forgetting=test["diff"], forgetting_ci=test["ci"], forgetting_p=test["p"])
    else:
        row.update(retention_loss=None, forgetting=None, forgetting_ci=None, forgetting_p=None)
    return row


def aggregate_sweep(points: list[dict]) -> list[dict]:
    out = []
    for key in dict.fromkeys((p["method"], p["examples"]) for p in points):
        group = [p for p in points if (p["method"], p["examples"]) == key]
        correct, total = sum(p["correct"] for p in group), sum(p["total"] for p in group)
        em, em_sd = mean_spread([p["exact_match"] for p in group])
        losses = [p["heldout_loss"] for p in group if p["heldout_loss"] is not None]
        loss, loss_sd = mean_spread(losses) if losses else (None, None)
        out.append({**{k: group[0][k] for k in ("method", "examples", "all", "reused_main_run", "epochs", "steps",
                                                  "batch_size")},
                    "seeds": len(group), "exact_match": em, "exact_match_spread": em_sd, "correct": correct,
                    "total": total, "exact_match_ci": list(wilson(correct, total)), "heldout_loss": loss,
                    "heldout_loss_spread": loss_sd,
                    "heldout_loss_ci": list(bootstrap_loss(_item_sums(group, "item_loss"))) if losses else None,
                    "item_correct": [c for p in group for c in p["item_correct"]]})
    return out


def data_column(sweep: list[dict], share: float = DATA_SHARE) -> dict[str, dict]:
    """Per method: the smallest sweep size whose exact match reaches `share` of the method's best, with
    both points' figures; None where the method never answers any item right."""
    out = {}
    for name in dict.fromkeys(p["method"] for p in sweep):
        points = sorted((p for p in sweep if p["method"] == name), key=lambda p: p["examples"])
        best = max(points, key=lambda p: p["exact_match"])
        if best["exact_match"] <= 0:
            out[name] = {"examples": None, "best": best["exact_match"], "best_at": best["examples"], "point": None}
            continue
        first = next(p for p in points if p["exact_match"] >= share * best["exact_match"])
        out[name] = {"examples": first["examples"], "exact_match": first["exact_match"],
                     "exact_match_ci": first["exact_match_ci"], "best": best["exact_match"],
                     "best_at": best["examples"], "sizes": [p["examples"] for p in points]}
    return out


def analyse(base: dict, per_seed: list[dict], sweep: list[dict], n_train: int) -> dict:
    """Everything the report and the guide read: rows over seeds, tests, separation, the data column."""
    base.update(exact_match_ci=list(wilson(base["correct"], base["total"])),
                heldout_loss_ci=list(bootstrap_loss(base["item_loss"])))
    names = list(dict.fromkeys(r["name"] for r in per_seed))
    rows = [aggregate([r for r in per_seed if r["name"] == n], base) for n in names]
    tests = pairwise_tests(rows) if len(rows) > 1 else []
    swept = aggregate_sweep(sweep)
    return {"rows": rows, "tests": tests, "sweep": swept, "data_column": data_column(swept),
            "separation": {"exact_match": separation_chain(rows, tests, "exact_match") if tests else names[:1],
                           "heldout_loss": separation_chain(rows, tests, "heldout_loss") if tests else names[:1]}}
