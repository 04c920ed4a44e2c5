"""The "which technique do I pick" guide, derived from a measured comparison (compare/results.py), for
the usual scenarios: one narrow domain at maximum quality; many skills on one base, switched per
request; little data; assistant-like behaviour.

Each answer names a method only when the measurements support it: a method "wins" on quality only when
it is significantly better (Holm-corrected tests on the same items, compare/stats.py) than every other
candidate. When the best candidates are tied, the answer says the evidence is too weak to choose on
quality and, where a cost difference is plain (parameters, disk per skill), names the cheapest of the
tied ones as the one to take, saying that it is chosen on cost. Every answer cites the numbers it rests on.
"""
from __future__ import annotations

from plugtune.compare.stats import ALPHA, mcnemar_exact, significant, test_between

ALIGN_PIPELINE = "`plugtune demo --align` (configs/align_pipeline.yaml: SFT, then DPO/GRPO from the SFT policy)"


def _pct(x: float) -> str:
    return f"{100 * x:.1f}%"


def _em(row: dict) -> str:
    lo, hi = row["exact_match_ci"]
    spread = f" ± {100 * row['exact_match_spread']:.1f} over {row['seeds']} seeds" if row.get("seeds", 1) > 1 else ""
    return f"{_pct(row['exact_match'])} [{_pct(lo)}, {_pct(hi)}]{spread}"


def _mb(b: float) -> str:
    return f"{b / 2**20:.2f} MB" if b < 100 * 2**20 else f"{b / 2**20:.0f} MB"


def _forgetting(row: dict) -> str:
    if row.get("forgetting") is None:
        return ""
    lo, hi = row["forgetting_ci"]
    word = "rises" if lo > 0 else "falls" if hi < 0 else "does not change significantly"
    return f"; its general-text loss {word} ({row['forgetting']:+.3f} [{lo:+.3f}, {hi:+.3f}])"


def _p(tests: list[dict], a: str, b: str) -> str:
    t = test_between(tests, a, b)["exact_match"]
    return f"McNemar p={t['p_holm']:.2g}, Holm-corrected"


def tied_with_best(rows: list[dict], tests: list[dict]) -> list[dict]:
    """The best row on exact match and every row not significantly below it, best first."""
    ordered = sorted(rows, key=lambda r: (-r["exact_match"], r["heldout_loss"]))
    best = ordered[0]
    return [best] + [r for r in ordered[1:] if not significant(tests, best["name"], r["name"])]


def beats_base(row: dict, base: dict) -> dict:
    """McNemar of a row against the untrained base on the same items (the base's outcome repeated per seed)."""
    return mcnemar_exact(base["item_correct"] * row.get("seeds", 1), row["item_correct"])


def _choose(candidates: list[dict], tests: list[dict], cost_key: str, cost_text, base: dict) -> dict:
    """The strongest candidate on exact match; a tie falls back on cost, said as such; nothing when no
    candidate is significantly above the untrained base."""
    top = max(candidates, key=lambda r: r["exact_match"])
    vs_base = beats_base(top, base)
    if top["exact_match"] <= base["exact_match"] or vs_base["p"] >= ALPHA:
        return {"pick": None, "evidence": "too weak",
                "because": (f"Too weak to choose: the best, {top['name']} at {_em(top)}, is not significantly above "
                            f"the untrained base's {_em(base)} (McNemar p={vs_base['p']:.2g}); train longer "
                            "(budget.max_steps) or on more data")}
    if len(candidates) == 1:
        return {"pick": candidates[0]["name"], "evidence": "only one candidate measured",
                "because": f"{candidates[0]['name']}: exact match {_em(candidates[0])}"}
    tied = tied_with_best(candidates, tests)
    best = tied[0]
    if len(tied) == 1:
        runner = sorted(candidates, key=lambda r: -r["exact_match"])[1]
        return {"pick": best["name"], "evidence": "significant",
                "because": (f"{best['name']} has the highest exact match, {_em(best)}, significantly above the next, "
                            f"{runner['name']} at {_em(runner)} ({_p(tests, best['name'], runner['name'])})"
                            + _forgetting(best))}
    # Tied on quality: one that does not measurably forget first (its general-text loss does not rise
    # significantly), then the cheapest.
    cheapest = min(tied, key=lambda r: (_forgets(r), r[cost_key]))
    names = ", ".join(f"{r['name']} {_em(r)}" for r in tied)
    forgetting = [r["name"] for r in tied if _forgets(r)]
    basis = "no measurable forgetting, then cost" if forgetting and not _forgets(cheapest) else "cost"
    skipped = f" ({', '.join(forgetting)} forget{'s' if len(forgetting) == 1 else ''})" if basis != "cost" else ""
    return {"pick": cheapest["name"], "evidence": "too weak",
            "because": (f"Too weak to choose on quality: {names} are not significantly apart "
                        f"({_p(tests, best['name'], tied[-1]['name'])} for the widest gap). Chosen on {basis}"
                        f"{skipped}: {cheapest['name']} {cost_text(cheapest)}" + _forgetting(cheapest))}


def _forgets(row: dict) -> bool:
    """A significant rise of the general-text loss (the lower end of its 95% interval above zero)."""
    return bool(row.get("forgetting_ci")) and row["forgetting_ci"][0] > 0


def narrow_domain(report: dict) -> dict:
    rows, tests = [r for r in report["rows"] if "stages" not in r], report["tests"]
    answer = _choose(rows, tests, "trainable_params", lambda r: f"trains {r['trainable_params']:,} parameters "
                                                                f"({r['trainable_pct']:.3g}% of the base)",
                     report["base"])
    return {"scenario": "One narrow domain, maximum quality", **answer}


def many_skills(report: dict) -> dict:
    """Adapters only: each skill is a separate file on one shared base (a full fine-tune is a model per skill)."""
    rows = [r for r in report["rows"] if r["family"] == "adapters"]
    scenario = "Many skills on one base, switched per request"
    if not rows:
        return {"scenario": scenario, "pick": None, "evidence": "not measured",
                "because": "No adapter method in this comparison"}
    answer = _choose(rows, report["tests"], "checkpoint_bytes", lambda r: f"takes {_mb(r['checkpoint_bytes'])} "
                                                                          "per skill on disk", report["base"])
    full = next((r for r in report["rows"] if r["method"] == "full"), None)
    if full and answer["pick"]:
        answer["because"] += (f". A full fine-tune would be a {_mb(full['checkpoint_bytes'])} model per skill, "
                              "and no per-request switching on one loaded base")
    return {"scenario": scenario, **answer}


def little_data(report: dict) -> dict:
    """The smallest data-sweep size: which method is best there, tested on the same items."""
    scenario = "Little data"
    sweep = report["sweep"]
    if not sweep:
        return {"scenario": scenario, "pick": None, "evidence": "not measured",
                "because": "No data sweep in this comparison (data_sweep.sizes)"}
    smallest = min(p["examples"] for p in sweep)
    points = sorted((p for p in sweep if p["examples"] == smallest), key=lambda p: -p["exact_match"])
    cells = ", ".join(f"{p['method']} {_pct(p['exact_match'])} [{_pct(p['exact_match_ci'][0])}, "
                      f"{_pct(p['exact_match_ci'][1])}]" for p in points)
    data = report.get("data_column", {})
    reach = "; ".join(f"{m} reaches 90% of its best at {d['examples']} examples" for m, d in data.items()
                      if d.get("examples"))
    if len(points) == 1:
        return {"scenario": scenario, "pick": points[0]["method"], "evidence": "only one candidate measured",
                "because": f"at {smallest} examples: {cells}"}
    best, runner = points[0], points[1]
    test = mcnemar_exact(best["item_correct"], runner["item_correct"])
    # one test per other method at this size: Bonferroni over them (conservative, fine for a handful)
    tests = [mcnemar_exact(best["item_correct"], p["item_correct"])["p"] * (len(points) - 1) for p in points[1:]]
    if all(p < ALPHA for p in tests):
        return {"scenario": scenario, "pick": best["method"], "evidence": "significant",
                "because": (f"At the smallest sweep size, {smallest} examples: {cells}; {best['method']} is "
                            f"significantly above every other (McNemar p={min(1.0, test['p'] * (len(points) - 1)):.2g} "
                            f"against {runner['method']}, Bonferroni)" + (f". {reach}" if reach else ""))}
    return {"scenario": scenario, "pick": None, "evidence": "too weak",
            "because": (f"Too weak to choose: at {smallest} examples {cells}; {best['method']} is not significantly "
                        f"above {runner['method']} (McNemar p={min(1.0, test['p'] * (len(points) - 1)):.2g}, "
                        "Bonferroni)" + (f". {reach}" if reach else ""))}


def assistant_like(report: dict) -> dict:
    """Behaviour, not a task: the instruction-tuning pipeline; the compare's own SFT -> DPO row, if any, is
    cited for what preference optimisation did to this task."""
    scenario = "Assistant-like behaviour (follow instructions, a preferred style)"
    because = ("A task's exact match does not measure behaviour; the instruction-tuning pipeline trains and "
               f"measures it on instruction-following prompts: {ALIGN_PIPELINE}")
    dpo = next((r for r in report["rows"] if "stages" in r), None)
    if dpo:
        sft = next(r for r in report["rows"] if r["name"] == dpo["stages"]["sft"])
        t = test_between(report["tests"], dpo["name"], sft["name"])["exact_match"]
        change = "not significant" if not t["significant"] else "significant"
        because += (f". Here SFT → DPO moved this task's exact match from {_em(sft)} to {_em(dpo)} "
                    f"({change}, McNemar p={t['p_holm']:.2g}, Holm)" + _forgetting(dpo))
    return {"scenario": scenario, "pick": "instruction-tuning pipeline (SFT → DPO)", "evidence": "by design",
            "because": because}


def pick_guide(report: dict) -> list[dict]:
    """The four answers, each {scenario, pick, evidence, because}."""
    if not report["rows"]:
        return []
    return [narrow_domain(report), many_skills(report), little_data(report), assistant_like(report)]


def guide_markdown(guide: list[dict]) -> str:
    lines = []
    for g in guide:
        pick = g["pick"] or "no pick"
        lines.append(f"- **{g['scenario']}** → **{pick}** ({g['evidence']}). {g['because']}.")
    return "\n".join(lines)
