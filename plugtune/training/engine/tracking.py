"""Experiment tracking, offline: `training.report_to: [tensorboard, mlflow, wandb]`.

Each tracker is an optional extra (`pip install "plugtune[tensorboard]"`, `[mlflow]`, `[wandb]`),
imported only when asked for, and writes under the output directory, never to a server:

- tensorboard: event files in OUTPUT/tensorboard (`tensorboard --logdir OUTPUT/tensorboard`);
- mlflow: a local store, OUTPUT/mlruns (`mlflow ui --backend-store-uri OUTPUT/mlruns`), experiment
  "plugtune"; $MLFLOW_TRACKING_URI, when set, is used instead (e.g. sqlite:///mlflow.db). MLflow 3
  keeps the file store in maintenance mode behind MLFLOW_ALLOW_FILE_STORE, which is set for it here;
- wandb: offline mode in OUTPUT/wandb (`wandb sync OUTPUT/wandb/offline-run-*` uploads it later).

The loop hands every record it writes to metrics.jsonl to `log_metrics(step, {"train/loss": ...})`;
`log_params` receives the flattened run config once. A resumed run (output.resume=auto) continues
the same MLflow / W&B run (ids kept in OUTPUT/tracking.json), and TensorBoard drops the events a
crashed run wrote after the checkpoint it resumes from (purge_step). Only rank 0 tracks.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Protocol

from plugtune.schema import ConfigError

TRACKERS = ("tensorboard", "mlflow", "wandb")
_EXTRA = {"tensorboard": "tensorboard", "mlflow": "mlflow", "wandb": "wandb"}


class Tracker(Protocol):
    def log_params(self, params: dict) -> None: ...

    def log_metrics(self, step: int, metrics: dict[str, float]) -> None: ...

    def close(self) -> None: ...


def flatten(config: dict, prefix: str = "") -> dict[str, object]:
    """{"training": {"lr": 1e-4}} -> {"training.lr": 1e-4}; lists stay values."""
    out: dict[str, object] = {}
    for k, v in config.items():
        if isinstance(v, dict) and v:
            out.update(flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _missing(name: str, exc: ImportError) -> ImportError:
    return ImportError(f"training.report_to includes {name}, which is not installed ({exc}). Install it with "
                       f"pip install \"plugtune[{_EXTRA[name]}]\", or remove {name} from training.report_to")


class TensorBoardTracker:
    def __init__(self, out_dir: Path, resume: bool = False):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as exc:
            raise _missing("tensorboard", exc) from exc
        self._writer_class, self.log_dir, self.resume = SummaryWriter, Path(out_dir) / "tensorboard", resume
        self.writer = None
        self.params: dict | None = None

    def _open(self, first_step: int):
        # purge_step: events of a crashed run at or after the first step this run logs are dropped.
        self.writer = self._writer_class(log_dir=str(self.log_dir), purge_step=first_step if self.resume else None)
        if self.params is not None:
            self._write_params()

    def _write_params(self) -> None:
        rows = "\n".join(f"| {k} | {v} |" for k, v in self.params.items())
        self.writer.add_text("config", "| key | value |\n|---|---|\n" + rows, 0)

    def log_params(self, params: dict) -> None:
        self.params = flatten(params)
        if self.writer is not None:
            self._write_params()

    def log_metrics(self, step: int, metrics: dict[str, float]) -> None:
        if self.writer is None:
            self._open(step)
        for k, v in metrics.items():
            self.writer.add_scalar(k, v, step)

    def close(self) -> None:
        if self.writer is None and self.params is not None:
            self._open(0)
        if self.writer is not None:
            self.writer.flush()
            self.writer.close()


class MLflowTracker:
    MAX_PARAM = 6000  # MLflow's limit on a parameter value's length

    def __init__(self, out_dir: Path, run_name: str, run_id: str | None = None):
        os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        try:
            from mlflow.tracking import MlflowClient
        except ImportError as exc:
            raise _missing("mlflow", exc) from exc
        uri = os.environ.get("MLFLOW_TRACKING_URI") or (Path(out_dir) / "mlruns").resolve().as_uri()
        self.client = MlflowClient(tracking_uri=uri)
        if run_id is None:
            exp = self.client.get_experiment_by_name("plugtune")
            exp_id = exp.experiment_id if exp else self.client.create_experiment("plugtune")
            run_id = self.client.create_run(exp_id, run_name=run_name).info.run_id
        else:
            self.client.update_run(run_id, status="RUNNING")
        self.run_id = run_id

    def log_params(self, params: dict) -> None:
        from mlflow.entities import Param

        existing = self.client.get_run(self.run_id).data.params  # a resumed run has them (they cannot change)
        items = [Param(k, str(v)[:self.MAX_PARAM]) for k, v in flatten(params).items() if k not in existing]
        for i in range(0, len(items), 100):  # MLflow takes at most 100 params per batch
            self.client.log_batch(self.run_id, params=items[i:i + 100])

    def log_metrics(self, step: int, metrics: dict[str, float]) -> None:
        import time

        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[Metric(k, v, now, step) for k, v in metrics.items()])

    def close(self) -> None:
        self.client.set_terminated(self.run_id)


class WandbTracker:
    def __init__(self, out_dir: Path, run_name: str, run_id: str | None = None):
        try:
            import wandb
        except ImportError as exc:
            raise _missing("wandb", exc) from exc
        # dir=OUTPUT: W&B writes OUTPUT/wandb/offline-run-<time>-<id>
        self.run = wandb.init(project="plugtune", name=run_name, dir=str(out_dir), mode="offline",
                              id=run_id, resume="allow" if run_id else None)
        self.run_id = self.run.id

    def log_params(self, params: dict) -> None:
        self.run.config.update(flatten(params), allow_val_change=True)

    def log_metrics(self, step: int, metrics: dict[str, float]) -> None:
        self.run.log(metrics, step=step)

    def close(self) -> None:
        self.run.finish()


class Trackers:
    """Several trackers behind one Tracker."""

    def __init__(self, trackers: list):
        self.trackers = trackers

    def log_params(self, params: dict) -> None:
        for t in self.trackers:
            t.log_params(params)

    def log_metrics(self, step: int, metrics: dict[str, float]) -> None:
        if metrics:
            for t in self.trackers:
                t.log_metrics(step, metrics)

    def close(self) -> None:
        for t in self.trackers:
            t.close()


def check_names(names: list[str]) -> None:
    unknown = [n for n in names if n not in TRACKERS]
    if unknown:
        raise ConfigError(f"training.report_to: unknown tracker(s) {unknown}; choose from {', '.join(TRACKERS)}")


def make_tracker(names: list[str], out_dir: Path, params: dict, resume: bool = False) -> Trackers | None:
    """The trackers named in training.report_to (None for an empty list), params already logged.
    `resume`: continue the runs recorded in OUTPUT/tracking.json instead of starting new ones."""
    check_names(names)
    if not names:
        return None
    out_dir = Path(out_dir)
    ids_file = out_dir / "tracking.json"
    ids = json.loads(ids_file.read_text()) if resume and ids_file.is_file() else {}
    run_name = out_dir.resolve().name
    trackers = []
    for name in dict.fromkeys(names):
        if name == "tensorboard":
            trackers.append(TensorBoardTracker(out_dir, resume))
        elif name == "mlflow":
            trackers.append(MLflowTracker(out_dir, run_name, ids.get("mlflow")))
            ids["mlflow"] = trackers[-1].run_id
        else:
            trackers.append(WandbTracker(out_dir, run_name, ids.get("wandb")))
            ids["wandb"] = trackers[-1].run_id
    tmp = ids_file.with_name(ids_file.name + ".tmp")
    tmp.write_text(json.dumps(ids, indent=2))
    os.replace(tmp, ids_file)
    tracker = Trackers(trackers)
    tracker.log_params(params)
    return tracker
