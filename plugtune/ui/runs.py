"""What the runs directory holds, read for the page: every run (a directory with a config.yaml, a
metrics.jsonl or a job the page started), its config, metrics, evaluation, checkpoints, artefacts
and job state. Read-only; a run being written is read as far as it got (a half-written last
metrics line is skipped, as MetricsLog does)."""
from __future__ import annotations

import json
import os
from pathlib import Path

import yaml

from plugtune.training.engine.checkpoint import STATE, list_checkpoints
from plugtune.ui import jobs

UI_DIR = "ui"  # <run>/ui: the page's job files (launch.json, state.json, log.txt, config.yaml)
SKIP = {"checkpoints", "adapter", "adapters", "model", "reward_model", "tensorboard", "mlruns", "wandb", UI_DIR,
        "checkpoint_adapters", "data"}
MAX_DEPTH = 4


def is_run(path: Path) -> bool:
    return any((path / f).is_file() for f in ("config.yaml", "metrics.jsonl", f"{UI_DIR}/{jobs.LAUNCH}"))


def find_runs(runs_dir: Path) -> list[Path]:
    """Every run under `runs_dir` (pipeline stages included), without following symlinks out."""
    found: list[Path] = []
    root = os.path.realpath(runs_dir)

    def walk(path: Path, depth: int):
        try:
            entries = sorted(os.scandir(path), key=lambda e: e.name)
        except OSError:
            return
        for e in entries:
            if e.name.startswith(".") or e.name in SKIP or not e.is_dir(follow_symlinks=False):
                continue
            p = Path(e.path)
            if is_run(p):
                found.append(p)
            if depth < MAX_DEPTH:
                walk(p, depth + 1)

    walk(Path(root), 1)
    return found


def _read(path: Path) -> list[dict]:
    """metrics.jsonl's records (MetricsLog's format); a line being written, or cut by a kill, is skipped."""
    try:
        lines = path.read_text().splitlines()
    except OSError:
        return []
    out = []
    for line in lines:
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict):
            out.append(record)
    return out


def job_status(run: Path) -> dict | None:
    return jobs.status(run / UI_DIR)


def summary(run: Path, runs_dir: Path) -> dict:
    records = _read(run / "metrics.jsonl")
    train = [r for r in records if r.get("kind") == "train"]
    evals = [r for r in records if r.get("kind") == "eval"]
    job = job_status(run)
    report = jobs.read_json(run / "train_report.json")
    state = job["state"] if job else ("finished" if report else ("incomplete" if train else "no metrics"))
    return {"name": os.path.relpath(run, os.path.realpath(runs_dir)), "state": state,
            "steps": train[-1]["step"] if train else 0, "loss": train[-1].get("loss") if train else None,
            "eval_loss": evals[-1].get("eval_loss") if evals else None,
            "modified": max((p.stat().st_mtime for p in run.iterdir()), default=run.stat().st_mtime),
            "from_ui": job is not None}


def adapters_of(run: Path) -> list[dict]:
    """Adapter directories a run produced (adapter/, adapters/<name>/, checkpoint_adapters/step-N/)."""
    out = []
    for cand in [run / "adapter", *sorted((run / "adapters").glob("*")), *sorted((run / "checkpoint_adapters").glob("*"))]:
        if (cand / "adapter_config.json").is_file():
            out.append({"name": cand.name if cand.parent != run else "adapter", "path": str(cand)})
    return out


def checkpoints_of(run: Path) -> list[dict]:
    out = []
    for ck in list_checkpoints(run / "checkpoints"):
        state = jobs.read_json(ck / STATE) or {}
        size = sum(f.stat().st_size for f in ck.iterdir() if f.is_file())
        exported = run / "checkpoint_adapters" / ck.name
        out.append({"name": ck.name, "step": state.get("step"), "bytes": size, "time": ck.stat().st_mtime,
                    "adapter": str(exported) if (exported / "adapter_config.json").is_file() else None})
    return out


def detail(run: Path, runs_dir: Path) -> dict:
    config_text = ""
    for cand in (run / "config.yaml", run / UI_DIR / "config.yaml"):
        if cand.is_file():
            config_text = cand.read_text()
            break
    config = {}
    try:
        config = yaml.safe_load(config_text) or {} if config_text else {}
    except yaml.YAMLError:
        pass
    report = jobs.read_json(run / "train_report.json")
    records = _read(run / "metrics.jsonl")
    artefacts = sorted(str(p.relative_to(run)) for p in run.iterdir()
                       if p.name not in (UI_DIR,) and not p.name.startswith("."))
    job = job_status(run)
    return {**summary(run, runs_dir), "config_text": config_text, "config": config, "metrics": records,
            "report": report, "eval_metrics": (report or {}).get("eval_metrics") or {},
            "checkpoints": checkpoints_of(run), "adapters": adapters_of(run), "artefacts": artefacts,
            "images": [a for a in artefacts if a.endswith(".png")], "job": job,
            "log": jobs.log_tail(run / UI_DIR) if job else "",
            "max_steps": ((config.get("training") or {}).get("max_steps") if isinstance(config, dict) else None)}


def find_adapters(roots: list[Path]) -> list[dict]:
    """Adapter directories under the allowed roots (depth 5), for the playground's Load list."""
    found = []
    for root in roots:
        real = os.path.realpath(root)
        for dirpath, dirnames, filenames in os.walk(real):
            depth = dirpath[len(real):].count(os.sep)
            dirnames[:] = [d for d in sorted(dirnames) if not d.startswith(".") and d != "checkpoints" and depth < 5]
            if "adapter_config.json" in filenames:
                rel = os.path.relpath(dirpath, real)
                found.append({"path": dirpath, "label": rel, "suggested_name": _suggest(rel)})
                dirnames[:] = []
    return found


def _suggest(rel: str) -> str:
    parts = [p for p in Path(rel).parts if p not in ("adapter", "adapters", "checkpoint_adapters")]
    name = "-".join(parts[-2:]) if parts else "adapter"
    name = "".join(c if c.isalnum() or c in "_-" else "-" for c in name).strip("-_")[:64]
    return name or "adapter"


def compare_reports(runs_dir: Path) -> list[str]:
    """Directories under the runs directory holding a `plugtune compare` report (report.md + report.json)."""
    real = os.path.realpath(runs_dir)
    out = []
    for dirpath, dirnames, filenames in os.walk(real):
        dirnames[:] = [d for d in sorted(dirnames) if not d.startswith(".") and d not in SKIP]
        if "report.md" in filenames and "report.json" in filenames:
            out.append(os.path.relpath(dirpath, real))
    return out


def compare_report(report_dir: Path) -> dict:
    if not (report_dir / "report.md").is_file():
        raise FileNotFoundError(f"{report_dir} holds no report.md: run `plugtune compare ... --out {report_dir}` first")
    data = jobs.read_json(report_dir / "report.json")
    return {"markdown": (report_dir / "report.md").read_text(),
            "images": sorted(p.name for p in report_dir.glob("*.png")), "json": data is not None}
