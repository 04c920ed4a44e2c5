"""Multi-task adapter training: each adapter's update equals training it alone on the same rows,
gradients stay with their own adapter, the base stays bit-identical; the config path end to end."""
import json

import pytest
import torch

from plugtune.adapters import adapter_state, attach_adapter
from plugtune.adapters.layers import base_parameters
from plugtune.config import TrainingConfig, load_run_config
from plugtune.data import collate, load_examples, tokenize_dataset
from plugtune.data.batching import batch_indices
from plugtune.models.tiny import build_model
from plugtune.training.engine.loop import fit
from plugtune.training.engine.types import IndexedBatches, ParamGroup
from plugtune.training.recipes.multitask import mixed_task_batches, MultiTaskLMObjective, TaskData, task_rows

TASKS = {"dates": ("lora", {"r": 4, "alpha": 8}), "units": ("ia3", {}), "prices": ("lora", {"r": 2, "use_rslora": True})}


def task_items(tokenizer, skill, n=24):
    examples = load_examples(f"plugtune:skills/{skill}_train.jsonl")[:n]
    return tokenize_dataset(tokenizer, examples, 160)[0]


def training_cfg(**kw):
    # max_grad_norm small enough that clipping acts: per-adapter clipping must keep runs equal.
    base = dict(max_steps=3, batch_size=6, grad_accum=2, lr=5e-3, warmup_steps=1, schedule="cosine",
                max_grad_norm=0.05, weight_decay=0.01, progress=False)
    return TrainingConfig(**{**base, **kw})


def perturbed_model(seed=0):
    model = build_model("llama", 400, seed=seed)
    torch.manual_seed(11)
    for name, (method, cfg) in TASKS.items():
        attach_adapter(model, method, cfg, name=name, trainable=False)
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():  # non-zero LoRA B, non-unit IA3 scales: every adapter starts somewhere different
        for name in TASKS:
            for p in adapter_state(model, name).values():
                p.add_(torch.randn(p.shape, generator=g) * 0.05)
    return model


def test_each_adapter_updates_as_if_trained_alone(tmp_path, tokenizer):
    tasks = [TaskData(name, task_items(tokenizer, name), rows=2, seed=3 + k) for k, name in enumerate(TASKS)]
    multi = perturbed_model()
    start = {n: {k: p.detach().clone() for k, p in adapter_state(multi, n).items()} for n in TASKS}
    base_before = {k: v.detach().clone() for k, v in base_parameters(multi).items()}
    for p in multi.parameters():
        p.requires_grad_(False)
    groups = []
    for name in TASKS:
        params = list(adapter_state(multi, name).values())
        for p in params:
            p.requires_grad_(True)
        groups.append(ParamGroup(name, params, clip_group=name))
    source = mixed_task_batches(tasks, grad_accum=2, pad_id=tokenizer.pad_token_id)
    result = fit(multi, source, training_cfg(), tmp_path / "multi", objective=MultiTaskLMObjective(),
                 resume="never", groups=groups)
    assert {k for k in result.history[0] if k.startswith("loss/")} == {f"loss/{n}" for n in TASKS}

    for task in tasks:  # the same adapter, same start, same rows, alone
        alone = build_model("llama", 400, seed=0)
        method, cfg = TASKS[task.name]
        attach_adapter(alone, method, cfg, name=task.name)
        with torch.no_grad():
            for k, p in adapter_state(alone, task.name).items():
                p.copy_(start[task.name][k])

        def rows_of(i, task=task):
            return collate([task.items[j] for j in batch_indices(len(task.items), i, task.rows, task.seed)],
                           tokenizer.pad_token_id)

        fit(alone, IndexedBatches(rows_of, len(task.items), task.rows, 2), training_cfg(), tmp_path / task.name,
            resume="never")
        trained = adapter_state(multi, task.name)
        for k, p in adapter_state(alone, task.name).items():
            torch.testing.assert_close(trained[k], p, rtol=1e-5, atol=1e-6, msg=k)
            assert not torch.equal(p, start[task.name][k]), f"{k} did not train"
    for k, v in base_parameters(multi).items():
        assert torch.equal(v, base_before[k]), f"base parameter {k} changed"


def test_gradient_of_one_adapter_comes_only_from_its_rows(tokenizer):
    model = perturbed_model()
    model.train()
    for p in model.parameters():
        p.requires_grad_(False)
    for n in TASKS:
        for p in adapter_state(model, n).values():
            p.requires_grad_(True)
    tasks = [TaskData(name, task_items(tokenizer, name, 8), rows=2, seed=0) for name in TASKS]
    batch = mixed_task_batches(tasks, 1, tokenizer.pad_token_id).make_batch(0)
    losses, _ = MultiTaskLMObjective()(model, batch)
    losses["units"].backward()
    for name in TASKS:
        grads = [p.grad for p in adapter_state(model, name).values()]
        if name == "units":
            assert all(g is not None and g.abs().sum() > 0 for g in grads)
        else:
            assert all(g is None or g.abs().sum() == 0 for g in grads), name


def test_rows_split_the_batch_and_errors_are_clear():
    cfg = load_run_config(None, ["training.batch_size=8", "adapters.a.train=x", "adapters.b.train=y",
                                 "adapters.c.train=z", "adapters.c.rows=4"])
    assert task_rows(cfg) == {"a": 2, "b": 2, "c": 4}
    cfg = load_run_config(None, ["training.batch_size=3", "adapters.a.train=x", "adapters.b.train=y",
                                 "adapters.c.train=z", "adapters.c.rows=3"])
    with pytest.raises(ValueError, match="leaves no rows for adapters"):
        task_rows(cfg)
    from plugtune.config import ConfigError

    with pytest.raises(ConfigError, match="adapters.a.train is not set"):
        load_run_config(None, ["adapters.a.method=lora"])
    with pytest.raises(ConfigError, match="either one adapter"):
        load_run_config(None, ["adapter.r=4", "adapters.a.train=x"])


def test_multitask_config_trains_saves_pool_and_router(tmp_path, tiny_model_dir):
    import plugtune

    overrides = [f"model.name={tiny_model_dir}", f"output.dir={tmp_path / 'run'}", "training.max_steps=2",
                 "training.batch_size=4", "training.progress=false", "data.max_length=160", "router.max_prompts=16"]
    for name in ("dates", "units"):
        overrides += [f"adapters.{name}.train=plugtune:skills/{name}_train.jsonl",
                      f"adapters.{name}.eval=plugtune:skills/{name}_test.jsonl"]
    overrides += ["adapters.units.method=ia3", "data.eval_limit=4"]
    report = plugtune.train(load_run_config(None, overrides))
    pool = tmp_path / "run" / "adapters"
    assert report.artifact == str(pool) and report.method == "multitask"
    assert {"eval_loss/dates", "eval_loss/units", "perplexity"} <= set(report.eval_metrics)
    assert json.loads((pool / "units" / "adapter_config.json").read_text())["peft_type"] == "IA3"
    lm = plugtune.load(str(tiny_model_dir), adapter={"dates": pool / "dates", "units": pool / "units"},
                       router=pool / "router")
    # The router was fitted on each adapter's first 16 training prompts (router.max_prompts): those, and
    # held-out test prompts of the same skills, go to their own adapter. Deterministic: the features come
    # from the fixed tiny base and the logistic regression is full-batch L-BFGS from zeros.
    for skill in ("dates", "units"):
        for split, n in (("train", 16), ("test", 8)):
            prompts = [ex.prompt_messages() for ex in load_examples(f"plugtune:skills/{skill}_{split}.jsonl")[:n]]
            assert lm.resolve(prompts, "auto") == [skill] * n, (skill, split)
    prompts = [load_examples(f"plugtune:skills/{skill}_test.jsonl")[0].prompt_messages() for skill in ("dates", "units")]
    assert lm.resolve(prompts, "auto") == ["dates", "units"]  # a mixed batch routes per row
    assert len(lm.generate(prompts, adapters="auto", cfg=plugtune.GenerationConfig(max_new_tokens=3))) == 2
