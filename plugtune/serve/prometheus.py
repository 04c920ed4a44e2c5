"""GET /metrics: the engine's and the HTTP layer's counters in Prometheus text format 0.0.4
(no client library needed: `# HELP`, `# TYPE`, then `name{label="v"} value` lines)."""
from __future__ import annotations

from plugtune.serve.engine import Engine


def _escape(value) -> str:
    return str(value).replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _family(lines: list[str], name: str, kind: str, text: str, samples) -> None:
    lines += [f"# HELP {name} {text}", f"# TYPE {name} {kind}"]
    for labels, value in samples:
        tag = ",".join(f'{k}="{_escape(v)}"' for k, v in labels.items())
        lines.append(f"{name}{{{tag}}} {value}" if tag else f"{name} {value}")


def render(engine: Engine, base: str, http: dict, adapters: int, in_flight: int) -> str:
    """`http` maps (path, status) -> count; `base` labels rows without an adapter."""
    st = engine.stats
    label = (lambda a: base if a is None else a)
    lines: list[str] = []
    fam = (lambda *a: _family(lines, *a))
    fam("plugtune_http_requests_total", "counter", "HTTP requests answered, by path and status.",
        [({"path": p, "status": s}, n) for (p, s), n in sorted(http.items())])
    fam("plugtune_requests_in_flight", "gauge", "Generation requests being served now (limit: --max-concurrent).",
        [({}, in_flight)])
    fam("plugtune_requests_total", "counter", "Sequences admitted into the batch.", [({}, st.requests)])
    fam("plugtune_requests_finished_total", "counter", "Sequences finished, by model and reason.",
        [({"model": label(a), "reason": r}, n) for (a, r), n in sorted(st.finished.items(), key=str)])
    fam("plugtune_prompt_tokens_total", "counter", "Prompt tokens prefilled.", [({}, st.prompt_tokens)])
    fam("plugtune_generation_tokens_total", "counter", "Tokens generated, by model.",
        [({"model": label(a)}, n) for a, n in sorted(st.generation_tokens.items(), key=str)])
    fam("plugtune_num_requests_running", "gauge", "Sequences in the running batch.", [({}, engine.num_running)])
    fam("plugtune_num_requests_waiting", "gauge", "Sequences queued for a batch slot.", [({}, engine.num_waiting)])
    fam("plugtune_batch_size", "gauge", "Rows in the latest decode step.", [({}, st.batch_size)])
    fam("plugtune_batch_size_max", "gauge", "Most rows in one decode step so far.", [({}, st.max_batch_size)])
    fam("plugtune_adapters_per_step_max", "gauge",
        "Most distinct adapters (the base counts as one) decoded together in one step.",
        [({}, st.max_adapters_per_step)])
    fam("plugtune_decode_steps_total", "counter", "Decode steps run.", [({}, st.decode_steps)])
    fam("plugtune_decode_rows_total", "counter", "Rows decoded, summed over steps.", [({}, st.decode_rows)])
    fam("plugtune_prefill_batches_total", "counter", "Prefill forward passes (newcomers prefilled together).",
        [({}, st.prefill_batches)])
    fam("plugtune_prefill_joins_total", "counter", "Prefills admitted while other rows were decoding.",
        [({}, st.joins)])
    fam("plugtune_engine_errors_total", "counter", "Engine steps that failed.", [({}, st.errors)])
    fam("plugtune_adapters_loaded", "gauge", "Adapters loaded.", [({}, adapters)])
    return "\n".join(lines) + "\n"


def parse(text: str) -> dict[str, float]:
    """`name{labels}` -> value, for tests and the benchmark."""
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            key, _, value = line.rpartition(" ")
            out[key] = float(value)
    return out
