"""Metrics as JSON lines (one object per event) and a loss-curve PNG; every record also goes to
the experiment trackers (tracking.py), if any."""
from __future__ import annotations

import json
import os
from pathlib import Path


class MetricsLog:
    def __init__(self, path: Path, resume_from_step: int | None = None, tracker=None):
        self.path, self.tracker = path, tracker
        path.parent.mkdir(parents=True, exist_ok=True)
        if resume_from_step is not None and path.is_file():
            # Drop lines a crashed run wrote after the checkpoint we resume from (and a line it was
            # killed in the middle of); replaced atomically, so a crash here loses nothing.
            kept = [line for line in path.read_text().splitlines()
                    if (record := _parse(line)) is not None and record.get("step", 0) <= resume_from_step]
            tmp = path.with_name(path.name + ".tmp")
            tmp.write_text("".join(line + "\n" for line in kept))
            os.replace(tmp, path)
        elif resume_from_step is None and path.exists():
            path.unlink()

    def write(self, record: dict) -> None:
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        if self.tracker is not None:
            kind = record.get("kind", "train")
            numbers = {f"{kind}/{k}": float(v) for k, v in record.items()
                       if k not in ("kind", "step") and isinstance(v, (int, float)) and not isinstance(v, bool)}
            if kind == "skipped":
                numbers[f"{kind}/count"] = 1.0
            self.tracker.log_metrics(int(record.get("step", 0)), numbers)

    def read(self) -> list[dict]:
        if not self.path.is_file():
            return []
        return [r for r in map(_parse, self.path.read_text().splitlines()) if r is not None]


def _parse(line: str) -> dict | None:
    try:
        return json.loads(line) if line.strip() else None
    except json.JSONDecodeError:  # the last line of a run killed mid-write
        return None


def plot_loss_curve(records: list[dict], out_file: Path) -> Path | None:
    train = [(r["step"], r["loss"]) for r in records if r.get("kind") == "train"]
    evals = [(r["step"], r["eval_loss"]) for r in records if r.get("kind") == "eval"]
    if not train:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(*zip(*train), label="train loss")
    if evals:
        ax.plot(*zip(*evals), "o-", label="eval loss")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss (mean per supervised token)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out_file, dpi=100)
    plt.close(fig)
    return out_file
