"""Files saved by plugtune before the package was split into layers (commit 25a25cf) still load.

tests/data/saved_before_layering/ was written by that commit's code on the tiny model that
`save_tiny_model_dir` builds (deterministic): a LoRA SFT run's step-1 checkpoint and its step-2 adapter,
a reward model (LoRA + head), and a multi-task pool with its router. The expected reward scores are the
ones that code printed for the same inputs. dates_train.jsonl is the dates skill's training file of that
commit (the shipped one has varied wording since), which the checkpoint was trained on.
"""
from __future__ import annotations

import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file

import plugtune
from plugtune.config import load_run_config
from plugtune.inference.reward_model import load_reward_model

SAVED = Path(__file__).parent / "data" / "saved_before_layering"


def test_old_checkpoint_resumes_to_the_old_adapter_exactly(tmp_path, tiny_model_dir):
    checkpoint = tmp_path / "old" / "step-0000001"
    shutil.copytree(SAVED / "sft_step1_checkpoint", checkpoint)
    cfg = load_run_config(None, [f"model.name={tiny_model_dir}", "training.batch_size=4", "training.progress=false",
                                 "data.max_length=96", "training.threads=1", f"output.dir={tmp_path / 'run'}",
                                 "training.max_steps=2", "training.save_every=1",
                                 f"data.train={SAVED / 'dates_train.jsonl'}", f"output.resume={checkpoint}"])
    report = plugtune.train(cfg)  # the old run used one thread: same reductions, same bits
    old = load_file(SAVED / "sft_step2_adapter" / "adapter_model.safetensors")
    new = load_file(Path(report.artifact) / "adapter_model.safetensors")
    assert old.keys() == new.keys()
    for k in old:
        torch.testing.assert_close(new[k], old[k], rtol=0, atol=0, msg=k)


def test_old_reward_model_scores_as_it_did(tiny_model_dir):
    scorer = load_reward_model(SAVED / "reward_model", str(tiny_model_dir))
    scores = scorer.score(["hi", "what day is it"], ["hello", "monday"])
    torch.testing.assert_close(scores, torch.tensor([-1.1652661561965942, -0.8593071103096008]), rtol=1e-5, atol=1e-5)


def test_old_multitask_pool_and_router_route_as_they_did(tiny_model_dir):
    pool = SAVED / "multitask_pool"
    lm = plugtune.load(str(tiny_model_dir), adapter={"dates": str(pool / "dates"), "units": str(pool / "units")},
                       router=str(pool / "router"))
    assert lm.adapters == ["dates", "units"]
    prompts = ["Rewrite this date in ISO format (YYYY-MM-DD): May 1, 2020", "Convert 3 km to m.",
               "What is the capital of France?"]
    assert lm.resolve(prompts, "auto") == ["dates", "units", None]  # what the old code decided
