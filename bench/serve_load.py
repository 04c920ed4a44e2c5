"""Load test of `plugtune serve`: many adapters on one base vs the base alone vs one at a time.

    python bench/serve_load.py                       # default model, 16 LoRA r 8 adapters
    python bench/serve_load.py --model tiny --max-tokens 16 --requests 48 --duration 20   # a quick check
    python bench/serve_load.py --concurrency 16 --skip-serial --before /tmp/plugtune-before   # vs an older tree

--before DIR starts a second server from another plugtune source tree (e.g. `git archive COMMIT plugtune |
tar -x -C DIR`), idle while the other one is measured; each load runs on this tree's server and then on
that one (mixed, mixed before, base, base before), and the summary gives this tree / that tree tokens/s.

The server runs in a subprocess on loopback (so its memory can be read from /proc), started with
one LoRA adapter per client (r 8 on q/k/v/o; random weights: throughput does not depend on what
an adapter learned). Closed-loop streaming clients (asyncio + httpx), each bounded by --requests
per run and --duration seconds per run, send chat requests with greedy decoding and `ignore_eos`,
so every request generates exactly --max-tokens tokens. Runs:
  mixed c    c = 1, 4, 16 concurrent clients, client k on adapter k (all different)
  base c     the same load on the base model: model="base" on the same server, so every row
             skips the adapters (what mixing many adapters costs, all else equal)
  serial 16  the 16-client mixed load on a server started with --max-batch 1: one request at a
             time, what a server without batching does
Reported per run: requests/s, output tokens/s, p50/p99 time to first token and total latency, the
mean decode batch size (from /metrics), and the server's RSS (start, peak, end). Targets at 16
clients: mixed >= 0.8x base tokens/s, and >= 4x serial. Writes bench/results/serve_load.json.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def prepare(model: str, n_adapters: int, rank: int, work: Path) -> tuple[str, list[Path]]:
    """The model directory/name and n saved LoRA adapters for it (reused when already there)."""
    import torch

    import plugtune
    from plugtune.adapters import adapter_state, attach_adapter, save_adapter

    work.mkdir(parents=True, exist_ok=True)
    if model == "tiny":
        from plugtune.models.tiny import save_tiny_model_dir

        model = str(work / "tiny-llama")
        if not Path(model, "config.json").is_file():
            save_tiny_model_dir(model)
    dirs = [work / f"{Path(model).name}-lora-r{rank}" / f"s{i}" for i in range(n_adapters)]
    if all((d / "adapter_config.json").is_file() for d in dirs):
        return model, dirs
    lm = plugtune.load(model, dtype="float32", device="cpu")
    g = torch.Generator().manual_seed(0)
    for i, d in enumerate(dirs):
        attach_adapter(lm.model, "lora", {"r": rank, "alpha": 2 * rank}, name=f"s{i}", trainable=False)
        with torch.no_grad():  # B starts at zero (identity); give every adapter its own non-zero update
            for p in adapter_state(lm.model, f"s{i}").values():
                p.add_(torch.randn(p.shape, generator=g) * 0.02)
        save_adapter(lm.model, d, f"s{i}")
    return model, dirs


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    """`python -m plugtune.serve` in a subprocess, with its RSS sampled every 0.2 s."""

    def __init__(self, model: str, adapters: list[Path], max_batch: int, threads: int, max_tokens: int,
                 root: Path = ROOT):
        self.port = free_port()
        cmd = [sys.executable, "-m", "plugtune.serve", "--model", model, "--served-model-name", "base",
               "--port", str(self.port), "--max-batch", str(max_batch), "--threads", str(threads),
               "--max-tokens", str(max(max_tokens, 16)), "--max-concurrent", "256", "--log-level", "warning",
               *[a for i, d in enumerate(adapters) for a in ("--adapter", f"s{i}={d}")]]
        env = {**os.environ, "PYTHONPATH": str(root) + os.pathsep + os.environ.get("PYTHONPATH", "")}
        # The server's log goes to a file, not a pipe nobody reads (a full pipe would block the server).
        self.log = tempfile.TemporaryFile(mode="w+")
        self.proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=self.log, text=True)
        self.url = f"http://127.0.0.1:{self.port}"
        self.samples: list[tuple[float, float]] = []  # (time, RSS MB)
        self._stop = threading.Event()

    def log_text(self) -> str:
        self.log.seek(0)
        return self.log.read()

    def wait_ready(self, timeout: float = 600) -> None:
        import httpx

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited:\n{self.log_text()}")
            try:
                if httpx.get(self.url + "/health", timeout=1).status_code == 200:
                    threading.Thread(target=self._sample, daemon=True).start()
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        raise TimeoutError("server did not become healthy")

    def rss_mb(self) -> float:
        with open(f"/proc/{self.proc.pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
        return 0.0

    def _sample(self) -> None:
        while not self._stop.is_set() and self.proc.poll() is None:
            try:
                self.samples.append((time.monotonic(), self.rss_mb()))
            except OSError:
                return
            time.sleep(0.2)

    def rss_between(self, t0: float, t1: float) -> dict:
        xs = [m for t, m in self.samples if t0 <= t <= t1] or [self.rss_mb()]
        return {"start": round(xs[0], 1), "peak": round(max(xs), 1), "end": round(xs[-1], 1)}

    def metrics(self) -> dict:
        import httpx

        from plugtune.serve.prometheus import parse

        return parse(httpx.get(self.url + "/metrics", timeout=10).text)

    def stop(self) -> None:
        self._stop.set()
        self.proc.terminate()
        try:
            self.proc.wait(20)
        except subprocess.TimeoutExpired:
            self.proc.kill()


async def one_request(client, model: str, prompt: str, max_tokens: int) -> dict:
    body = {"model": model, "messages": [{"role": "user", "content": prompt}], "max_tokens": max_tokens,
            "temperature": 0, "stream": True, "ignore_eos": True, "stream_options": {"include_usage": True}}
    start = time.perf_counter()
    ttft, tokens = None, 0
    async with client.stream("POST", "/v1/chat/completions", json=body) as response:
        if response.status_code != 200:
            raise RuntimeError(f"HTTP {response.status_code}: {await response.aread()}")
        async for line in response.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if "error" in chunk:
                raise RuntimeError(chunk["error"]["message"])
            if ttft is None and any(c.get("delta", {}).get("content") for c in chunk.get("choices", [])):
                ttft = time.perf_counter() - start
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
    total = time.perf_counter() - start
    return {"ttft": ttft if ttft is not None else total, "latency": total, "tokens": tokens}


async def run_load(url: str, models: list[str], prompts: list[str], max_tokens: int, requests: int,
                   duration: float) -> dict:
    """len(models) closed-loop clients (client k asks models[k]); at most `requests` requests are
    started, none after `duration` seconds."""
    import httpx

    results, started = [], 0
    t0 = time.perf_counter()
    limits = httpx.Limits(max_connections=len(models) + 4, max_keepalive_connections=len(models) + 4)
    async with httpx.AsyncClient(base_url=url, timeout=None, limits=limits) as client:
        async def worker(k: int) -> None:
            nonlocal started
            while started < requests and time.perf_counter() - t0 < duration:
                prompt = prompts[started % len(prompts)]
                started += 1
                results.append(await one_request(client, models[k], prompt, max_tokens))

        await asyncio.gather(*(worker(k) for k in range(len(models))))
    wall = time.perf_counter() - t0

    def pct(xs, q):
        xs = sorted(xs)
        return xs[min(len(xs) - 1, int(round(q * (len(xs) - 1))))]

    ttft, lat = [r["ttft"] for r in results], [r["latency"] for r in results]
    return {"requests": len(results), "seconds": round(wall, 2), "requests_per_s": round(len(results) / wall, 3),
            "output_tokens_per_s": round(sum(r["tokens"] for r in results) / wall, 2),
            "ttft_p50_ms": round(1000 * statistics.median(ttft), 1), "ttft_p99_ms": round(1000 * pct(ttft, 0.99), 1),
            "latency_p50_ms": round(1000 * statistics.median(lat), 1),
            "latency_p99_ms": round(1000 * pct(lat, 0.99), 1)}


def measured(server: ServerProcess, name: str, models: list[str], args, prompts: list[str]) -> dict:
    before = server.metrics()
    t0 = time.monotonic()
    row = asyncio.run(run_load(server.url, models, prompts, args.max_tokens, args.requests, args.duration))
    after = server.metrics()
    steps = after["plugtune_decode_steps_total"] - before["plugtune_decode_steps_total"]
    rows = after["plugtune_decode_rows_total"] - before["plugtune_decode_rows_total"]
    row = {"run": name, "clients": len(models), **row, "mean_batch": round(rows / max(steps, 1), 2),
           "rss_mb": server.rss_between(t0, time.monotonic())}
    print(f"{name:<13} {row['clients']:>3} {row['requests']:>5} {row['requests_per_s']:>7.2f} "
          f"{row['output_tokens_per_s']:>9.1f} {row['ttft_p50_ms']:>8.0f} {row['ttft_p99_ms']:>8.0f} "
          f"{row['latency_p50_ms']:>8.0f} {row['latency_p99_ms']:>8.0f} {row['mean_batch']:>6.2f} "
          f"{row['rss_mb']['peak']:>8.0f}", flush=True)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m", help="built-in name, model directory, or 'tiny'")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--max-tokens", type=int, default=64, help="tokens generated per request")
    parser.add_argument("--requests", type=int, default=64, help="at most this many requests per run")
    parser.add_argument("--duration", type=float, default=120, help="no request starts after this many s per run")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="server torch threads")
    parser.add_argument("--skip-serial", action="store_true", help="skip the one-at-a-time baseline")
    parser.add_argument("--before", type=Path, help="another plugtune source tree to serve alternately (before/after)")
    parser.add_argument("--work", default=str(Path.home() / ".cache" / "plugtune" / "bench_serve"))
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "serve_load.json"))
    args = parser.parse_args()

    top = max(args.concurrency)
    model, adapters = prepare(args.model, top, args.rank, Path(args.work))
    from plugtune.data import load_examples

    prompts = [ex.messages[0]["content"] for skill in ("dates", "units", "prices", "reverse")
               for ex in load_examples(f"plugtune:skills/{skill}_test.jsonl")[:16]]
    print(f"{args.model}: {top} LoRA r {args.rank} adapters, {args.max_tokens} tokens per request, "
          f"<= {args.requests} requests or {args.duration:.0f} s per run, server threads {args.threads}")
    header = (f"{'run':<13} {'c':>3} {'reqs':>5} {'req/s':>7} {'out tok/s':>9} {'ttft p50':>8} {'ttft p99':>8} "
              f"{'lat p50':>8} {'lat p99':>8} {'batch':>6} {'RSS MB':>8}")
    rows = []
    server = ServerProcess(model, adapters, max_batch=top, threads=args.threads, max_tokens=args.max_tokens)
    before = None
    if args.before is not None:
        if not (args.before / "plugtune" / "__init__.py").is_file():
            parser.error(f"--before {args.before}: no plugtune package there")
        before = ServerProcess(model, adapters, max_batch=top, threads=args.threads, max_tokens=args.max_tokens,
                               root=args.before.resolve())
    try:
        for srv in (server, before):
            if srv is not None:
                srv.wait_ready()
                # Warm-up: every adapter once (first-use costs are not what we measure).
                asyncio.run(run_load(srv.url, [f"s{i}" for i in range(top)] + ["base"], prompts, 4, top + 1, 600))
        print(header)
        for c in args.concurrency:
            for run, models in (("mixed", [f"s{k}" for k in range(c)]), ("base", ["base"] * c)):
                rows.append(measured(server, run, models, args, prompts))
                if before is not None:
                    rows.append(measured(before, f"{run} before", models, args, prompts))
        rss = server.rss_between(0, time.monotonic())
    finally:
        server.stop()
        if before is not None:
            before.stop()
    if not args.skip_serial:
        serial = ServerProcess(model, adapters, max_batch=1, threads=args.threads, max_tokens=args.max_tokens)
        try:
            serial.wait_ready()
            asyncio.run(run_load(serial.url, ["s0"], prompts, 4, 1, 600))
            rows.append(measured(serial, "serial", [f"s{k}" for k in range(top)], args, prompts))
        finally:
            serial.stop()

    def tps(run, c):
        return next((r["output_tokens_per_s"] for r in rows if r["run"] == run and r["clients"] == c), None)

    summary = {"mixed_vs_base": None, "mixed_vs_serial": None}
    if tps("base", top):
        summary["mixed_vs_base"] = round(tps("mixed", top) / tps("base", top), 3)
    if tps("serial", top):
        summary["mixed_vs_serial"] = round(tps("mixed", top) / tps("serial", top), 3)
    if before is not None:
        summary["vs_before"] = {f"{run} {c}": round(tps(run, c) / tps(f"{run} before", c), 3)
                                for c in args.concurrency for run in ("mixed", "base")}
        summary["before_tree"] = str(args.before)
        print(f"this tree / --before tree, output tokens/s: {summary['vs_before']}")
    summary.update(target_mixed_vs_base=0.8, target_mixed_vs_serial=4.0,
                   rss_mb_main_server={k: rss[k] for k in ("start", "peak", "end")})
    print(f"\nat {top} clients: mixed/base tokens/s = {summary['mixed_vs_base']} (target >= 0.8), "
          f"mixed/serial = {summary['mixed_vs_serial']} (target >= 4); server RSS MB "
          f"start {rss['start']}, peak {rss['peak']}, end {rss['end']}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"model": args.model, "rank": args.rank, "max_tokens": args.max_tokens,
                               "requests_per_run": args.requests, "duration_per_run": args.duration,
                               "threads": args.threads, "cpu_count": os.cpu_count(), "rows": rows,
                               "summary": summary}, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
