"""bench/serve_stress.py against the tiny model for a few seconds: a real `plugtune serve`
subprocess on loopback under good, cancelled and bad requests from concurrent clients; and against a
deliberately broken server, whose every fault the bench must report."""
import asyncio
import json
import random
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from tests.conftest import load_bench

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
pytest.importorskip("httpx")


def test_server_survives_mixed_good_and_bad_load(tiny_model_dir, tmp_path):
    bench = load_bench("serve_stress")
    out = tmp_path / "stress.json"
    # One server thread: on a shared 2-core machine two would spin against the clients (see the bench).
    result = bench.main(["--model", str(tiny_model_dir), "--adapters", "2", "--clients", "4", "--duration", "5",
                         "--requests", "5000", "--threads", "1", "--max-tokens", "8", "--max-prompt-tokens", "128",
                         "--max-body-bytes", "65536", "--request-timeout", "30", "--out", str(out)])
    assert json.loads(out.read_text()) == json.loads(json.dumps(result))
    assert result["problems"] == [] and result["failure_examples"] == [] and result["failures"] == 0
    assert result["passed"] is True
    kinds = result["kinds"]
    assert set(kinds) == set(bench.KINDS)
    for kind in bench.EXPECTED:  # every bad request got its own 4xx, with a message (check_error)
        assert kinds[kind]["n"] >= 1 and kinds[kind]["refused"] == kinds[kind]["n"], (kind, kinds[kind])
    for kind in bench.GOOD:
        assert kinds[kind]["n"] >= 1 and kinds[kind]["ok"] == kinds[kind]["n"], (kind, kinds[kind])
    assert kinds["cancelled_stream"]["cancelled"] >= 1 and kinds["cancelled_stream"]["failed"] == 0
    assert kinds["hangup_body"]["n"] >= 1 and kinds["hangup_body"]["cancelled"] == kinds["hangup_body"]["n"]
    assert result["requests"] == sum(k["n"] for k in kinds.values())

    # The server's own counters agree with what the clients saw, answer by answer.
    m = result["server_metrics"]

    def served(status):  # answers with this status, over all paths
        return sum(v for k, v in m.items() if k.startswith("plugtune_http_requests_total{")
                   and f'status="{status}"' in k)

    assert served(401) == kinds["no_api_key"]["n"] + kinds["wrong_api_key"]["n"]
    assert served(404) == kinds["unknown_model"]["n"]
    assert served(413) == kinds["oversized_body"]["n"]
    assert served(400) == sum(kinds[k]["n"] for k in ("malformed_json", "missing_messages", "oversized_prompt",
                                                      "max_tokens_over"))
    assert served(500) == 0 and served(503) == 0
    assert served(499) >= 1  # a client that hung up mid-body is logged as gone, not as our crash
    assert m["plugtune_adapters_loaded"] == 2  # s1 was loaded on first use
    assert m['plugtune_generation_tokens_total{model="s1"}'] > 0

    checks = result["checks"]
    assert checks == {"exit_code": None, "drained": True, "health_status": 200, "server_5xx": 0, "engine_errors": 0,
                      "tracebacks": 0}
    rss = result["rss_mb"]
    assert rss["after_warmup"] > 0 and len(rss["per_s"]) >= 3
    assert rss["growth_mb"] < 64  # generous: a few seconds on a tiny model prove flatness of nothing


# ---- a broken server: what the bench must notice ----------------------------------------------------

SSE = "text/event-stream"


class BrokenHandler(BaseHTTPRequestHandler):
    """Answers by the request's API key ("Bearer <fault>"): each key is one way a server can be wrong."""

    def log_message(self, *args):
        pass

    def reply(self, status, body: bytes, content_type="application/json"):
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def error(self, status, message="boom", code=None, param=None):
        self.reply(status, json.dumps({"error": {"message": message, "code": code, "param": param}}).encode())

    def do_GET(self):
        if self.path == "/health":
            self.reply(503, b'{"status": "loading"}')
        elif self.path == "/metrics":
            self.reply(200, b'plugtune_requests_in_flight 1\nplugtune_num_requests_running 0\n'
                            b'plugtune_http_requests_total{path="/v1/chat/completions",status="500"} 3\n'
                            b'plugtune_http_requests_total{path="/v1/chat/completions",status="200"} 7\n'
                            b'plugtune_engine_errors_total 2\n', "text/plain")
        else:
            self.error(404)

    def do_POST(self):
        self.rfile.read(int(self.headers["Content-Length"]))
        fault = self.headers["Authorization"].removeprefix("Bearer ")
        if fault == "crash":
            self.error(500, "internal error")
        elif fault == "bare-crash":
            self.reply(500, b"Internal Server Error", "text/plain")
        elif fault == "full":
            self.error(429, "too many requests")
        elif fault == "lenient":  # accepts everything, even what it must refuse
            self.reply(200, json.dumps({"choices": [{"message": {"role": "assistant", "content": "hi"},
                                                     "finish_reason": "stop"}],
                                        "usage": {"completion_tokens": 1}}).encode())
        elif fault == "silent":  # a completion with no tokens and no finish reason
            self.reply(200, json.dumps({"choices": [{"message": {"content": "x"}, "finish_reason": None}],
                                        "usage": {"completion_tokens": 0}}).encode())
        elif fault == "cut":  # a stream that stops before its end ([DONE], a finish reason)
            self.reply(200, b'data: {"choices": [{"delta": {"content": "he"}, "finish_reason": null}]}\n\n', SSE)
        elif fault == "wrong-code":  # the right status for an unknown model, the wrong error code
            self.error(404, "no such model", code="not_found")
        else:  # a 400 naming max_tokens, whatever was asked
            self.error(400, "max_tokens is too large", param="max_tokens")


class BrokenServer:
    """What server_checks and load use of a StressServer: a url, a live process, /metrics and a log."""

    def __init__(self, bench, url):
        self.url, self.log = url, ["INFO: started\n", "Traceback (most recent call last):\n", "  boom\n"]
        self.proc = type("Alive", (), {"poll": staticmethod(lambda: None)})()
        self.metrics = lambda: bench.ServerProcess.metrics(self)


@pytest.fixture
def broken_server():
    server = ThreadingHTTPServer(("127.0.0.1", 0), BrokenHandler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_a_broken_server_is_reported(broken_server):
    import httpx

    bench = load_bench("serve_stress")
    ctx = {"models": ["base"], "prompts": ["hi"], "max_tokens": 4, "max_prompt_tokens": 8, "max_body_bytes": 4096}

    async def answers(cases):
        async with httpx.AsyncClient(base_url=broken_server, timeout=10) as client:
            return await asyncio.gather(*(bench.send(client, bench.build(kind, random.Random(0), {**ctx, "key": fault}),
                                                     10) for kind, fault in cases))

    cases = [("chat", "crash"), ("chat", "bare-crash"), ("chat", "full"), ("chat", "silent"),
             ("chat_stream", "cut"), ("chat", "refuse"), ("unknown_model", "lenient"), ("missing_messages", "crash"),
             ("unknown_model", "wrong-code"), ("max_tokens_over", "refuse"), ("chat", "lenient")]
    results = asyncio.run(answers(cases))
    assert [r["outcome"] for r in results] == [
        "5xx", "no_message", "429", "bad_result", "bad_result", "wrong_status", "wrong_status", "5xx",
        "wrong_status", "refused", "ok"]
    summary = bench.summarize(results, wall=2.0)
    kinds = summary["kinds"]
    assert {k: (v["n"], v["ok"], v["refused"], v["failed"]) for k, v in kinds.items() if v["n"]} == {
        "chat": (6, 1, 0, 5), "chat_stream": (1, 0, 0, 1), "unknown_model": (2, 0, 0, 2),
        "missing_messages": (1, 0, 0, 1), "max_tokens_over": (1, 0, 1, 0)}
    assert kinds["chat"]["failures"] == {"5xx": 1, "no_message": 1, "429": 1, "bad_result": 1, "wrong_status": 1}
    assert summary["good_requests_per_s"] == 0.5  # one good answer in 2 s: failures are not throughput

    metrics, checks, problems = bench.server_checks(BrokenServer(bench, broken_server), timeout=0.5)
    assert checks == {"exit_code": None, "drained": False, "health_status": 503, "server_5xx": 3,
                      "engine_errors": 2, "tracebacks": 1}
    assert [p.split(":")[0] for p in problems] == [
        "not drained after the load", "/health answered 503", "the server counted 5xx answers", "engine errors",
        "the server logged 1 traceback(s); the first"]


def test_rss_growth_is_read_from_the_samples():
    """RSS rising 2 MB/s over a 10 s load sampled every 0.5 s: warm-up ends at 1 s (102 MB), the end is 120 MB."""
    bench = load_bench("serve_stress")
    samples = [(100 + t / 2, 100 + t) for t in range(21)] + [(99.0, 500.0), (111.0, 500.0)]  # two outside the load
    rss = bench.rss_report(samples, 100.0, 110.0)
    assert rss == {"start": 100.0, "after_warmup": 102.0, "end": 120.0, "peak": 120.0, "growth_mb": 18.0,
                   "growth_pct": 17.65, "slope_mb_per_min": 120.0, "per_s": [100.0 + 2 * k for k in range(11)]}
