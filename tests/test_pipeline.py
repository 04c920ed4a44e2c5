"""Staged runs (training/pipeline.py) and rejection sampling (inference/rejection_sampling.py) on the
tiny model: a 3-stage pipeline end to end, killed and resumed; the sampler's files obey the verifier;
each stage's reference policy is the previous stage's policy; bad pipelines get errors naming the stage."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from plugtune.adapters import load_adapter
from plugtune.adapters.layers import adapters_disabled, adapters_only
from plugtune.config import ConfigError, load_run_config
from plugtune.data.preference import PromptItem, collate_pairs, load_preferences, tokenize_preferences
from plugtune.inference.rejection_sampling import SampleConfig, sample_and_verify
from plugtune.models.loading import load_base
from plugtune.training import pipeline
from plugtune.training.compute.reference import Reference
from plugtune.training.compute.token_logps import token_logps
from plugtune.training.recipes import dpo
from plugtune.training.recipes.dpo import sequence_logps


def length_score(prompts: list[PromptItem], completions: list[str]) -> list[float]:
    """A verifier for the tests: 0, 1 or 2 by the answer's length (deterministic, spread over samples)."""
    return [float(len(c) % 3) for c in completions]


def not_numbers(prompts, completions):
    return ["good"] * len(completions)


@pytest.fixture
def prompts_file(tmp_path):
    path = tmp_path / "prompts.jsonl"
    rows = [{"prompt": f"Tell me about item {i}.", "id": i} for i in range(12)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def spec(tiny_model_dir, prompts_file, out, **sft_training):
    sample = {"prompts": str(prompts_file), "k": 4, "max_new_tokens": 8, "verifier": "tests.test_pipeline:length_score",
              "pass_score": 2.0, "min_margin": 1.0, "temperature": 1.0, "top_p": 1.0, "batch_size": 6}
    return {
        "model": {"name": str(tiny_model_dir)},
        "method": "lora", "adapter": {"r": 4, "alpha": 8},
        "data": {"max_length": 64},
        "training": {"batch_size": 2, "progress": False, "lr": 1e-2, "threads": 1},
        "output": {"dir": str(out)},
        "stages": [
            {"name": "sample", "sample": sample},
            {"name": "sft", "objective": "sft", "data": {"train": "@sample/sft.jsonl"},
             "training": {"max_steps": 2, **sft_training}},
            {"name": "dpo", "objective": "dpo", "data": {"train": "@sample/pairs.jsonl"}, "training": {"max_steps": 2}},
        ],
    }


def test_three_stage_pipeline_runs_resumes_and_refuses_a_changed_stage(tmp_path, tiny_model_dir, prompts_file,
                                                                         monkeypatch):
    out = tmp_path / "pipe"
    real_train = pipeline.train
    calls = []

    def killed_in_dpo(cfg, *a, **kw):
        calls.append(cfg.objective)
        if cfg.objective == "dpo":
            raise KeyboardInterrupt  # the process is killed during the third stage
        return real_train(cfg, *a, **kw)

    monkeypatch.setattr(pipeline, "train", killed_in_dpo)
    with pytest.raises(KeyboardInterrupt):
        pipeline.run_pipeline(spec(tiny_model_dir, prompts_file, out))
    sft_adapter = out / "02-sft" / "adapter" / "adapter_model.safetensors"
    written = sft_adapter.stat().st_mtime_ns
    assert calls == ["sft", "dpo"]

    calls.clear()
    monkeypatch.setattr(pipeline, "train", lambda cfg, *a, **kw: calls.append(cfg.objective) or real_train(cfg, *a, **kw))
    report = pipeline.run_pipeline(spec(tiny_model_dir, prompts_file, out))
    assert calls == ["dpo"] and report.skipped == ["sample", "sft"]  # finished stages are not run again
    assert sft_adapter.stat().st_mtime_ns == written
    assert [r.kind for r in report.stages] == ["sample", "sft", "dpo"]
    assert (out / "03-dpo" / "adapter" / "adapter_model.safetensors").is_file()
    summary = json.loads((out / "pipeline_summary.json").read_text())
    assert [s["name"] for s in summary["stages"]] == ["sample", "sft", "dpo"]
    assert all(s["seconds"] > 0 and s["peak_memory_mb"] > 0 for s in summary["stages"])
    assert "| dpo | dpo |" in (out / "pipeline_summary.md").read_text()
    assert (out / "pipeline_summary.png").stat().st_size > 1000

    with pytest.raises(ConfigError, match="stage 'sft' finished in an earlier run .* output.overwrite"):
        pipeline.run_pipeline(spec(tiny_model_dir, prompts_file, out, lr=5e-3))
    calls.clear()
    changed = spec(tiny_model_dir, prompts_file, out, lr=5e-3)
    changed["output"]["overwrite"] = True
    report = pipeline.run_pipeline(changed)
    assert calls == ["sft", "dpo"] and report.skipped == ["sample"]  # the changed stage and every later one


def test_sampler_files_obey_the_verifier(tmp_path, tiny_model_dir, prompts_file):
    loaded = load_base(str(tiny_model_dir))
    cfg = SampleConfig(prompts=str(prompts_file), k=4, max_new_tokens=8, verifier="tests.test_pipeline:length_score",
                       pass_score=2.0, min_margin=1.0, top_p=1.0, batch_size=5)
    report = sample_and_verify(loaded.model, loaded.tokenizer, cfg, tmp_path)
    samples = [json.loads(l) for l in (tmp_path / "samples.jsonl").read_text().splitlines()]
    sft = [json.loads(l) for l in (tmp_path / "sft.jsonl").read_text().splitlines()]
    pairs = [json.loads(l) for l in (tmp_path / "pairs.jsonl").read_text().splitlines()]
    assert len(samples) == 12 * 4 == report.samples
    assert all(s["score"] == len(s["answer"]) % 3 for s in samples)  # the verifier's own scores are kept
    assert report.passing_samples == sum(s["score"] >= 2 for s in samples)
    assert len(sft) == report.prompts_with_a_pass > 0
    for example in sft:  # the best passing answer of its prompt
        answer = example["messages"][-1]["content"]
        assert len(answer) % 3 == 2 and example["score"] == 2.0
    assert pairs and len(pairs) == report.pairs
    for pair in pairs:  # best vs worst, by at least the margin, as the verifier scores them
        chosen, rejected = pair["chosen"][0]["content"], pair["rejected"][0]["content"]
        assert pair["chosen_score"] == len(chosen) % 3 and pair["rejected_score"] == len(rejected) % 3
        assert pair["chosen_score"] - pair["rejected_score"] >= 1.0
        group = [s["score"] for s in samples if s["prompt"] == pair["prompt"]]
        assert pair["chosen_score"] == max(group) and pair["rejected_score"] == min(group)
    assert load_preferences(tmp_path / "pairs.jsonl")  # the pairs file is valid DPO data
    assert report.never_passed_by_type.get("(untyped)", 0) == 12 - report.prompts_with_a_pass


def test_each_stage_references_the_previous_stage_policy(tmp_path, tiny_model_dir, prompts_file):
    """The DPO / GRPO reference after SFT is the SFT adapter (by log-probs), not the raw base."""
    out = tmp_path / "pipe"
    pipeline.run_pipeline({**spec(tiny_model_dir, prompts_file, out), "stages": spec(tiny_model_dir, prompts_file, out)["stages"][:2]})
    sft_dir = out / "02-sft" / "adapter"
    pairs_file = out / "01-sample" / "pairs.jsonl"
    cfg = load_run_config(None, [f"model.name={tiny_model_dir}", "objective=dpo", f"data.train={pairs_file}",
                                 f"model.adapter={sft_dir}", "adapter.r=4", "data.max_length=64",
                                 f"output.dir={tmp_path / 'dpo'}"])
    setup = dpo.prepare(cfg)
    model = setup.loaded.model
    batch = setup.source.batches(0, model)[0]
    sft_alone = load_base(str(tiny_model_dir)).model
    load_adapter(sft_alone, sft_dir, "sft")
    expected = sequence_logps(sft_alone, batch, None)[0]
    with torch.no_grad():
        torch.testing.assert_close(setup.objective.reference_logps(model, batch), expected, rtol=1e-5, atol=1e-5)
        with adapters_disabled(model):
            base = sequence_logps(model, batch, None)[0]
    assert not torch.allclose(base, expected, atol=1e-3)  # the SFT stage moved the policy: the base is not it
    reference = Reference(model, full_finetune=False, adapter="reference")  # what GRPO/PPO use
    rollout = {k: v for k, v in batch.items() if k in ("input_ids", "attention_mask", "labels")}
    with torch.no_grad():
        torch.testing.assert_close(reference.logps(model, rollout).sums,
                                   token_logps(sft_alone, rollout).sums, rtol=1e-5, atol=1e-5)
        with adapters_only(model, "default"):  # the policy starts as the SFT adapter too
            torch.testing.assert_close(token_logps(model, rollout).sums, token_logps(sft_alone, rollout).sums,
                                       rtol=1e-5, atol=1e-5)


def test_bad_pipelines_name_the_stage_and_the_fix(tmp_path, tiny_model_dir, prompts_file):
    good = spec(tiny_model_dir, prompts_file, tmp_path / "p")

    def with_stages(*stages):
        return {**good, "stages": list(stages)}

    sample, sft, dpo_stage = good["stages"]
    with pytest.raises(ConfigError, match="stage 'dpo' reads data.train=@sample/pairs.jsonl, but stage 'sample' runs later"):
        pipeline.parse_pipeline(with_stages({**sft, "data": {"train": str(prompts_file)}}, dpo_stage, sample))
    with pytest.raises(ConfigError, match="stage 'dpo' \\(dpo\\) has no data.train"):
        pipeline.parse_pipeline(with_stages(sample, {"name": "dpo", "objective": "dpo"}))
    with pytest.raises(ConfigError, match="'nope' is not a stage of this pipeline"):
        pipeline.parse_pipeline(with_stages(sample, {**sft, "data": {"train": "@nope/sft.jsonl"}}))
    with pytest.raises(ConfigError, match="starts from 'sample', which is not an earlier sft"):
        pipeline.parse_pipeline(with_stages(sample, {**sft, "from": "sample"}))
    with pytest.raises(FileNotFoundError, match="stage 'sft': data.train=.*missing.jsonl does not exist"):
        pipeline.run_pipeline(with_stages({**sft, "data": {"train": str(tmp_path / "missing.jsonl")}}))
    one = {**sample, "sample": {**sample["sample"], "k": 1}}
    with pytest.raises(ConfigError, match="stage 'sample': sample.k=1: a preference pair needs two"):
        pipeline.run_pipeline(with_stages(one))
    broken = {**sample, "sample": {**sample["sample"], "verifier": "tests.test_pipeline:missing"}}
    with pytest.raises(ValueError, match="stage 'sample': reward function 'tests.test_pipeline:missing' could not be"):
        pipeline.run_pipeline({**with_stages(broken), "output": {"dir": str(tmp_path / "q")}})
    words = {**sample, "sample": {**sample["sample"], "verifier": "tests.test_pipeline:not_numbers"}}
    with pytest.raises(ValueError, match="stage 'sample': reward function not_numbers returned 'good'.*a number"):
        pipeline.run_pipeline({**with_stages(words), "output": {"dir": str(tmp_path / "r")}})
    assert not (tmp_path / "p" / "02-sft").exists()  # nothing was trained by a refused pipeline
