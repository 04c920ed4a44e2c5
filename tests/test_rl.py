"""PPO and GRPO on the one loop: they raise the mean reward of a toy task on a tiny model (and would
fail if learning did not happen), rollouts resume exactly, the reference is the base, errors are clear."""
import json

import pytest
import torch

import plugtune
from plugtune.config import ConfigError, load_run_config
from plugtune.inference.verifiers import REWARD_FUNCTIONS, resolve_reward_function
from plugtune.training.recipes.rollouts import make_scorer

PROMPTS = ["hello world", "what is the answer", "convert date", "the quick brown fox", "question", "tell me",
           "say something", "answer now"]


def vowel_share(prompts, completions):
    """Toy reward: the share of vowels among the completion's characters (about 0.2 for the random tiny model)."""
    return [sum(c in "aeiou" for c in t) / max(len(t), 1) for t in completions]


@pytest.fixture
def prompts_file(tmp_path):
    path = tmp_path / "prompts.jsonl"
    path.write_text("".join(json.dumps({"prompt": p, "id": i}) + "\n" for i, p in enumerate(PROMPTS)))
    return path


def rl_config(objective, model_dir, prompts_file, out, steps, *extra):
    # LoRA reaches the LM head: the tiny model's final norm bounds what the other layers can change.
    return load_run_config(None, [
        f"objective={objective}", f"model.name={model_dir}", f"data.train={prompts_file}", f"output.dir={out}",
        f"training.max_steps={steps}", "training.lr=2e-2", "training.warmup_steps=0", "training.schedule=constant",
        "training.progress=false", "output.resume=never", "adapter.r=8",
        "adapter.target_modules=[q_proj,v_proj,down_proj,lm_head]", "rollout.prompts_per_step=4",
        "rollout.samples_per_prompt=4", "rollout.max_new_tokens=8", "rollout.reward_functions=[vowels]", *extra])


def rewards(out):
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [r["reward"] for r in lines if r["kind"] == "train"]


@pytest.fixture(autouse=True)
def toy_reward(monkeypatch):
    monkeypatch.setitem(REWARD_FUNCTIONS, "vowels", vowel_share)


def test_grpo_raises_the_mean_reward(tmp_path, tiny_model_dir, prompts_file):
    plugtune.train(rl_config("grpo", tiny_model_dir, prompts_file, tmp_path / "grpo", 15))
    got = rewards(tmp_path / "grpo")
    assert sum(got[-3:]) / 3 > sum(got[:3]) / 3 + 0.15, got


def test_ppo_raises_the_mean_reward(tmp_path, tiny_model_dir, prompts_file):
    plugtune.train(rl_config("ppo", tiny_model_dir, prompts_file, tmp_path / "ppo", 30, "ppo.kl_coef=0.01"))
    got = rewards(tmp_path / "ppo")
    assert sum(got[-3:]) / 3 > sum(got[:3]) / 3 + 0.15, got
    log = [json.loads(line) for line in (tmp_path / "ppo" / "metrics.jsonl").read_text().splitlines()]
    assert {"clip_fraction", "value_loss", "kl_to_ref", "kl_coef", "rollout/completion_tokens"} <= set(log[-1])


@pytest.mark.parametrize("objective,extra", [
    ("grpo", ["rollout.epochs=2", "rollout.minibatches=2", "grpo.beta=0.04", "grpo.clip_high=0.28",
              "grpo.loss_aggregation=token_mean"]),
    ("ppo", ["rollout.epochs=2", "rollout.minibatches=2", "ppo.adaptive_kl=true"]),
])
def test_resume_mid_rollout_is_exact(tmp_path, tiny_model_dir, prompts_file, objective, extra):
    from plugtune.training.recipes import rollouts

    settings = ["training.save_every=3", *extra]
    full = plugtune.train(rl_config(objective, tiny_model_dir, prompts_file, tmp_path / "full", 6, *settings))
    crash_dir = tmp_path / "crash"
    original = rollouts.RolloutSource.batches

    def crash_at_step_5(self, step, model):
        if step == 4:
            raise KeyboardInterrupt("simulated crash")
        return original(self, step, model)

    rollouts.RolloutSource.batches = crash_at_step_5
    try:
        with pytest.raises(KeyboardInterrupt):
            plugtune.train(rl_config(objective, tiny_model_dir, prompts_file, crash_dir, 6, *settings))
    finally:
        rollouts.RolloutSource.batches = original
    resumed = plugtune.train(rl_config(objective, tiny_model_dir, prompts_file, crash_dir, 6, *settings,
                                       "output.resume=auto"))
    assert rewards(crash_dir) == pytest.approx(rewards(tmp_path / "full"))  # step 4 resumes inside rollout 1
    a = (tmp_path / "full" / "adapter" / "adapter_model.safetensors").read_bytes()
    assert (crash_dir / "adapter" / "adapter_model.safetensors").read_bytes() == a
    assert full.steps == resumed.steps == 6


def test_reference_is_the_base_with_adapters_off(tiny_llama):
    from plugtune.adapters import adapter_state, attach_adapter
    from plugtune.models.tiny import build_model
    from plugtune.training.compute.token_logps import token_logps
    from plugtune.training.compute.reference import Reference
    from tests.conftest import random_batch

    plain = build_model("llama", 400)
    attach_adapter(tiny_llama, "lora", {"r": 4})
    with torch.no_grad():
        for p in adapter_state(tiny_llama, "default").values():
            p.add_(torch.randn_like(p) * 0.3)
    batch = random_batch(400)
    ref = Reference(tiny_llama, full_finetune=False).logps(tiny_llama, batch).per_token
    torch.testing.assert_close(ref, token_logps(plain, batch).per_token)
    assert not torch.allclose(ref, token_logps(tiny_llama, batch).per_token)
    frozen = Reference(plain, full_finetune=True)
    with torch.no_grad():
        for p in plain.parameters():
            p.mul_(1.5)  # training changes the policy; the frozen copy keeps the start
    torch.testing.assert_close(frozen.logps(plain, batch).per_token, token_logps(build_model("llama", 400), batch).per_token)


def test_reward_functions_and_config_errors(prompts_file):
    assert resolve_reward_function("tests.test_rl:vowel_share") is vowel_share
    with pytest.raises(ValueError, match="unknown reward function 'nope'"):
        resolve_reward_function("nope")
    with pytest.raises(ValueError, match="could not be imported"):
        resolve_reward_function("tests.test_rl:missing")
    scorer = make_scorer([lambda p, c: [1.0]])
    with pytest.raises(ValueError, match="returned 1 values for 2 completions"):
        scorer([None, None], ["a", "b"], {})
    with pytest.raises(ConfigError, match="needs a reward"):
        load_run_config(None, ["objective=ppo", f"data.train={prompts_file}"])
    with pytest.raises(ConfigError, match="samples_per_prompt >= 2"):
        load_run_config(None, ["objective=grpo", f"data.train={prompts_file}", "rollout.reward_functions=[x]"])
    with pytest.raises(ConfigError, match="must divide the rollout batch"):
        load_run_config(None, ["objective=grpo", "rollout.reward_functions=[x]", "rollout.samples_per_prompt=3",
                               "rollout.prompts_per_step=3", "rollout.minibatches=2"])
