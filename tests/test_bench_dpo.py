"""bench/dpo_vs_trl.py runs end to end on a tiny model (it must not rot): both engines train the same
pairs to the same loss, and the workload it reports is the pairs' own token counts; no speed is asserted."""
import json
import math

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
        assert len(run["losses"]) == 2 and run["losses"][0] == pytest.approx(math.log(2), abs=1e-4)  # LoRA B = 0
    # One update later both engines moved the loss by the same amount (about 7e-4 here; they differ by ~1e-5:
    # TRL also scores the newline after <|im_end|>), so they trained the same pairs the same way.
    trl_loss, our_loss = (run["losses"][1] for run in result["runs"])
    assert trl_loss < math.log(2) - 3e-4 and our_loss == pytest.approx(trl_loss, abs=5e-5)
    assert result["settings"]["trl"] == {"bf16": False, "gradient_checkpointing": False, "use_cpu": True,
                                         "padding_free": False}
    # The timed step's workload, counted from the pairs with transformers' own chat template and tokenizer.
    from transformers import AutoTokenizer

    from plugtune.data.batching import batch_indices

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    count = lambda messages, **kw: len(tok(tok.apply_chat_template(messages, tokenize=False, **kw),
                                           add_special_tokens=False)["input_ids"])
    rows = [json.loads(line) for line in pairs.read_text().splitlines()]
    real, scored, longest = 0, 0, 0
    for j in batch_indices(len(rows), 1, bench.PAIRS_PER_STEP, bench.SEED):  # step 1: the one after the warm-up
        prompt = count(rows[j]["prompt"], add_generation_prompt=True)
        for side in ("chosen", "rejected"):
            n = count(rows[j]["prompt"] + rows[j][side])
            real, scored, longest = real + n, scored + n - prompt - 1, max(longest, n)  # scored: reply + <|im_end|>
    assert result["workload_per_step"] == {"real_tokens": real, "padded_positions": 2 * bench.PAIRS_PER_STEP * longest,
                                           "completion_tokens": scored}
