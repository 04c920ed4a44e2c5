"""The real default model (SmolLM2-135M-Instruct from the packaged GGUF). Slow: minutes on 2 cores."""
import json

import pytest
import torch

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def default_model():
    from plugtune.models import load_base

    return load_base("smollm2-135m")


def test_conversion_facts(default_model):
    model, tok = default_model.model, default_model.tokenizer
    cfg = model.config
    assert (cfg.num_hidden_layers, cfg.hidden_size, cfg.vocab_size) == (30, 576, 49152)
    assert cfg.tie_word_embeddings and model.lm_head.weight is model.model.embed_tokens.weight
    assert getattr(cfg, "quantization_config", None) is None
    n = sum(p.numel() for p in model.parameters())
    assert 134_000_000 < n < 135_000_000
    assert (default_model.path / "model.safetensors").is_file()
    assert tok.eos_token == "<|im_end|>" and "<|im_start|>" in tok.chat_template


def test_chatml_masking_on_the_real_tokenizer(default_model):
    from plugtune.data import tokenize_example
    from plugtune.data.formats import normalise

    tok = default_model.tokenizer
    ex = normalise({"messages": [{"role": "user", "content": "Rewrite May 1, 2020"},
                                 {"role": "assistant", "content": "2020-05-01"}]}, "auto", "x")
    t = tokenize_example(tok, ex)
    supervised = tok.decode([i for i, lab in zip(t.input_ids, t.labels) if lab != -100])
    assert supervised == "2020-05-01<|im_end|>"


def test_demo_pipeline_few_steps(tmp_path, default_model):
    from plugtune.adapters import load_adapter
    from plugtune.data import load_examples
    from plugtune.demos.skill import run_demo
    from plugtune.evaluation import exact_match
    from plugtune.inference.generate import GenerationConfig
    from plugtune.models import load_base

    result = run_demo(skill="dates", out=str(tmp_path / "demo"), steps=3, n_test=8,
                      overrides=["training.progress=false", "data.eval_limit=8"])
    assert result["steps"] == 3 and result["test_examples"] == 8
    assert 0 < result["trainable_pct"] < 2 and result["adapter_mb"] > 0
    report = json.loads((tmp_path / "demo" / "demo_report.json").read_text())
    assert report["accuracy_before"] == result["accuracy_before"]
    # The saved adapter, reloaded onto a fresh base, answers the test prompts exactly as the trained
    # model did (same examples, same greedy settings as run_demo).
    fresh = load_base("smollm2-135m")
    load_adapter(fresh.model, result["adapter_dir"])
    test = load_examples("plugtune:skills/dates_test.jsonl")[:8]
    again = exact_match(fresh.model, fresh.tokenizer, test, GenerationConfig(max_new_tokens=24))
    assert [s["generated"] for s in again.samples[:4]] == [s["after"] for s in result["samples"]]
    assert again.accuracy == result["accuracy_after"]
