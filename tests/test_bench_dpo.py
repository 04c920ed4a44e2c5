"""bench/dpo_vs_trl.py runs end to end on a tiny model (it must not rot); no speed is asserted."""
import json

import pytest

from tests.conftest import load_bench


def test_dpo_bench_on_tiny_model(tiny_model_dir, tmp_path):
    pytest.importorskip("trl")
    pytest.importorskip("datasets")
    pairs = tmp_path / "pairs.jsonl"  # short pairs: the tiny tokenizer splits real chat into many tokens
    pairs.write_text("".join(json.dumps({"prompt": [{"role": "user", "content": f"what is {w}"}],
                                         "chosen": [{"role": "assistant", "content": f"the {w} fox"}],
                                         "rejected": [{"role": "assistant", "content": f"hello {w}"}]}) + "\n"
                             for w in ("quick", "lazy dog", "brown", "date", "world", "answer")))
    out = tmp_path / "dpo.json"
    bench = load_bench("dpo_vs_trl")
    result = bench.main(["--model", str(tiny_model_dir), "--threads", "1", "--warmup", "1", "--steps", "1",
                         "--rounds", "1", "--pairs", str(pairs), "--out", str(out)])
    assert json.loads(out.read_text()) == json.loads(json.dumps(result))
    assert [r["engine"] for r in result["runs"]] == ["trl", "plugtune"]  # alternating, TRL first
    for run in result["runs"]:
        assert len(run["step_seconds"]) == 1 and run["s_per_step"] > 0 and run["peak_rss_mb"] > 100
        assert len(run["losses"]) == 2 and run["losses"][0] == pytest.approx(0.693147, abs=1e-4)  # LoRA B = 0
    s = result["summary"]
    assert s["speedup_steps_per_s"] == pytest.approx(s["trl"]["s_per_step"] / s["plugtune"]["s_per_step"])
    assert s["peak_rss_ratio"] == pytest.approx(s["plugtune"]["peak_rss_mb"] / s["trl"]["peak_rss_mb"])
    assert result["settings"]["trl"] == {"bf16": False, "gradient_checkpointing": False, "use_cpu": True,
                                         "padding_free": False}
    assert result["workload_per_step"]["real_tokens"] <= result["workload_per_step"]["padded_positions"]
