"""bench/serve_stress.py against the tiny model for a few seconds: a real `plugtune serve`
subprocess on loopback under good, cancelled and bad requests from concurrent clients."""
import json

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
    assert rss["after_warmup"] > 0 and rss["growth_mb"] == round(rss["end"] - rss["after_warmup"], 1)
    assert len(rss["per_s"]) >= 3
    assert rss["growth_mb"] < 64  # generous: a few seconds on a tiny model prove flatness of nothing
