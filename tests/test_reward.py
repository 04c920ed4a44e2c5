"""Reward models on a tiny model: the objective is Bradley–Terry on the head's last-token scores,
LoRA training learns a toy preference, save -> load gives the same scores (alone or sharing a base
with another adapter), and `plugtune eval --reward-model` reports pairwise accuracy."""
import json

import pytest
import torch
from safetensors.torch import load_file
from torch.testing import assert_close

from plugtune.adapters import adapter_layers, adapter_state, attach_adapter
from plugtune.cli import main
from plugtune.config import RewardConfig, load_run_config
from plugtune.data.preference import TokenizedPair, collate_pairs, load_preferences, tokenize_preferences
from plugtune.models.causal_lm import hidden_states
from plugtune.models.heads import attach_head, last_token
from plugtune.models.loading import load_base
from plugtune.inference.reward_model import load_reward_model, pairwise_accuracy
from plugtune.training.recipes import reward_model as reward
from plugtune.training.engine.loop import evaluate, fit
from plugtune.training.compute.losses import bradley_terry_loss
from tests.test_dpo import edge_pairs, toy_pairs


@pytest.fixture
def toy_files(tmp_path):
    return toy_pairs(tmp_path / "train.jsonl", 64, 0), toy_pairs(tmp_path / "test.jsonl", 32, 1)


def run_config(model_dir, train, out, *extra, evalf=None):
    return load_run_config(None, [
        "objective=reward", f"model.name={model_dir}", f"data.train={train}", f"output.dir={out}",
        *([f"data.eval={evalf}"] if evalf else []), "training.batch_size=8", "training.max_steps=20",
        "training.schedule=constant", "training.lr=1e-2", "training.progress=false", "output.resume=never",
        "adapter.r=8", "adapter.alpha=16", *extra])


@pytest.mark.parametrize("center", [0.0, 0.05])
def test_objective_is_bradley_terry_on_last_token_scores(tiny_llama, center):
    torch.manual_seed(0)
    attach_adapter(tiny_llama, "lora", {"r": 4})
    attach_head(tiny_llama, reward.HEAD)
    items = [TokenizedPair(**{**vars(p), "margin": m}) for p, m in zip(edge_pairs(), (0.5, 0.0, 2.0))]
    batch = collate_pairs(items, pad_id=0)
    total, metrics = reward.RewardObjective(RewardConfig(center_rewards_coefficient=center))(tiny_llama, batch)
    with torch.no_grad():  # by hand: each row alone, its last token, the head
        scores = torch.stack([tiny_llama.reward_head(hidden_states(tiny_llama, ids[None, :n], torch.ones(1, n))[0, -1])
                              for ids, n in zip(batch["input_ids"], batch["attention_mask"].sum(-1).tolist())])
    losses, expected = bradley_terry_loss(scores[:3], scores[3:], torch.tensor([0.5, 0.0, 2.0]), center)
    assert_close(total, losses.sum(), rtol=1e-5, atol=1e-6)
    for key, value in expected.items():
        assert_close(metrics[key], value, rtol=1e-5, atol=1e-6, msg=key)
    no_margin, _ = reward.RewardObjective(RewardConfig())(tiny_llama, collate_pairs(edge_pairs(), 0))
    assert_close(no_margin, bradley_terry_loss(scores[:3], scores[3:])[0].sum(), rtol=1e-5, atol=1e-6)
    assert not torch.allclose(no_margin, total)  # the margins (and centring) change the loss
    total.backward()
    assert tiny_llama.reward_head.score.weight.grad.abs().sum() > 0


def test_lora_reward_model_learns_the_toy_preference(tmp_path, tiny_model_dir, toy_files):
    cfg = run_config(tiny_model_dir, toy_files[0], tmp_path / "run", evalf=toy_files[1])
    setup = reward.prepare(cfg, None)
    model = setup.loaded.model
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert {"reward_head.score.weight", "reward_head.score.bias"} <= trainable
    assert all("lora_" in n or n.startswith("reward_head.") for n in trainable)
    before = evaluate(model, setup.eval_batches, setup.objective, torch.device("cpu"))
    assert 0.2 <= before["eval_accuracy"] <= 0.7  # a random head: about chance on held-out pairs
    result = fit(model, setup.source, cfg.training, tmp_path / "run", setup.objective, setup.eval_batches,
                 resume="never")
    assert result.eval_metrics["eval_accuracy"] >= 0.9
    assert result.eval_metrics["eval_margin"] > before["eval_margin"] + 1.0
    assert result.eval_loss < 0.5 * before["eval_loss"]


@pytest.mark.parametrize("method", ["lora", "full"])
def test_saved_reward_model_loads_with_its_head_and_scores_the_same(tmp_path, tiny_model_dir, toy_files, method):
    from plugtune.training.run import train

    extra = ["method=full", "adapter={}", "training.lr=1e-3"] if method == "full" else []
    cfg = run_config(tiny_model_dir, toy_files[0], tmp_path / "run", "training.max_steps=3", *extra)
    out = tmp_path / "run" / "reward_model"
    loaded = load_base(str(tiny_model_dir), "float32", "cpu")
    report = train(cfg, loaded)
    assert report.artifact == str(out)
    files = {p.name for p in out.iterdir()}
    assert {"reward_head.safetensors", "reward_head.json"} <= files
    assert ({"adapter_config.json", "adapter_model.safetensors"} if method == "lora" else {"model.safetensors"}) <= files
    meta = json.loads((out / "reward_head.json").read_text())
    assert meta["hidden_size"] == 64 and meta["adapter"] == (method == "lora")
    if method == "full":  # a plain causal LM: the head is not in the model's weights
        assert not [k for k in load_file(str(out / "model.safetensors")) if "reward_head" in k]
    batch = collate_pairs([TokenizedPair(**vars(p)) for p in edge_pairs()], 0)
    expected = reward.RewardObjective(cfg.reward).scores(loaded.model.eval(), batch).detach()
    scorer = load_reward_model(out, None if method == "full" else str(tiny_model_dir), device="cpu")
    assert_close(scorer.score_ids(batch["input_ids"], batch["attention_mask"]), expected, rtol=1e-5, atol=1e-5)
    assert not any(p.requires_grad for p in scorer.model.parameters()) and not scorer.head.score.weight.requires_grad
    # text in, scores out: rendered exactly as the training pairs were
    pairs = load_preferences(toy_files[0])[:3]
    text = scorer.score([p.prompt for p in pairs], [p.chosen for p in pairs])
    ids = collate_pairs(tokenize_preferences(scorer.tokenizer, pairs, 512)[0], scorer.tokenizer.pad_token_id)
    assert_close(text, scorer.score_ids(ids["input_ids"], ids["attention_mask"])[:3], rtol=1e-5, atol=1e-5)


def test_reward_adapter_shares_a_base_with_another_adapter(tmp_path, tiny_model_dir, toy_files):
    from plugtune.training.run import train

    cfg = run_config(tiny_model_dir, toy_files[0], tmp_path / "run", "training.max_steps=3")
    train(cfg)
    path = tmp_path / "run" / "reward_model"
    alone = load_reward_model(path, str(tiny_model_dir), device="cpu")

    policy = load_base(str(tiny_model_dir), "float32", "cpu")
    torch.manual_seed(3)
    attach_adapter(policy.model, "lora", {"r": 4}, name="default")  # the policy's own, trainable adapter
    with torch.no_grad():
        for name, p in adapter_state(policy.model, "default").items():
            if "lora_B" in name:
                p.normal_(0, 0.3)
    attach_head(policy.model, "value_head", zero=True)  # e.g. PPO's critic: not part of the base
    policy.model.train()
    batch = collate_pairs([TokenizedPair(**vars(p)) for p in edge_pairs()], 0)
    logits_before = policy.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    trainable_before = {n for n, p in policy.model.named_parameters() if p.requires_grad}

    shared = load_reward_model(path, policy.model, tokenizer=policy.tokenizer, adapter_name="reward")
    assert_close(shared.score_ids(batch["input_ids"], batch["attention_mask"]),
                 alone.score_ids(batch["input_ids"], batch["attention_mask"]), rtol=1e-5, atol=1e-5)
    assert policy.model.training  # scoring restores the mode it found
    # the policy is untouched: same outputs, same trainable parameters, the reward adapter frozen and inactive
    logits_after = policy.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    assert torch.equal(logits_before, logits_after)
    assert {n for n, p in policy.model.named_parameters() if p.requires_grad} == trainable_before
    assert all("reward" not in layer.active_adapters for _, layer in adapter_layers(policy.model))
    pairs = load_preferences(toy_files[1])
    assert pairwise_accuracy(shared, pairs) == pairwise_accuracy(alone, pairs)


def test_generated_rows_are_scored_where_training_scored(tmp_path, tiny_model_dir, toy_files):
    """A rollout row stops at <|im_end|>; training rows end with the template's newline after it."""
    from plugtune.data.tokenize import prompt_ids
    from plugtune.training.run import train

    train(run_config(tiny_model_dir, toy_files[0], tmp_path / "run", "training.max_steps=3"))
    scorer = load_reward_model(tmp_path / "run" / "reward_model", str(tiny_model_dir))
    tok = scorer.tokenizer
    rendered = scorer.tokenize(["what is 3?"], ["the quick fox yes"])[0].input_ids
    generated = (prompt_ids(tok, [{"role": "user", "content": "what is 3?"}])
                 + tok("the quick fox yes", add_special_tokens=False)["input_ids"] + [tok.convert_tokens_to_ids("<|im_end|>")])
    assert rendered == generated + tok("\n", add_special_tokens=False)["input_ids"]
    ids = torch.tensor([generated + [0, 0], rendered + [0]])
    mask = torch.tensor([[1] * len(generated) + [0, 0], [1] * len(rendered) + [0]])
    scores = scorer.score_ids(ids, mask)
    assert_close(scores[0], scores[1])
    assert_close(scores, scorer.score(["what is 3?"] * 2, ["the quick fox yes"] * 2))
    assert not torch.allclose(scorer.score_ids(ids, mask, complete_turns=False)[0], scores[0])


def test_eval_cli_reports_pairwise_accuracy(tmp_path, tiny_model_dir, toy_files, capsys):
    assert main(["train", "reward", f"model.name={tiny_model_dir}", f"data.train={toy_files[0]}", "data.eval=",
                 f"output.dir={tmp_path / 'run'}", "training.max_steps=20", "training.lr=1e-2", "training.batch_size=8",
                 "training.warmup_steps=0", "training.schedule=constant", "training.progress=false"]) == 0
    capsys.readouterr()
    path = tmp_path / "run" / "reward_model"
    assert main(["eval", "--model", str(tiny_model_dir), "--reward-model", str(path), "--data", str(toy_files[1])]) == 0
    result = json.loads(capsys.readouterr().out)
    expected = pairwise_accuracy(load_reward_model(path, str(tiny_model_dir)), load_preferences(toy_files[1]))
    assert result["pairs"] == 32 and result["pairwise_accuracy"] == expected["pairwise_accuracy"] >= 0.9
    assert result["mean_margin"] == pytest.approx(expected["mean_margin"])
    assert main(["eval", "--reward-model", str(tmp_path), "--data", str(toy_files[1])]) == 2  # not a reward model
    assert "not a reward model directory" in capsys.readouterr().err
