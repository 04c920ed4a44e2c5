"""Where the runs of `plugtune compare` execute: `local` (one after another on this machine) or `ray`
(each run a Ray task, on an existing cluster or on a local one started for the call:
compare/ray_executor.py, imported only when asked for, so Ray stays an optional extra).

Both executors take the same list of runs and return the same results: each run is one job dict
(compare/jobs.py) with its own seed and thread count, so where it runs does not change its numbers.
Finished runs survive: each result is written beside its run (`compare_result.json`, with the hash of
the job that made it) as soon as it arrives, and a compare started again with the same settings keeps
every run whose job is unchanged instead of training it again.
"""
from __future__ import annotations

import hashlib
import importlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Protocol

from plugtune.compare.jobs import run_in_subprocess, run_job, write_json_atomic
from plugtune.schema import ConfigError

RESULT_FILE = "compare_result.json"
EXECUTORS = ("local", "ray")


@dataclass
class Run:
    """One (method, data size, seed) run, the base's evaluation, or a DPO stage."""

    key: str  # unique within the comparison, e.g. "main/LoRA_r16/seed0"
    job: dict
    run_dir: Path
    isolate: bool = False  # local executor: in a process of its own (its peak memory measured)
    cpus: float = 1.0  # what the run needs (Ray schedules on it)
    gpus: float = 0.0


class Executor(Protocol):
    name: str

    def map(self, runs: list[Run], done: Callable[[Run, dict], None]) -> None: ...

    def close(self) -> None: ...


def job_hash(job: dict) -> str:
    return hashlib.sha256(json.dumps(job, sort_keys=True, default=str).encode()).hexdigest()[:16]


def finished_result(run: Run) -> dict | None:
    """The result a previous compare wrote for exactly this job, else None."""
    path = run.run_dir / RESULT_FILE
    if not path.is_file():
        return None
    try:
        saved = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return saved["result"] if saved.get("job_hash") == job_hash(run.job) else None


class LocalExecutor:
    """Runs one after another: isolated runs in a fresh process each, the others on a copy of the base
    loaded once in this process (`load_base` is called the first time one needs it)."""

    name = "local"

    def __init__(self, load_base: Callable[[], object]):
        self._load_base, self._base = load_base, None

    def map(self, runs: list[Run], done: Callable[[Run, dict], None]) -> None:
        for run in runs:
            if run.isolate:
                result = run_in_subprocess(run.job, run.run_dir / "worker")
            else:
                if self._base is None:
                    self._base = self._load_base()
                result = run_job(run.job, self._base)
            done(run, result)

    def close(self) -> None:
        self._base = None


def make_executor(name: str, load_base: Callable[[], object], address: str | None = None,
                  max_retries: int = 2) -> Executor:
    if name not in EXECUTORS:
        raise ConfigError(f"--executor {name!r} is not one of {', '.join(EXECUTORS)}")
    if name == "local":
        if address:
            raise ConfigError("--address is the Ray cluster's address; it needs --executor ray")
        return LocalExecutor(load_base)
    try:
        importlib.import_module("ray")
    except ImportError:
        raise ConfigError("--executor ray needs Ray, which is not installed: pip install 'plugtune[ray]' "
                          "(or use --executor local)") from None
    ray_executor = importlib.import_module("plugtune.compare.ray_executor")
    return ray_executor.RayExecutor(address=address, max_retries=max_retries)


def execute(executor: Executor, runs: list[Run], log: Callable[[str], None] = print) -> dict[str, dict]:
    """Every run's result by key: kept from a previous compare where its job is unchanged, else run on
    `executor` and saved beside the run the moment it arrives."""
    results, todo = {}, []
    for run in runs:
        kept = finished_result(run)
        if kept is not None:
            log(f"[compare] kept the finished run {run.key}")
            results[run.key] = kept
        else:
            todo.append(run)

    def done(run: Run, result: dict) -> None:
        write_json_atomic(run.run_dir / RESULT_FILE, {"key": run.key, "job_hash": job_hash(run.job), "result": result})
        results[run.key] = result
        log(f"[compare] finished {run.key} ({len(results)}/{len(runs)})")

    if todo:
        executor.map(todo, done)
    return results
