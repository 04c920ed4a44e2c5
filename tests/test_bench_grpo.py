"""bench/grpo_vs_trl.py: both engines get the same prompts in the same steps and the same reward, and the
benchmark runs end to end on a tiny model (it must not rot); no speed is asserted."""
import argparse
import json

import pytest

from tests.conftest import load_bench


def test_trl_reads_prompts_in_plugtune_rollout_order():
    from plugtune.config import RolloutConfig
    from plugtune.data.preference import PromptItem
    from plugtune.training.recipes.rollouts import RolloutSource

    bench = load_bench("grpo_vs_trl")
    n, per_step, group = 6, 2, 3
    source = RolloutSource([PromptItem([i], {"i": i}) for i in range(n)], None,
                           RolloutConfig(prompts_per_step=per_step, samples_per_prompt=group), None, None, seed=bench.SEED)
    order = bench.step_order(n)
    assert sorted(order) == list(range(n)) and order != list(range(n))  # a real permutation, every prompt once
    for step in range(n // per_step):
        plugtune_rows = [p.meta["i"] for p in source._prompts_of(step)]
        trl_rows = [i for i in order[step * per_step:(step + 1) * per_step] for _ in range(group)]  # RepeatSampler
        assert plugtune_rows == trl_rows


def test_trl_reward_wrapper_scores_like_plugtune():
    from plugtune.data.preference import PromptItem
    from plugtune.inference.verifiers import instructions_reward

    bench = load_bench("grpo_vs_trl")
    args = argparse.Namespace(prompts=bench.PROMPTS, prompts_per_step=2, warmup=1, steps=2)
    records = bench.prompt_records(args)
    assert len(records) == 6 and all(r["prompt"][0]["role"] == "user" for r in records)
    texts = ["hello world", "HELLO THERE", "* one\n* two", "yes, no", "", '{"tip": "drink"}']
    for r in records:
        ours = instructions_reward([PromptItem([1], {k: v for k, v in r.items() if k != "prompt"})] * len(texts), texts)
        theirs = bench.compliance([r["prompt"]] * len(texts), [[{"role": "assistant", "content": t}] for t in texts],
                                  [json.dumps(r["constraints"])] * len(texts), trainer_state=None)
        assert theirs == ours
    assert len({tuple(bench.compliance([None] * len(texts), texts, [json.dumps(r["constraints"])] * len(texts)))
                for r in records}) > 1  # the constraints matter (plain-text completions accepted too)


def test_grpo_bench_on_tiny_model(tiny_model_dir, tmp_path):
    pytest.importorskip("trl")
    pytest.importorskip("datasets")
    # Short prompts (the tiny tokenizer splits real ones into many tokens) whose reward does not depend on the
    # sampled completion: any text has >= 0 words (reward 1), none of 4 tokens says "zzqx" (reward 0).
    always, never = {"type": "min_words", "kwargs": {"n": 0}}, {"type": "keyword", "kwargs": {"word": "zzqx", "count": 1}}
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": p, "constraints": [c], "id": f"p{i}"}) + "\n" for i, (p, c) in
                               enumerate([("what is the date", always), ("hello world", never)])))
    out = tmp_path / "grpo.json"
    bench = load_bench("grpo_vs_trl")
    result = bench.main(["--model", str(tiny_model_dir), "--threads", "1", "--warmup", "1", "--steps", "1",
                         "--rounds", "1", "--group", "2", "--prompts-per-step", "1", "--max-new-tokens", "4",
                         "--prompts", str(prompts), "--out", str(out)])
    assert json.loads(out.read_text()) == json.loads(json.dumps(result))
    assert [r["engine"] for r in result["runs"]] == ["trl", "plugtune"]  # alternating, TRL first
    # Each step's reward is its prompt's (plugtune's seeded order, which TRL reads sequentially); a group whose
    # rewards are all equal has zero advantages, so the loss is 0 on both sides.
    expected = [1.0 if i == 0 else 0.0 for i in bench.step_order(2)]
    assert expected in ([1.0, 0.0], [0.0, 1.0])
    for run in result["runs"]:
        assert len(run["step_seconds"]) == 1 and run["s_per_step"] > 0 and run["peak_rss_mb"] > 100
        assert run["rewards"] == expected and run["reward_mean"] == expected[1], run["engine"]  # timed: step 1
        assert run["losses"] == pytest.approx([0.0, 0.0], abs=1e-9), run["engine"]
        assert len(run["completion_tokens"]) == 2 and all(1 <= n <= 4 for n in run["completion_tokens"])
        assert 2 in run["stop_ids"]  # <|im_end|> ends a completion on both sides
    trl_run = result["runs"][0]
    assert (trl_run["generation_batch_size"], trl_run["steps_per_generation"]) == (2, 1)  # one generation per step
    assert trl_run["activation_checkpointing"] is False and trl_run["dtype"] == "torch.float32"
    settings = result["settings"]
    assert settings["prompts"]["identical"] is True  # plugtune's prompt ids == TRL's apply_chat_template
    assert settings["completions_per_step"] == 2 and settings["max_new_tokens"] == 4
    assert settings["trl"]["bf16"] is False and settings["trl"]["gradient_checkpointing"] is False
    assert settings["loss_aggregation"] == {"trl": "dapo", "plugtune": "token_mean"}
