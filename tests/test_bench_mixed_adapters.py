"""bench/mixed_adapters.py runs end to end on a tiny model (it must not rot): a case made slower shows up
in its timings, and its parameter memory is the model's and the adapters' own size; no speed is asserted."""
import json
import time

import pytest
import torch

from tests.conftest import load_bench


SLOW = 0.5  # seconds added to every PEFT generate call; a tiny-model call itself takes milliseconds


def test_mixed_adapters_bench_on_tiny_model(tiny_model_dir, tmp_path):
    out = tmp_path / "mixed.json"
    bench = load_bench("mixed_adapters")
    peft_generate = bench.peft_generate

    def slow_peft_generate(*args, **kwargs):
        time.sleep(SLOW)
        return peft_generate(*args, **kwargs)

    bench.peft_generate = slow_peft_generate  # the module's global, which the bench's PEFT cases call
    threads = torch.get_num_threads()
    try:
        result = bench.main(["--model", str(tiny_model_dir), "--threads", "1", "--repeats", "1",
                             "--prompts", "2", "--new-tokens", "4", "--adapters", "2",
                             "--train-rows", "1", "--train-steps", "1", "--out", str(out)])
    finally:
        torch.set_num_threads(threads)
    assert json.loads(out.read_text()) == json.loads(json.dumps(result))
    rows = {r["case"]: r for r in result["rows"]}
    assert list(rows) == ["base", "plugtune mixed 1", "plugtune mixed 2", "peft mixed 1", "peft mixed 2",
                          "plugtune merged 1"]
    for case, r in rows.items():
        assert len(r["seconds"]) == 1
        assert r["new_tokens_per_row"] == [4]  # stop_ids=[] / no end token: every row decodes exactly 4
        # The slowed cases, and only they, take SLOW seconds and report at most 2 x 4 tokens per SLOW seconds.
        slowed = case.startswith("peft")
        assert (r["seconds"][0] >= SLOW) == slowed and (r["tokens_per_s"] <= 2 * 4 / SLOW) == slowed, (case, r)
        assert not slowed or r["ratio_to_base"] < 1  # slower than the (unslowed) base
    assert rows["plugtune mixed 2"]["distinct_adapters"] == 2
    # PEFT loaded plugtune's saved files and decodes the same greedy tokens; merging equals the mixed path.
    assert result["tokens_agree"] is True
    assert result["agreement"]["plugtune merged 1 vs mixed 1"]["rows_identical"] == 2
    # Parameter memory, counted by transformers and PEFT: the fp32 base, and a LoRA r 8 (the bench's
    # default) on q/k/v/o, twice.
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    base_mb = sum(p.numel() for p in hf.parameters()) * 4 / 2**20
    lora = get_peft_model(hf, LoraConfig(r=8, lora_alpha=16, target_modules=bench.TARGETS))
    adapter_mb = sum(p.numel() for n, p in lora.named_parameters() if "lora_" in n) * 4 / 2**20
    mem = result["memory"]
    assert mem["base_params_mb"] == pytest.approx(base_mb) and mem["adapter_params_mb_each"] == pytest.approx(adapter_mb)
    assert mem["pool_params_mb"] == pytest.approx(base_mb + 2 * adapter_mb)
    assert mem["peak_rss_mb"] >= mem["rss_after_generation_mb"]
    training = result["training"]
    assert training["adapters"] == ["a0", "a1"] and training["mixed_batch_shape"][0] == 2
    assert training["mixed_step_s_median"] > 0 and training["sequential_steps_s_median"] > 0
    assert result["settings"]["threads"] == 1 and result["settings"]["prompt_lengths"][0] > 0


def test_bench_adapters_are_nonzero_and_reach_the_requested_size(tiny_llama, tmp_path):
    from plugtune.adapters.layers import adapter_layers

    dirs = load_bench("mixed_adapters").make_adapters(tiny_llama, 2, 4, 0.1, 0, tmp_path)
    assert [d.name for d in dirs] == ["a0", "a1"] and all((d / "adapter_model.safetensors").is_file() for d in dirs)
    layers = [layer for _, layer in adapter_layers(tiny_llama)]
    assert len(layers) == 2 * 4  # q/k/v/o in 2 layers
    with torch.no_grad():
        for layer in layers:
            w = layer.weight_out_in().norm()
            for name in ("a0", "a1"):
                torch.testing.assert_close(layer.delta_weight(name).norm() / w, torch.tensor(0.1))
            assert not torch.equal(layer.lora_B["a0"].weight, layer.lora_B["a1"].weight)
        assert all(layer.active_adapters == [] for layer in layers)
