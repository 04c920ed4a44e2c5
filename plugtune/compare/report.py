"""Rendering of `plugtune compare` into its report directory (the layout other tools read, e.g. a web UI):

    report.md              the report: the pick guide, the cost / data / control table with intervals, the
                           significant differences, the data sweep, the usual summary beside the measured
                           one, the plots (embedded by file name), notes, how it was measured, the machine
    report.json            every number: settings, machine, base, rows (over seeds), per_seed, sweep,
                           sweep_per_seed, tests, separation, data_column, guide, plots (file names)
    loss_curves.png        training loss of every method (seeds as thin lines) and the DPO stage
    quality_vs_params.png  exact match, held-out loss and forgetting against trainable parameters, 95% intervals
    quality_vs_examples.png  exact match against distinct training examples (when there is a data sweep)
    runs/, sweep/, data/   the runs themselves (each with compare_result.json: what a resumed compare keeps)
"""
from __future__ import annotations

import json
import os
import platform
from pathlib import Path

import torch

from plugtune.compare.guide import guide_markdown
from plugtune.compare.stats import BOOTSTRAP_SAMPLES

# The usual summary, in words: (cost, data, control).
USUAL = {
    "full fine-tuning": ("high", "large", "full"),
    "adapters": ("low", "small", "modular"),
    "instruction tuning": ("medium", "medium", "behaviour"),
}
_CONTROL = {  # what the words mean, stated as the property the measured column checks
    "full fine-tuning": "every weight changes",
    "adapters": "base weights untouched; the adapter is a separate file that plugs in and out",
    "instruction tuning": "the SFT model's behaviour moved towards preferred answers",
}


def machine_info() -> dict:
    import transformers  # here, not at the top: ~0.5 s to import, and every `plugtune` command imports this module

    cpu = platform.processor()
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    memory_gb = None
    try:
        kib = next(int(line.split()[1]) for line in open("/proc/meminfo") if line.startswith("MemTotal"))
        memory_gb = round(kib / 2**20, 1)
    except (OSError, StopIteration):
        pass
    return {"platform": platform.platform(), "python": platform.python_version(), "torch": torch.__version__,
            "transformers": transformers.__version__, "cpu": cpu, "cpu_count": os.cpu_count(),
            "cpus_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
            "torch_threads": torch.get_num_threads(), "memory_gb": memory_gb,
            "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
            "load_average_start": list(os.getloadavg())}


# ---------------------------------------------------------------- rows of the report


# ---------------------------------------------------------------- formatting helpers


def _pct(x: float | None) -> str:
    return "—" if x is None else f"{100 * x:.1f}%"


def _ci_pct(ci) -> str:
    return "" if not ci else f" [{100 * ci[0]:.1f}, {100 * ci[1]:.1f}]"


def _em(r: dict, bold: bool = False) -> str:
    core = f"**{_pct(r['exact_match'])}**" if bold else _pct(r["exact_match"])
    spread = f" ± {100 * r['exact_match_spread']:.1f}" if r.get("seeds", 1) > 1 else ""
    return core + spread + _ci_pct(r.get("exact_match_ci"))


def _loss(r: dict) -> str:
    spread = f" ± {r['heldout_loss_spread']:.3f}" if r.get("seeds", 1) > 1 else ""
    ci = r.get("heldout_loss_ci")
    return f"{r['heldout_loss']:.3f}{spread}" + (f" [{ci[0]:.3f}, {ci[1]:.3f}]" if ci else "")


def _forget(r: dict) -> str:
    if r.get("forgetting") is None:
        return "—"
    lo, hi = r["forgetting_ci"]
    mark = " ↑" if lo > 0 else " ↓" if hi < 0 else ""
    return f"{r['forgetting']:+.3f} [{lo:+.3f}, {hi:+.3f}]{mark}"


def _mb(b: float | None) -> str:
    return "—" if b is None else f"{b / 2**20:.2f}" if b < 100 * 2**20 else f"{b / 2**20:.0f}"


def _num(x: float | None, fmt: str) -> str:
    return "—" if x is None else format(x, fmt)


def _span(values: list[float], fmt: str) -> str:
    values = [v for v in values if v is not None]
    if not values:
        return "—"
    lo, hi = min(values), max(values)
    return format(lo, fmt) if format(lo, fmt) == format(hi, fmt) else f"{format(lo, fmt)}–{format(hi, fmt)}"


def _full_row(report: dict) -> dict | None:
    return next((r for r in report["rows"] if r["method"] == "full"), None)


def _table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows])


# ---------------------------------------------------------------- the tables


def cost_data_control_table(report: dict) -> str:
    """The seed's table, measured: cost (parameters, memory, time, disk), data (smallest sweep size reaching
    90% of the method's best exact match), control (quality at the full budget with intervals, forgetting)."""
    base, data = report["base"], report.get("data_column", {})
    header = ["method", "trainable params (% of base)", "peak memory MB (+ over base)", "train s", "disk MB",
              "data: examples to 90% of best", "exact match [95% CI]", "held-out loss [95% CI]",
              "forgetting: Δ general-text loss [95% CI]"]
    rows = [["base model (no training)", "0", "—", "—", "—", "—", _em(base), _loss(base),
             f"({_num(base.get('retention_loss'), '.3f')})"]]
    for r in report["rows"]:
        memory = "—" if r["peak_memory_mb"] is None else \
            f"{r['peak_memory_mb']:,.0f} (+{r['memory_over_base_mb']:,.0f})"
        d = data.get(r["name"])
        if d is None:
            cell = "not swept"
        elif d["examples"] is None:
            cell = f"none (0% at every size up to {d['best_at']})"
        else:
            cell = f"{d['examples']} ({_pct(d['exact_match'])}; best {_pct(d['best'])} at {d['best_at']})"
        seconds = f"{r['train_seconds']:.0f}" + (f" ± {r['train_seconds_spread']:.0f}" if r.get("seeds", 1) > 1 else "")
        rows.append([r["name"], f"{r['trainable_params']:,} ({r['trainable_pct']:.3g}%)", memory, seconds,
                     _mb(r["checkpoint_bytes"]), cell, _em(r, bold=True), _loss(r), _forget(r)])
    return _table(header, rows)


def significance_text(report: dict) -> str:
    """Which differences between methods are real, and how that was decided."""
    tests, rows = report["tests"], report["rows"]
    if not tests:
        return "One method: nothing to compare."
    seeds = rows[0].get("seeds", 1)
    n_items = report["base"]["total"]
    chain = report["separation"]["exact_match"]
    loss_chain = report["separation"]["heldout_loss"]
    lines = [
        f"Tests: exact match, the exact McNemar test on the same {n_items} held-out items"
        + (f" (× {seeds} seeds: pairs are (item, seed))" if seeds > 1 else "")
        + f"; held-out loss, a paired bootstrap over items ({BOOTSTRAP_SAMPLES} resamples, each item's seeds "
        f"resampled together). {len(tests)} pairs per measure, Holm-corrected (family-wise α = 0.05): a "
        "difference marked significant stays so after correcting for looking at every pair. Forgetting: a paired "
        "bootstrap of each method's general-text loss against the base's on the same items (↑: significant rise).",
        f"**Exact match separates {len(chain)} method{'s' if len(chain) != 1 else ''}** in a chain where each is "
        f"significantly above the next: {' > '.join(chain)}. Held-out loss separates {len(loss_chain)}: "
        f"{' < '.join(loss_chain)}.",
    ]
    header = ["A", "B", "exact match B − A", "only A / only B right", "p (Holm)", "held-out loss B − A [95% CI]",
              "p (Holm)"]
    body = []
    for t in tests:
        e, l_ = t["exact_match"], t["heldout_loss"]
        body.append([t["a"], t["b"], f"{100 * e['diff']:+.1f} pt" + (" *" if e["significant"] else ""),
                     f"{e['a_only']} / {e['b_only']}", f"{e['p_holm']:.2g}",
                     f"{l_['diff']:+.3f} [{l_['ci'][0]:+.3f}, {l_['ci'][1]:+.3f}]" + (" *" if l_["significant"] else ""),
                     f"{l_['p_holm']:.2g}"])
    return "\n\n".join(lines + [_table(header, body), "`*`: significant after Holm's correction."])


def qualitative_table(report: dict) -> str:
    """The usual words beside what was measured for the rows of each family."""
    base, by_family = report["base"], {}
    for r in report["rows"]:
        by_family.setdefault(r["family"], []).append(r)
    rows = []
    for family, members in by_family.items():
        usual = " / ".join(USUAL.get(family, ("?", "?", "?")))
        memory = _span([r["memory_over_base_mb"] for r in members], ",.0f")
        cost = (f"{_span([r['trainable_pct'] for r in members], '.3g')}% of the weights train; "
                + (f"+{memory} MB peak over the base; " if memory != "—" else "")
                + f"{_span([r['seconds_per_step'] for r in members], '.2f')} s/step; "
                f"{_span([r['checkpoint_bytes'] / 2**20 for r in members], '.3g')} MB on disk")
        data = []
        for r in members:
            points = sorted((p for p in report["sweep"] if p["method"] == r["name"]), key=lambda p: p["examples"])
            if len(points) > 1:
                data.append(f"{r['name']}: {_pct(points[0]['exact_match'])} at {points[0]['examples']} → "
                            f"{_pct(points[-1]['exact_match'])} at {points[-1]['examples']}")
        deltas = [r["retention_loss"] - base["retention_loss"] for r in members if r["retention_loss"] is not None]
        control = f"{_CONTROL.get(family, '')}; general-text loss {_span(deltas, '+.3f')}" if deltas else \
            _CONTROL.get(family, "—")
        for r in members:
            if "stages" in r:
                sft = next(x for x in report["rows"] if x["name"] == r["stages"]["sft"])
                control += (f"; exact match vs its SFT row {100 * (r['exact_match'] - sft['exact_match']):+.1f} pt, "
                            f"held-out loss {r['heldout_loss'] - sft['heldout_loss']:+.3f}")
        rows.append([family, usual, cost, "; ".join(data) or "not in the data sweep", control])
    return _table(["family", "usual: cost / data / control", "measured: cost", "measured: data (exact match "
                   "against distinct examples)", "measured: control"], rows)


def sweep_table(report: dict) -> str:
    sizes = sorted({p["examples"] for p in report["sweep"]})
    names = list(dict.fromkeys(p["method"] for p in report["sweep"]))
    header = ["method"] + [f"{n} (all)" if n == report["train_examples"] else str(n) for n in sizes]
    rows = []
    for name in names:
        cells = []
        for n in sizes:
            p = next((p for p in report["sweep"] if p["method"] == name and p["examples"] == n), None)
            cells.append("—" if p is None else _sweep_cell(p))
        rows.append([name] + cells)
    return _table(header, rows)


def _sweep_cell(p: dict) -> str:
    loss = "" if p["heldout_loss"] is None else f"loss {p['heldout_loss']:.3f}, "
    return f"{_em(p)} ({loss}{p['epochs']:.3g} ep)"


def landing_text(report: dict) -> str:
    full = _full_row(report)
    lora = next((r for r in report["rows"] if r["method"] == "lora" and not r["adapter"].get("use_dora")), None)
    lines = ["In the LoRA paper (Hu et al., 2021) and in PEFT's MetaMathQA method comparison, LoRA lands within "
             "about 1 point of full fine-tuning."]
    if full and lora:
        t = next(t for t in report["tests"] if {t["a"], t["b"]} == {full["name"], lora["name"]})["exact_match"]
        lines.append(f"Here, at {full['steps']} steps × batch {full['batch_size'] * full['grad_accum']}, "
                     f"{lora['name']} scores {_em(lora)} against full fine-tuning's {_em(full)}: "
                     f"{100 * (lora['exact_match'] - full['exact_match']):+.1f} points, "
                     f"{'significant' if t['significant'] else 'not significant'} (McNemar p={t['p_holm']:.2g}, Holm).")
    lines.append("A short budget on a small model measures how fast each method learns the task, not what it "
                 "reaches at convergence; the papers' comparisons train to convergence.")
    return " ".join(lines)


def method_notes(report: dict) -> str:
    notes = []
    settings = {m["name"]: m for m in report["settings"]["methods"]}
    for r in report["rows"]:
        keys = ", ".join(f"{k}={v}" for k, v in r["adapter"].items()) or "defaults"
        text = (f"- **{r['name']}** (`{r['method']}`; {keys}; lr {r['lr']:g}; {r['steps']} steps × "
                f"{r['batch_size'] * r['grad_accum']}). Data: {r['data']}.")
        if "stages" in r:
            s = r["stages"]
            text += (f" Starts from '{s['sft']}' folded into the base (the DPO reference); {s['pairs']} pairs, "
                     f"{s['rejected_from_model']} rejected answers are the SFT model's own wrong answers, the rest "
                     f"the reference with one character changed; building them took {s['pairs_seconds']:.0f} s. DPO "
                     f"stage: {s['dpo']['steps']} steps, lr {s['dpo']['lr']:g}, {s['dpo']['trainable_params']:,} "
                     f"parameters, {s['dpo']['train_seconds']:.0f} s; loss {s['dpo_config']['loss']}, beta "
                     f"{s['dpo_config']['beta']}. Parameters, time and size add both stages; throughput is the DPO "
                     "stage's (completion tokens of chosen and rejected).")
        if settings.get(r["name"], {}).get("note"):
            text += " " + settings[r["name"]]["note"]
        shown = "; ".join(f"`{s['generated'][:40]!r}` {'✓' if s['correct'] else '✗ (' + s['reference'] + ')'}"
                          for s in r["samples"])
        notes.append(text + (f" Answers: {shown}." if shown else ""))
    return "\n".join(notes)


def how_measured(report: dict) -> str:
    s = report["settings"]
    memory = ("each main run trained and was evaluated in its own process, so its peak RSS (ru_maxrss) is its own; "
              "'over base' is that peak minus the high-water mark right after loading the base, i.e. what training "
              "adds (gradients, optimizer state, activations). Data-sweep runs share one process and report none"
              if s["isolate"] else "not measured (isolate: false: all runs share one process, whose RSS high-water "
              "mark cannot be split between them)")
    retention = {"chatterbot": "chatterbot-corpus conversations (question → answer, loss on the answer)",
                 "none": "not measured"}.get(s["retention"]["source"], f"the file {s['retention']['source']}")
    return "\n".join([
        f"- Peak memory: {memory}.",
        "- Train s: the training loop alone (TrainReport.train_seconds); evaluation is not included. ex/s: training "
        "examples (pairs for DPO) per second; tok/s: supervised (answer) tokens per second, the loop's own count.",
        "- Checkpoint MB: the bytes of the result directory (adapter/ or, for full fine-tuning, model/ with its "
        "tokenizer); not the resumable checkpoints/ with optimizer state.",
        f"- Held-out: the first {s['eval']['n']} examples of the test file; exact match is greedy, at most "
        f"{s['eval']['max_new_tokens']} new tokens, surrounding whitespace ignored, with its 95% Wilson interval on "
        "the pooled items (× seeds); the loss is per answer token, with a 95% percentile-bootstrap interval over "
        "items. With several seeds, `±` is the sample standard deviation over seeds.",
        f"- General-text loss (retention): {retention}, first {s['retention']['n']}, before (the base) and after; "
        "a rise means the model lost some of what it knew (forgetting).",
        "- Data sweep: the first N training examples, the same steps and batch: N below the examples seen repeats "
        "them (ep = epochs); the `all` point is the main run when its steps are the same. The data column is the "
        "smallest N whose exact match reaches 90% of the method's best over the sweep.",
        f"- Executor: {report['executor']['name']}"
        + (f" at {report['executor']['address']}" if report["executor"].get("address") else "")
        + f", {report['executor']['cpus_per_run']:g} CPU threads per run; every run has its own training seed "
        "(the base config's seed + the seed index), so where it runs does not change its numbers.",
    ])


def write_report(report: dict, out: Path) -> None:
    out = Path(out)
    plots = plot_all(report, out)
    report["plots"] = [p.name for p in plots]
    (out / "report.json").write_text(json.dumps(report, indent=2, ensure_ascii=False, default=str))
    (out / "report.md").write_text(render_markdown(report))


def render_markdown(report: dict) -> str:
    s, base, m = report["settings"], report["base"], report["machine"]
    budget = (f"{s['budget']['max_steps']} steps" if s["budget"]["max_steps"] else
              f"about {s['budget']['seconds']:g} s of training each (steps from a timed calibration)")
    seeds = f", {s['seeds']} seeds each" if s.get("seeds", 1) > 1 else ""
    parts = [
        f"# plugtune compare{': ' + report['title'] if report['title'] else ''}",
        f"Base `{base['model']}` ({base['params']:,} parameters); training data `{s['base']['data']['train']}` "
        f"({report['train_examples']:,} examples); budget {budget} × batch "
        f"{s['budget']['batch_size'] * s['budget']['grad_accum']} for every method{seeds}; "
        f"{base['total']} held-out examples. Total {report['total_seconds'] / 60:.1f} min.",
        f"```\n{report['command'] or '(run from Python)'}\n```",
        "## Which do I pick", guide_markdown(report.get("guide", [])),
        "## Cost / data / control, measured", cost_data_control_table(report),
        "Intervals are 95%: Wilson for exact match, bootstrap over the held-out items for the losses and for "
        "forgetting (the change of the loss on general text the task never trains, against the base; ↑ a "
        "significant rise, ↓ a significant fall).",
        "## Which differences are significant", significance_text(report),
    ]
    if report["sweep"]:
        parts += ["## Data: exact match against the number of distinct training examples", sweep_table(report)]
    parts += ["## The usual summary beside the measured one", qualitative_table(report),
              "Every row trains on the same instructions with the loss on the answers; the families differ in what "
              "trains. The instruction-tuning row is SFT followed by preference optimisation (DPO), which shapes "
              "behaviour on top of the SFT model.",
              "## Where the methods land", landing_text(report), "## Plots"]
    parts += [f"![{p}]({p})" for p in report.get("plots", [])]
    parts += ["## Notes per method", method_notes(report), "## How it was measured", how_measured(report),
              "## Machine",
              f"{m['cpu']}, {m['cpus_usable']} usable CPUs, {m['torch_threads']} torch threads, {m['memory_gb']} GB; "
              f"{m['cuda'] or 'no GPU'}; torch {m['torch']}, transformers {m['transformers']}, Python {m['python']}. "
              f"Load average (1, 5, 15 min) at the start {', '.join(f'{x:.2f}' for x in m['load_average_start'])}, "
              f"at the end {', '.join(f'{x:.2f}' for x in report['load_average_end'])}"
              + (": above the number of cores, so other work shared the machine and the times are slower than on an "
                 "idle one." if max(m["load_average_start"][0], report["load_average_end"][0]) > m["cpus_usable"] + 0.5
                 else ".")]
    return "\n\n".join(parts) + "\n"


def print_summary(report: dict) -> None:
    base = report["base"]
    print(f"\n== plugtune compare: {report['title'] or base['model']} ==")
    print(f"{'method':<20} {'trainable':>12} {'peak MB':>8} {'train s':>8} {'ckpt MB':>8} {'loss':>6} "
          f"{'exact match [95% CI]':>24} {'forgetting':>10}")
    print(f"{'base':<20} {0:>12,} {'':>8} {'':>8} {'':>8} {base['heldout_loss']:>6.3f} {_em(base):>24}")
    for r in report["rows"]:
        print(f"{r['name'][:20]:<20} {r['trainable_params']:>12,} {_num(r['peak_memory_mb'], ',.0f'):>8} "
              f"{r['train_seconds']:>8.0f} {_mb(r['checkpoint_bytes']):>8} {r['heldout_loss']:>6.3f} {_em(r):>24} "
              f"{_num(r.get('forgetting'), '+.3f'):>10}")
    chain = report["separation"]["exact_match"]
    print(f"\nexact match separates {len(chain)} method(s) significantly: {' > '.join(chain)}")
    for g in report.get("guide", []):
        print(f"- {g['scenario']}: {g['pick'] or 'no pick'} ({g['evidence']})")
    print(f"total {report['total_seconds']:.0f} s; report: {Path(report['out']) / 'report.md'}")


# ---------------------------------------------------------------- plots


_MARKERS = "osD^vP*Xhp<>"


def _style(i: int) -> dict:
    """A colour and a marker per method: with a legend, no label is printed on top of another."""
    return {"color": f"C{i % 10}", "marker": _MARKERS[i % len(_MARKERS)]}


def plot_all(report: dict, out: Path) -> list[Path]:
    # Imported here: pyplot is slow to import, and the Agg backend (files only, no display) must be
    # chosen before it, a process-wide setting made only by the run that writes the plots.
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written, base, rows = [], report["base"], report["rows"]
    style = {r["name"]: _style(i) for i, r in enumerate(rows)}

    # Loss curves: every SFT method on one axis (the same loss: per answer token), the DPO stage beside it
    # on the same step axis (its loss is the DPO objective, not comparable in value with next-token loss).
    dpo_rows = [r for r in rows if "stages" in r]
    fig, axes = plt.subplots(1, 2 if dpo_rows else 1, figsize=(12 if dpo_rows else 7.5, 4.5), squeeze=False,
                             sharex=True)
    ax = axes[0][0]
    for r in rows:
        if "stages" in r:
            continue
        for k, curve in enumerate(r.get("loss_curves") or [r["loss_curve"]]):
            if curve:
                steps, losses = zip(*curve)
                ax.plot(steps, losses, color=style[r["name"]]["color"], linewidth=1.4 if k == 0 else 0.7,
                        alpha=1.0 if k == 0 else 0.5, label=r["name"] if k == 0 else None)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("training loss (per answer token)")
    ax.set_yscale("log")
    ax.set_title("SFT loss, same data and budget" + (" (thin: other seeds)" if rows and rows[0].get("seeds", 1) > 1
                                                      else ""), fontsize=9)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7, ncol=2)
    if dpo_rows:
        ax = axes[0][1]
        for r in dpo_rows:
            for k, curve in enumerate(r.get("loss_curves") or [r["loss_curve"]]):
                if curve:
                    steps, losses = zip(*curve)
                    ax.plot(steps, losses, color=style[r["name"]]["color"], linewidth=1.4 if k == 0 else 0.7,
                            label=f"{r['name']}: DPO stage" if k == 0 else None)
        ax.axhline(0.6931, color="grey", linestyle=":", linewidth=1, label="ln 2 (no preference yet)")
        ax.set_xlabel("optimizer step (DPO stage, after its SFT row)")
        ax.set_ylabel("DPO loss")
        ax.set_title("preference stage", fontsize=9)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    written.append(_save(fig, out / "loss_curves.png", plt))

    # Quality against trainable parameters, each point with its 95% interval; methods told apart by colour
    # and marker in one legend (labels written beside the points overlapped where methods land together).
    panels = [("exact_match", "exact match (%), 95% Wilson", 100), ("heldout_loss", "held-out loss, 95% bootstrap", 1)]
    if any(r.get("forgetting") is not None for r in rows):
        panels.append(("forgetting", "forgetting: Δ general-text loss, 95% bootstrap", 1))
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 4.6), squeeze=False)
    for ax, (key, label, scale) in zip(axes[0], panels):
        for r in rows:
            if r.get(key) is None:
                continue
            ci = r.get(key + "_ci")
            y = scale * r[key]
            err = [[max(0.0, y - scale * ci[0])], [max(0.0, scale * ci[1] - y)]] if ci else None
            ax.errorbar(r["trainable_params"], y, yerr=err, linestyle="none", capsize=3, markersize=6,
                        label=r["name"], **style[r["name"]])
        ref = 0.0 if key == "forgetting" else scale * base[key]
        ax.axhline(ref, color="grey", linestyle="--", linewidth=1, label="base model" if key != "forgetting"
                   else "no change")
        if key == "exact_match":
            ax.set_ylim(-3, 103)
        ax.set_xscale("log")
        ax.set_xlabel("trainable parameters (log)")
        ax.set_ylabel(label, fontsize=9)
        ax.grid(alpha=0.3)
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=min(5, len(labels)), fontsize=8, frameon=False)
    fig.suptitle("quality against trainable parameters (bars: 95% intervals)", fontsize=10)
    fig.tight_layout(rect=(0, 0.12, 1, 1))
    written.append(_save(fig, out / "quality_vs_params.png", plt, tight=False))

    if report["sweep"]:
        fig, ax = plt.subplots(figsize=(7.5, 4.8))
        names = list(dict.fromkeys(p["method"] for p in report["sweep"]))
        sizes = sorted({p["examples"] for p in report["sweep"]})
        for k, name in enumerate(names):
            points = sorted((p for p in report["sweep"] if p["method"] == name), key=lambda p: p["examples"])
            # a small horizontal offset per method so bars at the same size do not hide each other
            shift = 1 + 0.04 * (k - (len(names) - 1) / 2)
            xs = [p["examples"] * shift for p in points]
            ys = [100 * p["exact_match"] for p in points]
            err = [[y - 100 * p["exact_match_ci"][0] for y, p in zip(ys, points)],
                   [100 * p["exact_match_ci"][1] - y for y, p in zip(ys, points)]]
            ax.errorbar(xs, ys, yerr=err, capsize=3, label=name, **style.get(name, _style(k)))
        ax.axhline(100 * base["exact_match"], color="grey", linestyle="--", linewidth=1, label="base model")
        ax.set_xscale("log")
        ax.set_xticks(sizes, [f"{n} (all)" if n == report["train_examples"] else str(n) for n in sizes])
        ax.minorticks_off()
        ax.set_ylim(-3, 103)
        ax.set_xlabel("distinct training examples (first N of the training file; log)")
        ax.set_ylabel("exact match (%), 95% Wilson")
        p0 = report["sweep"][0]
        ax.set_title(f"quality against data, {p0['steps']} steps × {p0['batch_size']} each", fontsize=9)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
        written.append(_save(fig, out / "quality_vs_examples.png", plt))
    return written


def _save(fig, path: Path, plt, tight: bool = True) -> Path:
    if tight:
        fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
