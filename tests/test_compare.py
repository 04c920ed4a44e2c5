"""plugtune compare: the shipped config validates; a tiny comparison runs end to end and its report
agrees with what the runs wrote and with numbers recomputed independently; config errors are clear."""
import argparse
import json
import random
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from plugtune.compare.config import load_compare_config, shipped_compare_configs
from plugtune.compare.jobs import perturb
from plugtune.compare.runner import add_compare_parser, run_compare
from plugtune.config import ConfigError


@pytest.fixture(autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models: threads only add overhead (and the machine is shared)
    yield
    torch.set_num_threads(before)


def _rows(start, stop):
    return [{"messages": [{"role": "user", "content": f"what is {i} + 1"},
                          {"role": "assistant", "content": str(i + 1)}]} for i in range(start, stop)]


@pytest.fixture
def task(tmp_path):
    """A tiny task (40 train, 6 test) and a plain-text retention file."""
    train, test, text = tmp_path / "train.jsonl", tmp_path / "test.jsonl", tmp_path / "general.jsonl"
    train.write_text("".join(json.dumps(r) + "\n" for r in _rows(0, 40)))
    test.write_text("".join(json.dumps(r) + "\n" for r in _rows(100, 106)))
    text.write_text("".join(json.dumps({"text": t}) + "\n" for t in
                            ["the quick brown fox jumps over the lazy dog", "hello world, what is the answer?",
                             "January February March April May June July"]))
    return {"train": str(train), "test": str(test), "text": str(text)}


def tiny_config(tiny_model_dir, task, out, **changes) -> dict:
    cfg = {
        "title": "tiny", "out": str(out), "isolate": False,
        "base": {"model": {"name": str(tiny_model_dir)},
                 "data": {"train": task["train"], "eval": task["test"], "max_length": 64},
                 "training": {"lr": 1e-2, "warmup_steps": 0, "seed": 0}},
        "budget": {"max_steps": 2, "batch_size": 4},
        "methods": [{"name": "full", "method": "full", "lr": 1e-3},
                    {"name": "lora", "method": "lora", "adapter": {"r": 4, "alpha": 8}},
                    {"name": "prompt", "method": "prompt_tuning", "adapter": {"num_virtual_tokens": 4}, "lr": 3e-2}],
        "data_sweep": {"sizes": [8, "all"], "methods": ["full", "lora"]},
        "eval": {"n": 4, "max_new_tokens": 3, "batch_size": 4},
        "retention": {"source": task["text"], "n": 3, "max_length": 64},
        "sft_then_dpo": {"after": "lora", "pairs": 6, "max_steps": 2, "batch_size": 3, "adapter": {"r": 2}},
    }
    for key, value in changes.items():
        cfg[key] = value
    return cfg


def write(tmp_path, cfg: dict) -> Path:
    path = tmp_path / "compare.yaml"
    path.write_text(yaml.safe_dump(cfg, allow_unicode=True))
    return path


def saved_numel(adapter_dir) -> int:
    return sum(t.numel() for t in load_file(str(Path(adapter_dir) / "adapter_model.safetensors")).values())


def dir_size(path) -> int:
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())


@pytest.mark.parametrize("name", shipped_compare_configs())
def test_shipped_compare_config_validates(name):
    """Every shipped compare config loads (each method's run config included) and reads its data."""
    from plugtune.data import load_examples

    cfg = load_compare_config(name)
    assert load_examples(cfg.base["data"]["train"]) and load_examples(cfg.base["data"]["eval"])
    methods = {(m.method, m.adapter.get("use_dora", False), m.adapter.get("variant")) for m in cfg.methods}
    if name == "arith":  # the list: full, LoRA, DoRA, IA3, Houlsby, Pfeiffer, prompt tuning, SFT -> DPO
        assert methods == {("full", False, None), ("lora", False, None), ("lora", True, None), ("ia3", False, None),
                           ("bottleneck", False, "houlsby"), ("bottleneck", False, "pfeiffer"),
                           ("prompt_tuning", False, None)}
        assert cfg.sft_then_dpo.after and "arith" in cfg.base["data"]["train"]


def test_compare_end_to_end_on_the_tiny_model(tmp_path, tiny_model_dir, task):
    from plugtune.adapters import attach_adapter, load_adapter
    from plugtune.data import load_examples
    from plugtune.evaluation import loss_and_perplexity
    from plugtune.models.loading import load_base

    out = tmp_path / "out"
    report = run_compare(load_compare_config(write(tmp_path, tiny_config(tiny_model_dir, task, out))), "cmd")
    for name in ("report.md", "report.json", "loss_curves.png", "quality_vs_params.png", "quality_vs_examples.png"):
        assert (out / name).stat().st_size > 0
    assert json.loads((out / "report.json").read_text())["rows"] == json.loads(json.dumps(report["rows"]))
    rows = {r["name"]: r for r in report["rows"]}
    assert list(rows) == ["full", "lora", "prompt", "SFT → DPO"]

    base = load_base(str(tiny_model_dir))
    base_params = sum(p.numel() for p in base.model.parameters())
    assert report["base"]["params"] == base_params
    for name, row in rows.items():
        # every column, for every row (memory: not measured in one process, and said so)
        for key in ("trainable_params", "trainable_pct", "train_seconds", "seconds_per_step", "examples_per_second",
                    "tokens_per_second", "checkpoint_bytes", "heldout_loss", "exact_match", "retention_loss"):
            assert row[key] is not None, (name, key)
        assert row["peak_memory_mb"] is None and row["memory_measured"] is False
        if "stages" not in row:  # SFT -> DPO: both stages' files, below
            assert row["checkpoint_bytes"] == dir_size(row["checkpoint"])
        assert row["total"] == 4
        metrics = [json.loads(line) for line in (Path(row["run_dir"]) / "metrics.jsonl").read_text().splitlines()]
        assert row["loss_curve"] == [[m["step"], m["loss"]] for m in metrics if m["kind"] == "train"]
        assert not (Path(row["run_dir"]) / "checkpoints").exists()  # keep_checkpoints: false

    # trainable parameters, counted independently: the whole base; the saved adapter's tensors; a fresh attach
    assert rows["full"]["trainable_params"] == base_params and rows["full"]["trainable_pct"] == pytest.approx(100.0)
    for name, method, adapter in (("lora", "lora", {"r": 4, "alpha": 8}), ("prompt", "prompt_tuning",
                                                                           {"num_virtual_tokens": 4})):
        fresh = load_base(str(tiny_model_dir)).model
        attach_adapter(fresh, method, adapter)
        expected = sum(p.numel() for p in fresh.parameters() if p.requires_grad)
        assert rows[name]["trainable_params"] == expected == saved_numel(rows[name]["checkpoint"])
        assert rows[name]["trainable_pct"] == pytest.approx(100 * expected / base_params)
        train_report = json.loads((Path(rows[name]["run_dir"]) / "train_report.json").read_text())
        assert rows[name]["train_seconds"] == train_report["train_seconds"] and rows[name]["steps"] == 2

    # exact match recounted from transformers' (and PEFT's) own greedy answers to the first 4 test prompts
    for row, model in ((report["base"], hf_model(tiny_model_dir)), (rows["lora"], hf_model(tiny_model_dir,
                                                                                             rows["lora"]["checkpoint"]))):
        answers = [hf_greedy(model, base.tokenizer, ex.prompt_messages(), 3) for ex in load_examples(task["test"])[:4]]
        correct = sum(a.strip() == ex.reference for a, ex in zip(answers, load_examples(task["test"])[:4]))
        assert (row["correct"], row["total"]) == (correct, 4) and row["exact_match"] == pytest.approx(correct / 4)
        assert [s["generated"] for s in row["samples"]] == answers[:len(row["samples"])] and row["samples"]

    # held-out and retention losses recomputed from the saved adapter
    load_adapter(base.model, rows["lora"]["checkpoint"])
    test = load_examples(task["test"])[:4]
    general = load_examples(task["text"])[:3]
    # (per-item sums in float64 against evaluation.py's float32 running sum: equal to rounding)
    torch.testing.assert_close(loss_and_perplexity(base.model, base.tokenizer, test, 64)["loss"],
                               rows["lora"]["heldout_loss"], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(loss_and_perplexity(base.model, base.tokenizer, general, 64)["loss"],
                               rows["lora"]["retention_loss"], rtol=1e-6, atol=1e-6)

    # SFT -> DPO: both stages' parameters and files; pairs built from the task
    dpo = rows["SFT → DPO"]
    stage = dpo["stages"]["dpo"]
    assert stage["trainable_params"] == saved_numel(stage["checkpoint"])
    assert dpo["trainable_params"] == saved_numel(rows["lora"]["checkpoint"]) + saved_numel(stage["checkpoint"])
    assert dpo["checkpoint_bytes"] == dir_size(rows["lora"]["checkpoint"]) + dir_size(stage["checkpoint"])
    pairs = [json.loads(line) for line in (Path(dpo["run_dir"]) / "pairs.jsonl").read_text().splitlines()]
    train = load_examples(task["train"])[:6]
    assert [p["chosen"] for p in pairs] == [ex.reference for ex in train] and len(pairs) == dpo["stages"]["pairs"]
    assert all(p["rejected"] != p["chosen"] for p in pairs)

    # data sweep: the first 8 examples trained for real; `all` is the main run itself
    sweep = {(p["method"], p["examples"]): p for p in report["sweep"]}
    assert set(sweep) == {("full", 8), ("full", 40), ("lora", 8), ("lora", 40)}
    assert sweep[("lora", 40)]["reused_main_run"] and sweep[("lora", 40)]["exact_match"] == rows["lora"]["exact_match"]
    assert not sweep[("lora", 8)]["reused_main_run"] and sweep[("lora", 8)]["epochs"] == 1.0
    assert len((out / "data" / "train_first8.jsonl").read_text().splitlines()) == 8
    assert not (out / "sweep" / "lora-n8" / "adapter").exists()  # sweep artifacts are not kept

    md = (out / "report.md").read_text()
    for words in ("high / large / full", "low / small / modular", "medium / medium / behaviour", "cmd",
                  *rows, "LoRA paper"):
        assert words in md


def hf_model(model_dir, adapter=None):
    """The base loaded by transformers, with the adapter loaded by PEFT: readers independent of plugtune."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir)
    if adapter is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, adapter)
    return model.eval()


def hf_greedy(model, tok, messages, max_new_tokens: int) -> str:
    text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    enc = tok(text, add_special_tokens=False, return_tensors="pt")
    stops = [tok.convert_tokens_to_ids(t) for t in ("<|im_end|>", "<|endoftext|>")]
    with torch.no_grad():
        out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=stops,
                             pad_token_id=tok.pad_token_id)
    return tok.decode(out[0, enc["input_ids"].shape[1]:], skip_special_tokens=True)


def test_row_figures_from_a_fixed_run(tmp_path):
    """A row's figures from a made-up run whose numbers are known: 10 steps of 4 x 2 examples in 5 s."""
    from plugtune.compare.config import SFTThenDPOSpec
    from plugtune.compare.results import dpo_row, method_row, sweep_point
    from plugtune.config import load_run_config

    run = load_run_config(None, ["training.batch_size=4", "training.grad_accum=2", "training.lr=0.01"])
    artifact = tmp_path / "adapter"
    artifact.mkdir()
    (artifact / "a.safetensors").write_bytes(b"x" * 1000)
    (artifact / "adapter_config.json").write_bytes(b"y" * 24)
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "metrics.jsonl").write_text('{"kind": "train", "step": 1, "loss": 2.5}\n'
                                           '{"kind": "eval", "step": 1, "eval_loss": 2.4}\n'
                                           '{"kind": "train", "step": 2, "loss": 2.0}\n')
    train = {"steps": 10, "trainable_params": 500, "train_seconds": 5.0, "tokens_per_second": 123.0,
             "artifact": str(artifact), "data": "d"}
    result = {"train": train, "memory": {"measured": True, "peak_mb": 300.0, "after_load_mb": 120.0},
              "heldout_loss": 1.5, "exact_match": 0.75, "correct": 3, "total": 4, "retention_loss": 3.0,
              "eval_seconds": 1.0, "samples": [], "item_correct": [1, 1, 1, 0], "item_loss": [[1.0, 1]] * 4}
    row = method_row("lora", "peft", "lora", run, result, 20_000, run_dir)
    assert {k: row[k] for k in ("steps", "trainable_params", "trainable_pct", "seconds_per_step",
                                "examples_per_second", "tokens_per_second", "checkpoint_bytes", "peak_memory_mb",
                                "memory_over_base_mb", "loss_curve")} == {
        "steps": 10, "trainable_params": 500, "trainable_pct": 2.5, "seconds_per_step": 0.5,
        "examples_per_second": 16.0, "tokens_per_second": 123.0, "checkpoint_bytes": 1024, "peak_memory_mb": 300.0,
        "memory_over_base_mb": 180.0, "loss_curve": [[1, 2.5], [2, 2.0]]}
    point = sweep_point("lora", 40, 100, row, reused=False)
    assert (point["epochs"], point["all"], point["examples"]) == (2.0, False, 40)  # 10 x 4 x 2 = 80 examples of 40

    # SFT -> DPO: a DPO stage of 250 parameters in 2 s on 600 completion tokens, after the SFT row above.
    dpo_run = load_run_config(None, ["objective=dpo", "training.batch_size=3", "training.grad_accum=1"])
    stage = {**result, "train": {**train, "steps": 4, "trainable_params": 250, "train_seconds": 2.0},
             "memory": {"measured": True, "peak_mb": 250.0, "after_load_mb": 100.0},
             "pairs": 6, "rejected_from_model": 2, "pairs_seconds": 0.5, "supervised_tokens": 600}
    dpo = dpo_row(SFTThenDPOSpec(after="lora"), row, dpo_run, stage, 20_000, run_dir)
    assert {k: dpo[k] for k in ("trainable_params", "trainable_pct", "train_seconds", "tokens_per_second",
                                "checkpoint_bytes", "peak_memory_mb", "memory_over_base_mb")} == {
        "trainable_params": 750, "trainable_pct": 3.75, "train_seconds": 7.5, "tokens_per_second": 300.0,
        "checkpoint_bytes": 2048, "peak_memory_mb": 300.0, "memory_over_base_mb": 180.0}


def test_isolated_runs_measure_their_own_peak_memory(tmp_path, tiny_model_dir, task):
    """isolate: true trains each main row in a worker process and reports its own peak."""
    cfg = tiny_config(tiny_model_dir, task, tmp_path / "out", isolate=True,
                      methods=[{"name": "lora", "method": "lora", "adapter": {"r": 4}}],
                      data_sweep={"sizes": [], "methods": []}, sft_then_dpo={"after": ""})
    row = run_compare(load_compare_config(write(tmp_path, cfg)))["rows"][0]
    assert row["memory_measured"] and row["peak_memory_mb"] > row["memory_over_base_mb"] >= 0
    result = json.loads((Path(row["run_dir"]) / "worker" / "result.json").read_text())
    assert row["peak_memory_mb"] == result["train"]["peak_memory_mb"]
    assert row["trainable_params"] == saved_numel(row["checkpoint"])


def test_wall_clock_budget_sets_each_methods_steps(tmp_path, tiny_model_dir, task):
    """Every optimizer step made 0.4 s slower: a 1 s budget is 2 steps (a tiny-model step itself takes
    milliseconds; up to 0.1 s of it still gives 2)."""
    import time

    from torch.optim.optimizer import register_optimizer_step_pre_hook

    cfg = tiny_config(tiny_model_dir, task, tmp_path / "out", budget={"seconds": 1.0, "batch_size": 4},
                      data_sweep={"sizes": [], "methods": []}, sft_then_dpo={"after": ""},
                      methods=[{"name": "lora", "method": "lora", "adapter": {"r": 4}}])
    slow = register_optimizer_step_pre_hook(lambda *_: time.sleep(0.4))
    try:
        report = run_compare(load_compare_config(write(tmp_path, cfg)))
    finally:
        slow.remove()
    assert 0.4 <= report["calibration_seconds_per_step"]["lora"] < 0.5
    row = report["rows"][0]
    assert row["steps"] == 2 and [step for step, _ in row["loss_curve"]] == [1, 2]


def test_config_errors_are_clear(tmp_path, tiny_model_dir, task):
    def fails(match, **changes):
        cfg = tiny_config(tiny_model_dir, task, tmp_path / "out", **changes)
        with pytest.raises(ConfigError, match=match):
            load_compare_config(write(tmp_path, cfg))

    lora = {"name": "lora", "method": "lora"}
    fails(r"methods\[1\] \(x\): unknown method 'lorra'\. Did you mean 'lora'",
          methods=[lora, {"name": "x", "method": "lorra"}])
    fails(r"unknown key 'metods'.*Did you mean 'methods'", metods=[])
    fails(r"methods\[0\]: unknown key 'lrr'.*Did you mean 'lr'", methods=[{**lora, "lrr": 1}])
    fails(r"methods\[0\] \(lora\): adapter \(lora\): unknown key 'rr'", methods=[{**lora, "adapter": {"rr": 4}}])
    fails(r"methods\[0\] \(lora\): training: unknown key 'warmup'", methods=[{**lora, "training": {"warmup": 4}}])
    fails(r"budget is shared", methods=[{**lora, "training": {"max_steps": 9}}])
    fails(r"two methods are named 'lora'", methods=[lora, lora])
    fails(r"two methods are named 'a b'", methods=[{"name": "a_b", "method": "lora"}, {"name": "a b", "method": "ia3"}])
    fails(r"exactly one of max_steps .* or seconds", budget={"max_steps": 2, "seconds": 10})
    fails(r"data_sweep.methods: no method named nope", data_sweep={"sizes": [8], "methods": ["nope"]})
    fails(r"data_sweep.sizes: 'most'", data_sweep={"sizes": ["most"], "methods": []})
    fails(r"prompt_tuning adapters cannot be folded", sft_then_dpo={"after": "prompt"})
    fails(r"sft_then_dpo: .*unknown key 'betta'", sft_then_dpo={"after": "lora", "dpo": {"betta": 1}})
    with pytest.raises(ConfigError, match="compare config 'nope' not found"):
        load_compare_config("nope")


def test_overrides_reach_the_base_and_the_cli_plans(tmp_path, tiny_model_dir, task, capsys):
    path = write(tmp_path, {**tiny_config(tiny_model_dir, task, tmp_path / "out"), "base": "demo_lora"})
    cfg = load_compare_config(path, [f"base.model.name={tiny_model_dir}", "budget.max_steps=5"])
    assert cfg.base["data"]["train"] == "plugtune:skills/dates_train.jsonl"  # read from the shipped run config
    assert cfg.base["model"]["name"] == str(tiny_model_dir) and cfg.budget.max_steps == 5

    parser = argparse.ArgumentParser()
    add_compare_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["compare", str(path), f"base.model.name={tiny_model_dir}", "--out", str(tmp_path / "x"),
                              "--plan"])
    args.func(args)
    plan = capsys.readouterr().out
    assert "lora: lora, 2 steps x batch 4 (+ data sweep)" in plan and "SFT → DPO: 6 pairs from 'lora'" in plan
    assert not (tmp_path / "x").exists()

    args = parser.parse_args(["compare", str(path), f"base.model.name={tiny_model_dir}", "--only", "full,prompt",
                              "--plan"])
    args.func(args)
    plan = capsys.readouterr().out
    assert "full: full" in plan and "prompt: prompt_tuning" in plan and "lora" not in plan and "DPO" not in plan
    with pytest.raises(ConfigError, match="--only: no method named nope"):
        args.func(parser.parse_args(["compare", str(path), "--only", "nope", "--plan"]))


def test_perturb_changes_exactly_one_thing():
    rng = random.Random(0)
    for answer in ["740", "7", "2019-03-05", "dog, cat, fox", "yes"]:
        changed = perturb(answer, rng)
        assert changed != answer and changed.strip()
        if any(c.isdigit() for c in answer):
            assert len(changed) == len(answer) and sum(a != b for a, b in zip(answer, changed)) == 1
            assert not (len(answer) > 1 and changed[0] == "0")
