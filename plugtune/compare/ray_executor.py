"""`plugtune compare --executor ray [--address HOST:PORT]`: each run a Ray task (Ray Core: tasks,
`ray.wait`), with the CPUs and GPUs it needs, on an existing cluster (`ray.init(address=...)`) or on a
local one started for the call and stopped after it. Only compare/executors.py imports this module,
and only when Ray is asked for: `pip install 'plugtune[ray]'`.

- Each task runs compare/jobs.run_job in a fresh worker process (`max_calls=1`): the process's peak
  memory is the run's own, as with the local executor's subprocesses, and no state leaks between runs.
- A worker that dies mid-run (killed, out of memory, its node lost) is a system failure, which Ray
  retries up to `max_retries` times (Ray's fault-tolerance docs: "Retrying failed tasks"); the run
  starts over from its job, so its numbers are the same.
- The cluster must see this machine's files at the same paths (the base model, the data, `out`): one
  machine, or a shared filesystem. Every node needs plugtune installed.

Fault injection for the retry test: with PLUGTUNE_COMPARE_KILL_ONCE=DIR in the environment, the first
attempt of each run kills its own worker process (SIGKILL) after leaving a marker in DIR; the retry finds
the marker and runs normally.
"""
from __future__ import annotations

import os
import signal
import socket
import time
from pathlib import Path
from typing import Callable

import ray

from plugtune.compare.executors import Run
from plugtune.compare.jobs import run_job_in_thread_budget, same_code_env
from plugtune.schema import ConfigError

KILL_ONCE_ENV = "PLUGTUNE_COMPARE_KILL_ONCE"
CONNECT_TIMEOUT_S = 5.0


def _task(job: dict, key: str) -> dict:
    marker_dir = os.environ.get(KILL_ONCE_ENV)
    if marker_dir:
        marker = Path(marker_dir) / (key.replace("/", "__") + ".killed")
        if not marker.exists():
            marker.parent.mkdir(parents=True, exist_ok=True)
            marker.write_text(str(os.getpid()))
            os.kill(os.getpid(), signal.SIGKILL)  # the worker dies mid-run, as a killed or OOM-killed one would
    return run_job_in_thread_budget(job)


_remote_task = ray.remote(max_calls=1)(_task)


def check_reachable(address: str, timeout: float = CONNECT_TIMEOUT_S) -> None:
    """Fail in seconds, not after ray.init's long reconnect loop, when nothing listens at host:port."""
    if address == "auto":
        return  # ray.init finds a local cluster's address itself, and fails at once when there is none
    hostport = address.split("://", 1)[-1]
    host, _, port = hostport.rpartition(":")
    if not host or not port.isdigit():
        raise ConfigError(f"--address {address!r} is not HOST:PORT (or ray://HOST:PORT, or auto): give the head "
                          "node's address as `ray start --head` prints it, e.g. 10.0.0.5:6379")
    try:
        socket.create_connection((host, int(port)), timeout=timeout).close()
    except OSError as exc:
        raise ConfigError(f"no Ray cluster answers at {address} ({exc.strerror or exc}, after at most {timeout:g} s): "
                          "start one with `ray start --head` and pass the address it prints, or leave out "
                          "--address to start a local one for this compare") from None


class RayExecutor:
    name = "ray"

    def __init__(self, address: str | None = None, max_retries: int = 2, num_cpus: int | None = None):
        self.max_retries = max_retries
        env = {k: os.environ[k] for k in (KILL_ONCE_ENV,) if k in os.environ}
        if not address:  # a local cluster: its workers import this plugtune, like the local executor's subprocesses
            env["PYTHONPATH"] = same_code_env()["PYTHONPATH"]
        runtime_env = {"env_vars": env} if env else None
        if ray.is_initialized():  # e.g. the caller connected already
            self._owns = False
        elif address:
            check_reachable(address)
            try:
                ray.init(address=address, runtime_env=runtime_env, logging_level="ERROR",
                         log_to_driver=True)
            except ConnectionError as exc:
                raise ConfigError(f"could not join the Ray cluster at {address}: {exc}") from None
            self._owns = True
        else:
            ray.init(num_cpus=num_cpus or os.cpu_count(), include_dashboard=False, runtime_env=runtime_env,
                     logging_level="ERROR", object_store_memory=256 * 2**20)
            self._owns = True
        self.resources = ray.cluster_resources()

    def map(self, runs: list[Run], done: Callable[[Run, dict], None]) -> None:
        cpus = self.resources.get("CPU", 0)
        for run in runs:
            if run.cpus > cpus or run.gpus > self.resources.get("GPU", 0):
                raise ConfigError(f"run {run.key} needs {run.cpus:g} CPUs and {run.gpus:g} GPUs; the cluster has "
                                  f"{cpus:g} CPUs and {self.resources.get('GPU', 0):g} GPUs (lower --cpus-per-run)")
        pending = {
            _remote_task.options(num_cpus=run.cpus, num_gpus=run.gpus, max_retries=self.max_retries,
                                 name=f"compare:{run.key}").remote(run.job, run.key): run
            for run in runs}
        while pending:
            ready, _ = ray.wait(list(pending), num_returns=1)
            run = pending.pop(ready[0])
            t0 = time.perf_counter()
            try:
                result = ray.get(ready[0])
            except ray.exceptions.RayError as exc:
                for ref in pending:
                    ray.cancel(ref, force=True)
                raise RuntimeError(f"run {run.key} failed on Ray after {self.max_retries} retries "
                                   f"({time.perf_counter() - t0:.0f} s): {exc}") from exc
            done(run, result)

    def close(self) -> None:
        if self._owns:
            ray.shutdown()
