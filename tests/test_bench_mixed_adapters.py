"""bench/mixed_adapters.py runs end to end on a tiny model (it must not rot); no speed is asserted."""
import json

import torch

from tests.conftest import load_bench


def test_mixed_adapters_bench_on_tiny_model(tiny_model_dir, tmp_path):
    out = tmp_path / "mixed.json"
    threads = torch.get_num_threads()
    try:
        result = load_bench("mixed_adapters").main(["--model", str(tiny_model_dir), "--threads", "1", "--repeats", "1",
                                    "--prompts", "2", "--new-tokens", "4", "--adapters", "2",
                                    "--train-rows", "1", "--train-steps", "1", "--out", str(out)])
    finally:
        torch.set_num_threads(threads)
    assert json.loads(out.read_text()) == json.loads(json.dumps(result))
    rows = {r["case"]: r for r in result["rows"]}
    assert list(rows) == ["base", "plugtune mixed 1", "plugtune mixed 2", "peft mixed 1", "peft mixed 2",
                          "plugtune merged 1"]
    for r in rows.values():
        assert len(r["seconds"]) == 1 and r["tokens_per_s"] > 0
        assert r["tokens_per_s"] == 2 * 4 / r["median_s"]
        assert r["new_tokens_per_row"] == [4]  # stop_ids=[] / no end token: every row decodes exactly 4
    assert rows["base"]["ratio_to_base"] == 1.0
    assert rows["plugtune mixed 2"]["distinct_adapters"] == 2
    # PEFT loaded plugtune's saved files and decodes the same greedy tokens; merging equals the mixed path.
    assert result["tokens_agree"] is True
    assert result["agreement"]["plugtune merged 1 vs mixed 1"]["rows_identical"] == 2
    mem = result["memory"]
    assert mem["pool_params_mb"] == mem["base_params_mb"] + mem["adapters_params_mb_all"]
    assert mem["adapters_params_mb_all"] == 2 * mem["adapter_params_mb_each"]
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
