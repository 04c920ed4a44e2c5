"""Background jobs (training runs, merges, checkpoint exports) as detached processes.

A job is `python -m plugtune.ui.worker KIND JOB_DIR ...` started in its own session
(start_new_session: a signal to the page's server, or its exit, does not reach it) with stdin from
/dev/null and stdout/stderr appended to JOB_DIR/log.txt, never to a pipe: a pipe nobody reads fills
up and blocks the child (LLaMA-Factory #10180). Two files say where it stands:

    JOB_DIR/launch.json  written here: kind, pid, command, start time
    JOB_DIR/state.json   written by the worker: state (running | finished | failed | stopped),
                         progress, error, result; replaced atomically

So the page can be closed, reopened or restarted at any time: the state is read back from the
files. A job whose process is gone without a final state (kill -9, a crash of the interpreter) reads
as `died`, pointing at its log.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

LAUNCH, STATE, LOG, STOP = "launch.json", "state.json", "log.txt", "stop_requested"
FINAL = ("finished", "failed", "stopped")

_children: dict[int, subprocess.Popen] = {}  # ours, so that finished ones are reaped (no zombies)


def write_json_atomic(path: Path, data: dict) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=1, default=str))
    os.replace(tmp, path)


def read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def start(kind: str, job_dir: Path, args: list[str], env: dict | None = None) -> dict:
    """Start worker `kind` for `job_dir` detached; returns its launch record."""
    job_dir.mkdir(parents=True, exist_ok=True)
    current = status(job_dir)
    if current and current["state"] in ("starting", "running"):
        raise RuntimeError(f"a {current['kind']} job is already running in {job_dir} (pid {current['pid']}): "
                           "stop it first")
    (job_dir / STATE).unlink(missing_ok=True)
    (job_dir / STOP).unlink(missing_ok=True)
    cmd = [sys.executable, "-m", "plugtune.ui.worker", kind, str(job_dir), *args]
    # The worker imports the same plugtune as this process, wherever the page's server was started from.
    package_root = str(Path(__file__).resolve().parents[2])
    path = os.pathsep.join(p for p in (package_root, os.environ.get("PYTHONPATH", "")) if p)
    with open(job_dir / LOG, "ab") as log:
        log.write(f"\n=== {time.strftime('%Y-%m-%d %H:%M:%S')} {' '.join(cmd)}\n".encode())
        log.flush()
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True, env={**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONPATH": path, **(env or {})})
    _children[proc.pid] = proc
    launch = {"kind": kind, "pid": proc.pid, "command": cmd, "started": time.time()}
    write_json_atomic(job_dir / LAUNCH, launch)
    return launch


def _alive(pid: int) -> bool:
    """Whether `pid` is a live (not zombie) worker process."""
    child = _children.get(pid)
    if child is not None and child.poll() is not None:
        _children.pop(pid, None)
        return False
    try:
        with open(f"/proc/{pid}/stat") as f:
            state = f.read().rsplit(")", 1)[1].split()[0]
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            cmdline = f.read()
    except OSError:
        try:
            os.kill(pid, 0)
        except OSError:
            return False
        return True
    return state not in ("Z", "X") and b"plugtune.ui.worker" in cmdline  # not a recycled pid


def status(job_dir: Path) -> dict | None:
    """The job's launch record merged with its state; None when no job ever ran there."""
    launch = read_json(job_dir / LAUNCH)
    if launch is None:
        return None
    state = read_json(job_dir / STATE) or {}
    out = {**launch, **state}
    alive = _alive(int(launch["pid"]))
    if state.get("state") in FINAL:
        out["state"] = state["state"]
    elif alive:
        out["state"] = state.get("state", "starting")
    elif (job_dir / STOP).exists():  # stopped before it could say so (e.g. during start-up)
        out["state"] = "stopped"
    else:
        out["state"] = "died"
        out["error"] = (f"the {launch['kind']} process (pid {launch['pid']}) ended without saying why: "
                        f"see {job_dir / LOG}")
    out["alive"] = alive
    return out


def stop(job_dir: Path) -> dict:
    """SIGTERM to the job's process group; the worker records `stopped` (its last checkpoint stays)."""
    st = status(job_dir)
    if st is None or not st["alive"]:
        raise RuntimeError(f"no running job in {job_dir}")
    (job_dir / STOP).write_text(str(time.time()))
    try:
        os.killpg(int(st["pid"]), signal.SIGTERM)
    except ProcessLookupError:
        pass
    return st


def log_tail(job_dir: Path, max_bytes: int = 6000) -> str:
    path = job_dir / LOG
    if not path.is_file():
        return ""
    with open(path, "rb") as f:
        f.seek(max(0, path.stat().st_size - max_bytes))
        return f.read().decode("utf-8", "replace")
