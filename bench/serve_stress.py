"""Stress test of `plugtune serve`: good and bad requests from many clients at once; it stops by itself.

    python bench/serve_stress.py                     # default model, 4 LoRA r 8 adapters, 16 clients, 120 s
    python bench/serve_stress.py --model tiny --adapters 2 --clients 4 --duration 10 --max-tokens 16 \\
        --max-prompt-tokens 128                      # a quick check

The server runs in a subprocess on loopback (its memory is read from /proc/<pid>/status), with an
API key, a temporary --adapters-dir of N LoRA r 8 adapters with random non-zero weights (all but
the last loaded at start-up; the last is loaded on first use, LoRAX-style) and, unless
--no-router, a router for model="auto". A warm-up asks every model once, concurrently (the
lazily loaded adapter twice). Then --clients closed-loop clients (asyncio + httpx) send requests
until --requests have been started or --duration seconds have passed. The first requests cover
every kind once; after that each client draws a kind by WEIGHTS:
  good       chat, chat_stream, completion (streamed or not) on a random adapter, the base or auto
  cancelled  cancelled_stream: a stream the client closes after 1-3 chunks or before the answer
             starts; hangup_body: the client closes halfway through sending the body
  bad        malformed_json, missing_messages, unknown_model, oversized_prompt (> --max-prompt-tokens),
             max_tokens_over (> --max-tokens), no_api_key, wrong_api_key, oversized_body
             (> --max-body-bytes, with a Content-Length or chunked)
Every answer is classified: ok (a full result: a JSON completion, or SSE chunks ending in [DONE]),
refused (a bad request's expected 4xx with an OpenAI error body carrying a message), cancelled (a
deliberate hang-up), or a failure: a 5xx, a 429 (the clients never exceed --max-concurrent, so a
429 means leaked slots), a wrong status or error code, an error body without a message, a broken
result or stream, a connection error that was not a deliberate hang-up, or no answer within
--request-timeout. After the load the server must drain (nothing in flight, running or waiting),
answer /health, count no 5xx and no engine errors in /metrics, and log no traceback.

Reported: requests/s (all, good), output tokens/s, p50/p99 latency per kind and for good requests,
time to first token of streams, counts per kind and outcome, the server's RSS after warm-up (the
first 10 % of the load) vs at the end, and /metrics at the end. Writes bench/results/serve_stress.json;
exits 1 if anything failed.
"""
from __future__ import annotations

import argparse
import asyncio
import collections
import json
import os
import random
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from serve_load import ROOT, ServerProcess, free_port, prepare  # noqa: E402

GOOD = ("chat", "chat_stream", "completion")
# How often each kind is drawn; a bad kind's expected answer is (status, error code, error param).
WEIGHTS = {"chat": 20, "chat_stream": 20, "completion": 10, "cancelled_stream": 8, "hangup_body": 2}
EXPECTED = {"malformed_json": (400, "invalid_json", None),
            "missing_messages": (400, "missing_required_parameter", "messages"),
            "unknown_model": (404, "model_not_found", "model"),
            "oversized_prompt": (400, "context_length_exceeded", None),
            "max_tokens_over": (400, None, "max_tokens"),
            "no_api_key": (401, "invalid_api_key", None),
            "wrong_api_key": (401, "invalid_api_key", None),
            "oversized_body": (413, "request_too_large", None)}
WEIGHTS.update({k: 5 for k in EXPECTED})
KINDS = list(WEIGHTS)
OUTCOMES = ("ok", "refused", "cancelled")  # anything else is a failure


class StressServer(ServerProcess):
    """serve_load's server process with the limits, the API key and run-time loading set; its
    stderr is drained by a thread (a full pipe would block the server) and kept for the report."""

    def __init__(self, model: str, adapters: list[Path], args, router: Path | None):
        self.port = free_port()
        preloaded = adapters[:-1] if len(adapters) > 1 else adapters
        cmd = [sys.executable, "-m", "plugtune.serve", "--model", model, "--served-model-name", "base",
               "--port", str(self.port), "--threads", str(args.threads), "--log-level", "warning",
               "--max-batch", str(args.max_batch or args.clients),
               "--max-concurrent", str(args.max_concurrent or 2 * args.clients),
               "--max-tokens", str(args.max_tokens), "--max-prompt-tokens", str(args.max_prompt_tokens),
               "--max-body-bytes", str(args.max_body_bytes), "--adapters-dir", str(adapters[0].parent),
               *[a for d in preloaded for a in ("--adapter", f"{d.name}={d}")],
               *(["--router", str(router)] if router else [])]
        env = {**os.environ, "PLUGTUNE_API_KEY": args.api_key,  # not on the command line: ps shows that
               "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
        self.proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        self.url = f"http://127.0.0.1:{self.port}"
        self.samples: list[tuple[float, float]] = []  # (time, RSS MB), every 0.2 s from wait_ready on
        self._stop = threading.Event()
        self.log: list[str] = []  # stderr lines (log_text joins them)

    def log_text(self) -> str:
        return "".join(self.log)

    def wait_ready(self, timeout: float = 600) -> None:
        super().wait_ready(timeout)
        threading.Thread(target=lambda: self.log.extend(self.proc.stderr), daemon=True).start()


def make_router(model: str, adapters: list[Path], prompts: list[str], out: Path) -> Path:
    """A router over the start-up adapters (each gets its own slice of the prompts)."""
    import plugtune
    from plugtune.inference.router import fit_router

    names = [d.name for d in adapters]
    lm = plugtune.load(model, adapter={d.name: d for d in adapters}, dtype="float32", device="cpu")
    fit_router(lm.model, lm.tokenizer, {n: prompts[k::len(names)] for k, n in enumerate(names)}).save(out)
    return out


# Requests ------------------------------------------------------------------------------------------
class Spec:
    """One request to send and what counts as a correct answer to it."""

    def __init__(self, kind: str, path: str, body=None, *, content=None, headers=None, stream=False,
                 cancel_after: int | None = None, cancel_delay: float | None = None):
        self.kind, self.path, self.body, self.content, self.headers = kind, path, body, content, headers or {}
        self.stream, self.cancel_after, self.cancel_delay = stream, cancel_after, cancel_delay
        self.expect = EXPECTED.get(kind)


def build(kind: str, rng: random.Random, ctx: dict) -> Spec:
    """A request of `kind`: random model, prompt and sampling settings (ctx: the run's settings)."""
    auth = {"Authorization": f"Bearer {ctx['key']}"}
    model, prompt = rng.choice(ctx["models"]), rng.choice(ctx["prompts"])
    sampling = {"max_tokens": rng.randint(1, ctx["max_tokens"]), "temperature": rng.choice([0, 0.8])}
    chat = {"model": model, "messages": [{"role": "user", "content": prompt}], **sampling}
    usage = {"stream_options": {"include_usage": True}}
    limit = ctx["max_body_bytes"]
    if kind == "chat":
        return Spec(kind, "/v1/chat/completions", chat, headers=auth)
    if kind == "chat_stream":
        return Spec(kind, "/v1/chat/completions", {**chat, "stream": True, **usage}, headers=auth, stream=True)
    if kind == "completion":
        stream = rng.random() < 0.5
        body = {"model": model, "prompt": prompt, **sampling, "stream": stream, **(usage if stream else {})}
        return Spec(kind, "/v1/completions", body, headers=auth, stream=stream)
    if kind == "cancelled_stream":  # long enough to be cut: ignore_eos, the most tokens allowed
        body = {**chat, "max_tokens": ctx["max_tokens"], "ignore_eos": True, "stream": True}
        k = rng.randint(0, 3)
        return Spec(kind, "/v1/chat/completions", body, headers=auth, stream=True, cancel_after=k or None,
                    cancel_delay=rng.uniform(0.001, 0.05) if k == 0 else None)
    if kind == "hangup_body":  # half the body, then the client gives up waiting and closes
        data = json.dumps({**chat, "stream": True}).encode()

        async def half():
            yield data[:len(data) // 2]
            await asyncio.sleep(60)
            yield data[len(data) // 2:]
        return Spec(kind, "/v1/chat/completions", content=half(), headers=auth, stream=True,
                    cancel_delay=rng.uniform(0.02, 0.1))
    if kind == "malformed_json":
        content = rng.choice([b'{"model": "base", "messages": [', b"not json at all", b"\xff\xfe{}", b"[1, 2]",
                              b'"a string"', b"", b"[" * min(100_000, limit // 2)])
        return Spec(kind, "/v1/chat/completions", content=content,
                    headers={**auth, "Content-Type": "application/json"})
    if kind == "missing_messages":
        return Spec(kind, "/v1/chat/completions", {"model": model, "max_tokens": 4}, headers=auth)
    if kind == "unknown_model":
        name = rng.choice([f"no-such-adapter-{rng.randrange(10**6)}", "../etc/passwd", "s" * 300, "base "])
        return Spec(kind, "/v1/chat/completions", {**chat, "model": name}, headers=auth)
    if kind == "oversized_prompt":
        words = " ".join(["hello"] * (ctx["max_prompt_tokens"] + 16))  # >= 1 token per word
        if rng.random() < 0.5:
            return Spec(kind, "/v1/chat/completions", {**chat, "messages": [{"role": "user", "content": words}]},
                        headers=auth)
        return Spec(kind, "/v1/completions", {"model": model, "prompt": [5] * (ctx["max_prompt_tokens"] + 1)},
                    headers=auth)
    if kind == "max_tokens_over":
        return Spec(kind, "/v1/chat/completions", {**chat, "max_tokens": ctx["max_tokens"] + rng.randint(1, 10**6)},
                    headers=auth)
    if kind == "no_api_key":
        path = rng.choice(["/v1/chat/completions", "/v1/completions", "/v1/models"])
        return Spec(kind, path, None if path == "/v1/models" else chat)
    if kind == "wrong_api_key":
        given = rng.choice([f"Bearer {ctx['key']}x", "Bearer", f"Basic {ctx['key']}", "sk-no-scheme"])
        return Spec(kind, "/v1/chat/completions", chat, headers={"Authorization": given})
    if kind == "oversized_body":
        big = json.dumps({**chat, "messages": [{"role": "user", "content": "x" * (limit + rng.randint(1, limit))}]})
        data = big.encode()
        if rng.random() < 0.5:  # chunked: no Content-Length, so the limit is enforced while reading
            async def chunks():
                for i in range(0, len(data), 65536):
                    yield data[i:i + 65536]
            return Spec(kind, "/v1/chat/completions", content=chunks(), headers=auth)
        return Spec(kind, "/v1/chat/completions", content=data, headers={**auth, "Content-Type": "application/json"})
    raise ValueError(f"unknown kind {kind!r}")


def check_error(status: int, body: bytes, spec: Spec) -> tuple[str, str]:
    """(outcome, detail) for a non-200 answer."""
    try:
        err = json.loads(body)["error"]
        message = err["message"]
    except (ValueError, KeyError, TypeError):
        return "no_message", f"HTTP {status} without an OpenAI error body: {body[:200]!r}"
    if not isinstance(message, str) or not message.strip():
        return "no_message", f"HTTP {status} with an empty message: {err}"
    if status >= 500:
        return "5xx", f"HTTP {status}: {message[:300]}"
    if status == 429:
        return "429", message[:300]
    if spec.expect is None:
        return "wrong_status", f"a good request got HTTP {status}: {message[:300]}"
    want, code, param = spec.expect
    if status != want or (code and err.get("code") != code) or (param and err.get("param") != param):
        return "wrong_status", f"HTTP {status} code={err.get('code')} param={err.get('param')}, expected " \
                               f"{want} code={code} param={param}: {message[:200]}"
    return "refused", ""


def check_result(data, spec: Spec) -> str:
    """'' if `data` is a full non-streamed completion, else what is wrong with it."""
    try:
        choice = data["choices"][0]
        text = choice["message"]["content"] if spec.path.endswith("chat/completions") else choice["text"]
        ok = (len(data["choices"]) == 1 and isinstance(text, str) and choice["finish_reason"] in ("stop", "length")
              and data["usage"]["completion_tokens"] >= 1)
    except (KeyError, IndexError, TypeError):
        ok = False
    return "" if ok else f"not a completion: {json.dumps(data)[:300]}"


async def exchange(client, spec: Spec, start: float) -> dict:
    kw = {"json": spec.body} if spec.content is None else {"content": spec.content}
    method = "GET" if spec.path == "/v1/models" else "POST"
    out = {"status": None, "ttft": None, "tokens": 0}
    async with client.stream(method, spec.path, headers=spec.headers, **kw) as r:
        out["status"] = r.status_code
        if r.status_code != 200:
            outcome, detail = check_error(r.status_code, await r.aread(), spec)
            return {**out, "outcome": outcome, "detail": detail}
        if spec.expect is not None:
            return {**out, "outcome": "wrong_status", "detail": f"a bad request got HTTP 200: {spec.kind}"}
        if not spec.stream:
            try:
                data = json.loads(await r.aread())
            except ValueError as exc:
                return {**out, "outcome": "bad_result", "detail": f"not JSON: {exc}"}
            detail = check_result(data, spec)
            out["tokens"] = 0 if detail else data["usage"]["completion_tokens"]
            return {**out, "outcome": "bad_result" if detail else "ok", "detail": detail}
        chunks, done, finished = 0, False, False
        async for line in r.aiter_lines():
            if not line.startswith("data: "):
                continue
            if line == "data: [DONE]":
                done = True
                continue
            try:
                chunk = json.loads(line[6:])
            except ValueError:
                return {**out, "outcome": "bad_result", "detail": f"not a JSON chunk: {line[:200]!r}"}
            if "error" in chunk:
                return {**out, "outcome": "stream_error", "detail": str(chunk["error"])[:300]}
            for c in chunk.get("choices", []):
                if c.get("delta", {}).get("content") or c.get("text"):
                    chunks += 1
                    if out["ttft"] is None:
                        out["ttft"] = time.perf_counter() - start
                finished |= c.get("finish_reason") is not None
            if chunk.get("usage"):
                out["tokens"] = chunk["usage"]["completion_tokens"]
            if spec.cancel_after is not None and chunks >= spec.cancel_after:
                return {**out, "outcome": "cancelled", "detail": ""}  # leaving the block closes the connection
        if done and finished and (out["tokens"] >= 1 or "stream_options" not in spec.body):
            return {**out, "outcome": "ok", "detail": ""}
        return {**out, "outcome": "bad_result", "detail": f"stream ended early: done={done} finish={finished}"}


async def send(client, spec: Spec, timeout: float) -> dict:
    import httpx

    start = time.perf_counter()
    try:
        if spec.cancel_delay is not None:  # hang up before the answer starts (if it has not come by then)
            try:
                res = await asyncio.wait_for(exchange(client, spec, start), spec.cancel_delay)
            except asyncio.TimeoutError:
                res = {"status": None, "ttft": None, "tokens": 0, "outcome": "cancelled", "detail": "before the answer"}
        else:
            res = await asyncio.wait_for(exchange(client, spec, start), timeout)
    except asyncio.TimeoutError:
        res = {"status": None, "ttft": None, "tokens": 0, "outcome": "timeout", "detail": f"no answer in {timeout} s"}
    except httpx.HTTPError as exc:  # includes connection errors (which are never deliberate here)
        res = {"status": None, "ttft": None, "tokens": 0, "outcome": "connection_error",
               "detail": f"{type(exc).__name__}: {exc}"}
    except Exception as exc:  # an answer of a shape the checks did not expect
        res = {"status": None, "ttft": None, "tokens": 0, "outcome": "bad_result",
               "detail": f"{type(exc).__name__}: {exc}"}
    return {"kind": spec.kind, "latency": time.perf_counter() - start, **res}


async def load(server: StressServer, ctx: dict, clients: int, requests: int, duration: float, timeout: float,
               seed: int) -> tuple[list[dict], float]:
    """`clients` closed-loop clients; at most `requests` requests start, none after `duration` s.
    Request i < len(KINDS) is of kind KINDS[i] (every kind at least once), later ones are drawn."""
    import httpx

    results, started = [], 0
    limits = httpx.Limits(max_connections=clients + 4, max_keepalive_connections=clients + 4)
    t0 = time.perf_counter()
    async with httpx.AsyncClient(base_url=server.url, timeout=timeout, limits=limits) as client:
        weights = [WEIGHTS[kind] for kind in KINDS]

        async def worker(c: int) -> None:
            nonlocal started
            rng = random.Random(seed * 1000 + c)
            while started < requests and time.perf_counter() - t0 < duration and server.proc.poll() is None:
                i, started = started, started + 1
                kind = KINDS[i] if i < len(KINDS) else rng.choices(KINDS, weights)[0]
                results.append({**await send(client, build(kind, rng, ctx), timeout), "t": time.perf_counter() - t0})

        await asyncio.gather(*(worker(k) for k in range(clients)))
    return results, time.perf_counter() - t0


async def warm_up(server: StressServer, ctx: dict, timeout: float) -> list[dict]:
    """Every model once, all at once; the lazily loaded adapter twice (both wait for one load)."""
    import httpx

    rng = random.Random(0)
    async with httpx.AsyncClient(base_url=server.url, timeout=timeout) as client:
        specs = []
        for model in ctx["models"] + [ctx["lazy"]]:
            spec = build("chat", rng, ctx)
            spec.body["model"] = model
            specs.append(spec)
        return await asyncio.gather(*(send(client, s, timeout) for s in specs))


# Report --------------------------------------------------------------------------------------------
def percentile(xs: list[float], q: float) -> float | None:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q * (len(xs) - 1))))] if xs else None


def ms(xs: list[float]) -> dict:
    return {"p50_ms": _r(percentile(xs, 0.5)), "p99_ms": _r(percentile(xs, 0.99)), "n": len(xs)}


def _r(x):
    return None if x is None else round(1000 * x, 1)


def rss_report(samples: list[tuple[float, float]], t0: float, t1: float) -> dict:
    """RSS after warm-up (10 % into the load) vs at the end, the peak, and the least-squares slope
    after warm-up; `per_s`: one sample a second over the load."""
    window = [(t, m) for t, m in samples if t0 <= t <= t1]
    if not window:
        return {}
    warm_t = t0 + 0.1 * (t1 - t0)
    after = [(t, m) for t, m in window if t >= warm_t] or window[-1:]
    warm, end = round(after[0][1], 1), round(after[-1][1], 1)  # as reported: growth_mb = end - after_warmup exactly
    slope = 0.0
    if len(after) > 1:
        mt, mm = sum(t for t, _ in after) / len(after), sum(m for _, m in after) / len(after)
        var = sum((t - mt) ** 2 for t, _ in after)
        slope = 60 * sum((t - mt) * (m - mm) for t, m in after) / var if var else 0.0
    per_s, next_t = [], t0
    for t, m in window:
        if t >= next_t:
            per_s.append(round(m, 1))
            next_t = t + 1.0
    return {"start": round(window[0][1], 1), "after_warmup": warm, "end": end,
            "peak": round(max(m for _, m in window), 1), "growth_mb": round(end - warm, 1),
            "growth_pct": round(100 * (end - warm) / warm, 2), "slope_mb_per_min": round(slope, 2), "per_s": per_s}


def summarize(results: list[dict], wall: float) -> dict:
    kinds = {}
    for kind in KINDS:
        rs = [r for r in results if r["kind"] == kind]
        outcomes = collections.Counter(r["outcome"] for r in rs)
        kinds[kind] = {"n": len(rs), **{o: outcomes.get(o, 0) for o in OUTCOMES},
                       "failed": sum(n for o, n in outcomes.items() if o not in OUTCOMES),
                       "failures": {o: n for o, n in outcomes.items() if o not in OUTCOMES},
                       **ms([r["latency"] for r in rs])}
    good = [r for r in results if r["kind"] in GOOD and r["outcome"] == "ok"]
    return {"requests": len(results), "seconds": round(wall, 2), "requests_per_s": round(len(results) / wall, 2),
            "good_requests_per_s": round(len(good) / wall, 2),
            "output_tokens_per_s": round(sum(r["tokens"] for r in good) / wall, 1),
            "latency_all": ms([r["latency"] for r in results]), "latency_good": ms([r["latency"] for r in good]),
            "ttft_streams": ms([r["ttft"] for r in good if r["ttft"] is not None]), "kinds": kinds}


def print_table(s: dict, rss: dict) -> None:
    print(f"{'kind':<17} {'n':>5} {'ok':>5} {'refused':>7} {'cancel':>6} {'failed':>6} {'p50 ms':>8} {'p99 ms':>8}")
    for kind, k in s["kinds"].items():
        print(f"{kind:<17} {k['n']:>5} {k['ok']:>5} {k['refused']:>7} {k['cancelled']:>6} {k['failed']:>6} "
              f"{k['p50_ms'] or 0:>8.1f} {k['p99_ms'] or 0:>8.1f}")
    la, lg, tt = s["latency_all"], s["latency_good"], s["ttft_streams"]
    print(f"{'all':<17} {s['requests']:>5} {'':>5} {'':>7} {'':>6} "
          f"{sum(k['failed'] for k in s['kinds'].values()):>6} {la['p50_ms'] or 0:>8.1f} {la['p99_ms'] or 0:>8.1f}")
    print(f"\n{s['requests']} requests in {s['seconds']} s: {s['requests_per_s']} req/s, good (ok) "
          f"{s['good_requests_per_s']} req/s, {s['output_tokens_per_s']} output tok/s; good latency p50 "
          f"{lg['p50_ms']} ms p99 {lg['p99_ms']} ms; stream TTFT p50 {tt['p50_ms']} ms p99 {tt['p99_ms']} ms")
    if rss:
        print(f"server RSS MB: start {rss['start']}, after warm-up {rss['after_warmup']}, end {rss['end']}, peak "
              f"{rss['peak']}; growth {rss['growth_mb']:+} MB ({rss['growth_pct']:+}%), slope "
              f"{rss['slope_mb_per_min']:+} MB/min")


def server_checks(server: StressServer, timeout: float = 30.0) -> tuple[dict, dict, list[str]]:
    """After the load: the server is alive, drains (nothing in flight, running or waiting), answers
    /health, counted no 5xx and no engine error, and logged no traceback. Returns its /metrics,
    the checks' values and the problems found."""
    import httpx

    metrics, checks = {}, {"exit_code": server.proc.poll(), "drained": False, "health_status": None}
    if checks["exit_code"] is not None:
        return metrics, checks, [f"the server exited with code {checks['exit_code']}"]
    problems = []
    deadline = time.monotonic() + timeout
    busy = ("plugtune_requests_in_flight", "plugtune_num_requests_running", "plugtune_num_requests_waiting")
    while time.monotonic() < deadline:
        try:
            metrics = server.metrics()
        except httpx.HTTPError as exc:
            return metrics, checks, [f"/metrics failed after the load: {type(exc).__name__}: {exc}"]
        checks["drained"] = all(metrics.get(k, 0) == 0 for k in busy)
        if checks["drained"]:
            break
        time.sleep(0.2)
    else:
        problems.append("not drained after the load: " + ", ".join(f"{k}={metrics.get(k)}" for k in busy))
    try:
        health = httpx.get(server.url + "/health", timeout=10)
        checks["health_status"] = health.status_code
        if health.status_code != 200 or health.json() != {"status": "ok"}:
            problems.append(f"/health answered {health.status_code}: {health.text[:200]}")
    except httpx.HTTPError as exc:
        problems.append(f"/health failed: {exc}")
    fives = {k: v for k, v in metrics.items() if k.startswith("plugtune_http_requests_total") and 'status="5' in k}
    checks["server_5xx"] = int(sum(fives.values()))
    if fives:
        problems.append(f"the server counted 5xx answers: {fives}")
    checks["engine_errors"] = int(metrics.get("plugtune_engine_errors_total", 0))
    if checks["engine_errors"]:
        problems.append(f"engine errors: {checks['engine_errors']}")
    time.sleep(0.2)  # let the stderr thread catch up
    tracebacks = [i for i, line in enumerate(server.log) if line.startswith("Traceback")]
    checks["tracebacks"] = len(tracebacks)
    if tracebacks:
        problems.append(f"the server logged {len(tracebacks)} traceback(s); the first:\n"
                        + "".join(server.log[tracebacks[0]:tracebacks[0] + 30]))
    return metrics, checks, problems


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m", help="built-in name, model directory, or 'tiny'")
    parser.add_argument("--adapters", type=int, default=4, help="LoRA adapters (the last is loaded on first use)")
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--duration", type=float, default=120, help="no request starts after this many s")
    parser.add_argument("--requests", type=int, default=2000, help="at most this many requests")
    parser.add_argument("--threads", type=int, default=2, help="server torch threads")
    parser.add_argument("--api-key", default="sk-stress")
    parser.add_argument("--max-tokens", type=int, default=32, help="the server's --max-tokens; good requests "
                                                                   "ask 1..this many")
    parser.add_argument("--max-prompt-tokens", type=int, default=1024)
    parser.add_argument("--max-body-bytes", type=int, default=1 << 20)
    parser.add_argument("--max-batch", type=int, default=0, help="default: --clients")
    parser.add_argument("--max-concurrent", type=int, default=0, help="default: 2 x --clients")
    parser.add_argument("--request-timeout", type=float, default=60, help="an answer slower than this is a hang")
    parser.add_argument("--no-router", action="store_true", help="no model='auto'")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "serve_stress.json"))
    args = parser.parse_args(argv)
    if args.adapters < 1 or args.clients < 1:
        parser.error("--adapters and --clients must be >= 1")
    if 8 * (args.max_prompt_tokens + 16) + 1000 > args.max_body_bytes:
        parser.error("--max-body-bytes must hold an oversized prompt: raise it or lower --max-prompt-tokens")
    if args.max_concurrent and args.max_concurrent < args.clients:
        parser.error("--max-concurrent below --clients would answer good requests 429")

    from plugtune.data import load_examples

    prompts = [ex.messages[0]["content"] for skill in ("dates", "units", "prices", "reverse")
               for ex in load_examples(f"plugtune:skills/{skill}_test.jsonl")[:16]]
    with tempfile.TemporaryDirectory(prefix="plugtune-stress-") as work:
        model, adapters = prepare(args.model, args.adapters, args.rank, Path(work))
        preloaded = adapters[:-1] if len(adapters) > 1 else adapters
        router = None if args.no_router else make_router(model, preloaded, prompts, Path(work) / "router")
        ctx = {"key": args.api_key, "prompts": prompts, "max_tokens": args.max_tokens,
               "max_prompt_tokens": args.max_prompt_tokens, "max_body_bytes": args.max_body_bytes,
               "models": ["base", *[d.name for d in preloaded], *(["auto"] if router else [])],
               "lazy": adapters[-1].name}
        ctx["models"] += [ctx["lazy"]] if ctx["lazy"] not in ctx["models"] else []
        print(f"{args.model}: {args.adapters} LoRA r {args.rank} adapters ({ctx['lazy']} loaded on first use), "
              f"router: {'yes' if router else 'no'}; {args.clients} clients, <= {args.requests} requests or "
              f"{args.duration:.0f} s; server threads {args.threads}, max tokens {args.max_tokens}", flush=True)
        server = StressServer(model, adapters, args, router)
        try:
            server.wait_ready()
            warm = asyncio.run(warm_up(server, ctx, args.request_timeout))
            t0 = time.monotonic()
            results, wall = asyncio.run(load(server, ctx, args.clients, args.requests, args.duration,
                                             args.request_timeout, args.seed))
            t1 = time.monotonic()
            metrics, checks, problems = server_checks(server)
            rss = rss_report(server.samples, t0, t1)
        finally:
            server.stop()
    summary = summarize(results, wall)
    failed = [r for r in warm + results if r["outcome"] not in OUTCOMES]
    missing = [k for k in EXPECTED if not summary["kinds"][k]["refused"]]
    if missing:
        problems.append(f"bad requests never refused as expected (too few requests?): {missing}")
    print_table(summary, rss)
    for p in problems:
        print("PROBLEM:", p)
    for r in failed[:10]:
        print(f"FAILED {r['kind']}: {r['outcome']}: {r['detail']}")
    result = {"model": args.model, "adapters": args.adapters, "rank": args.rank, "clients": args.clients,
              "duration_limit": args.duration, "requests_limit": args.requests, "threads": args.threads,
              "max_tokens": args.max_tokens, "max_prompt_tokens": args.max_prompt_tokens,
              "max_body_bytes": args.max_body_bytes, "router": router is not None, "cpu_count": os.cpu_count(),
              "weights": WEIGHTS, **summary, "rss_mb": rss, "warmup_failures": sum(r["outcome"] not in OUTCOMES
                                                                                  for r in warm),
              "failures": len(failed) + len(problems), "failure_examples": failed[:20], "problems": problems,
              "checks": checks, "server_metrics": metrics, "passed": not failed and not problems}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(f"{'PASSED' if result['passed'] else 'FAILED'}: {result['failures']} failure(s); wrote {out}")
    return result


if __name__ == "__main__":
    sys.exit(0 if main()["passed"] else 1)
