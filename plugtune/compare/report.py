"""Rendering of `plugtune compare`: report.json (every number), report.md (the measured table, the usual
summary in words beside what was measured, the data-size table, notes) and three PNG plots."""
from __future__ import annotations

import json
import math
import os
import platform
from dataclasses import asdict
from pathlib import Path

import torch

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


def dir_bytes(path: str | Path) -> int:
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())


def train_records(run_dir: Path) -> list[dict]:
    # Read directly: MetricsLog(path) starts a new log, deleting the file it is given.
    path = run_dir / "metrics.jsonl"
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.is_file() else []
    return [r for r in records if r.get("kind") == "train"]


def loss_curve(run_dir: Path) -> list[list[float]]:
    return [[r["step"], r["loss"]] for r in train_records(run_dir)]


def method_row(name: str, family: str, method: str, run, result: dict, base_params: int, run_dir: Path) -> dict:
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
    }


def dpo_row(d, sft: dict, run, result: dict, base_params: int, run_dir: Path) -> dict:
    """SFT -> DPO as one row: parameters, time and checkpoint of both stages; memory the larger peak;
    throughput of the DPO stage (completion tokens of chosen and rejected); quality of the final model."""
    method = f"{sft['method']} → dpo ({run.method})"
    row = method_row(d.name, "instruction tuning", method, run, result, base_params, run_dir)
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


def sweep_point(name: str, n: int, n_train: int, row: dict, reused: bool) -> dict:
    keys = ("steps", "batch_size", "exact_match", "correct", "total", "heldout_loss", "train_seconds")
    return {"method": name, "examples": n, "all": n == n_train, "reused_main_run": reused,
            "epochs": row["steps"] * row["batch_size"] * row["grad_accum"] / n, **{k: row[k] for k in keys}}


# ---------------------------------------------------------------- formatting helpers


def _pct(x: float | None) -> str:
    return "—" if x is None else f"{100 * x:.1f}%"


def _se(p: float, n: int) -> float:
    """Standard error of an accuracy over n examples, in points."""
    return 100 * math.sqrt(max(p * (1 - p), 0.0) / max(n, 1))


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


def measured_table(report: dict) -> str:
    base, full = report["base"], _full_row(report)
    header = ["method", "trainable params", "% of base", "peak memory MB (+ over base)", "train s", "s/step", "ex/s",
              "tok/s", "checkpoint MB", "held-out loss", "exact match", "vs full", "general-text loss (Δ)"]
    rows = [["base model (no training)", "0", "0", *["—"] * 6, f"{base['heldout_loss']:.3f}",
             f"{_pct(base['exact_match'])} ± {_se(base['exact_match'], base['total']):.1f}", "",
             _num(base["retention_loss"], ".3f")]]
    for r in report["rows"]:
        memory = "—" if r["peak_memory_mb"] is None else \
            f"{r['peak_memory_mb']:,.0f} (+{r['memory_over_base_mb']:,.0f})"
        gap = "" if full is None or r is full else f"{100 * (r['exact_match'] - full['exact_match']):+.1f} pt"
        retention = "—" if r["retention_loss"] is None else (
            f"{r['retention_loss']:.3f} ({r['retention_loss'] - base['retention_loss']:+.3f})")
        rows.append([r["name"], f"{r['trainable_params']:,}", f"{r['trainable_pct']:.3f}%", memory,
                     f"{r['train_seconds']:.0f}", f"{r['seconds_per_step']:.2f}", f"{r['examples_per_second']:.2f}",
                     f"{r['tokens_per_second']:.1f}", _mb(r["checkpoint_bytes"]), f"{r['heldout_loss']:.3f}",
                     f"**{_pct(r['exact_match'])}** ± {_se(r['exact_match'], r['total']):.1f}", gap, retention])
    return _table(header, rows)


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
            cells.append("—" if p is None else f"{_pct(p['exact_match'])} (loss {p['heldout_loss']:.3f}, "
                                               f"{p['epochs']:.3g} ep)")
        rows.append([name] + cells)
    return _table(header, rows)


def landing_text(report: dict) -> str:
    full = _full_row(report)
    lora = next((r for r in report["rows"] if r["method"] == "lora" and not r["adapter"].get("use_dora")), None)
    lines = ["In the LoRA paper (Hu et al., 2021) and in PEFT's MetaMathQA method comparison, LoRA lands within "
             "about 1 point of full fine-tuning."]
    if full and lora:
        n = full["total"]
        se = math.sqrt(_se(full["exact_match"], n) ** 2 + _se(lora["exact_match"], lora["total"]) ** 2)
        lines.append(f"Here, at {full['steps']} steps × batch {full['batch_size'] * full['grad_accum']}, "
                     f"{lora['name']} scores {_pct(lora['exact_match'])} against full fine-tuning's "
                     f"{_pct(full['exact_match'])}: {100 * (lora['exact_match'] - full['exact_match']):+.1f} points "
                     f"(standard error of the difference about {se:.1f} points on {n} examples).")
    if full:
        ordered = sorted((r for r in report["rows"] if r is not full), key=lambda r: -r["exact_match"])
        lines.append("Every row against full fine-tuning: " + ", ".join(
            f"{r['name']} {100 * (r['exact_match'] - full['exact_match']):+.1f}" for r in ordered) + " points.")
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
        f"{s['eval']['max_new_tokens']} new tokens, surrounding whitespace ignored, ± one standard error; the loss "
        "is per answer token.",
        f"- General-text loss (retention): {retention}, first {s['retention']['n']}, before (the base) and after; "
        "a rise means the model lost some of what it knew (forgetting).",
        "- Data sweep: the first N training examples, the same steps and batch: N below the examples seen repeats "
        "them (ep = epochs); the `all` point is the main run when its steps are the same.",
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
    parts = [
        f"# plugtune compare{': ' + report['title'] if report['title'] else ''}",
        f"Base `{base['model']}` ({base['params']:,} parameters); training data `{s['base']['data']['train']}` "
        f"({report['train_examples']:,} examples); budget {budget} × batch "
        f"{s['budget']['batch_size'] * s['budget']['grad_accum']} for every method; "
        f"{base['total']} held-out examples. Total {report['total_seconds'] / 60:.1f} min.",
        f"```\n{report['command'] or '(run from Python)'}\n```",
        "## Measured", measured_table(report),
        "## The usual summary beside the measured one", qualitative_table(report),
        "Every row trains on the same instructions with the loss on the answers; the families differ in what "
        "trains. The instruction-tuning row is SFT followed by preference optimisation (DPO), which shapes "
        "behaviour on top of the SFT model.",
    ]
    if report["sweep"]:
        parts += ["## Data: exact match against the number of distinct training examples", sweep_table(report)]
    parts += ["## Where the methods land", landing_text(report), "## Plots"]
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
    print(f"{'method':<20} {'trainable':>12} {'% base':>8} {'peak MB':>8} {'train s':>8} {'ckpt MB':>8} "
          f"{'loss':>6} {'exact':>7} {'retention':>9}")
    print(f"{'base':<20} {0:>12,} {0:>8} {'':>8} {'':>8} {'':>8} {base['heldout_loss']:>6.3f} "
          f"{_pct(base['exact_match']):>7} {_num(base['retention_loss'], '.3f'):>9}")
    for r in report["rows"]:
        print(f"{r['name'][:20]:<20} {r['trainable_params']:>12,} {r['trainable_pct']:>7.3f}% "
              f"{_num(r['peak_memory_mb'], ',.0f'):>8} {r['train_seconds']:>8.0f} {_mb(r['checkpoint_bytes']):>8} "
              f"{r['heldout_loss']:>6.3f} {_pct(r['exact_match']):>7} {_num(r['retention_loss'], '.3f'):>9}")
    print("\nthe usual summary (cost / data / control): " + "; ".join(
        f"{family}: {' / '.join(words)}" for family, words in USUAL.items()))
    print(f"total {report['total_seconds']:.0f} s; report: {Path(report['out']) / 'report.md'}")


# ---------------------------------------------------------------- plots


def plot_all(report: dict, out: Path) -> list[Path]:
    # Imported here: pyplot is slow to import, and the Agg backend (files only, no display) must be
    # chosen before it, a process-wide setting made only by the run that writes the plots.
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    base = report["base"]

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for r in report["rows"]:
        if "stages" not in r and r["loss_curve"]:
            steps, losses = zip(*r["loss_curve"])
            ax.plot(steps, losses, label=r["name"], linewidth=1.4)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("training loss (per answer token)")
    ax.set_title("loss curves, same data and budget (DPO stage: its own run's loss_curve.png)", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    written.append(_save(fig, out / "loss_curves.png", plt))

    fig, axes = plt.subplots(1, 2, figsize=(10, 4.2))
    for ax, key, label in ((axes[0], "exact_match", "exact match (%)"), (axes[1], "heldout_loss", "held-out loss")):
        scale = 100 if key == "exact_match" else 1
        for r in report["rows"]:
            ax.scatter(r["trainable_params"], scale * r[key], s=30)
            ax.annotate(r["name"], (r["trainable_params"], scale * r[key]), fontsize=7, xytext=(3, 3),
                        textcoords="offset points")
        ax.axhline(scale * base[key], color="grey", linestyle="--", linewidth=1, label="base model")
        if key == "exact_match":  # from 0, so small differences are not magnified
            ax.set_ylim(-1, max(5.0, 1.15 * max([100 * r[key] for r in report["rows"]] + [100 * base[key]])))
        ax.set_xscale("log")
        ax.set_xlabel("trainable parameters (log)")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle("quality against trainable parameters", fontsize=10)
    written.append(_save(fig, out / "quality_vs_params.png", plt))

    if report["sweep"]:
        fig, ax = plt.subplots(figsize=(7, 4.5))
        for name in dict.fromkeys(p["method"] for p in report["sweep"]):
            points = sorted((p for p in report["sweep"] if p["method"] == name), key=lambda p: p["examples"])
            ax.plot([p["examples"] for p in points], [100 * p["exact_match"] for p in points], "o-", label=name)
        ax.axhline(100 * base["exact_match"], color="grey", linestyle="--", linewidth=1, label="base model")
        ax.set_xscale("log")
        sizes = sorted({p["examples"] for p in report["sweep"]})
        ax.set_xticks(sizes, [f"{n} (all)" if n == report["train_examples"] else str(n) for n in sizes])
        ax.minorticks_off()
        ax.set_ylim(-1, max(5.0, 1.15 * max(100 * p["exact_match"] for p in report["sweep"])))
        ax.set_xlabel("distinct training examples (first N of the training file; log)")
        ax.set_ylabel("exact match (%)")
        p0 = report["sweep"][0]
        ax.set_title(f"quality against data, {p0['steps']} steps × {p0['batch_size']} each", fontsize=9)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        written.append(_save(fig, out / "quality_vs_examples.png", plt))
    return written


def _save(fig, path: Path, plt) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
