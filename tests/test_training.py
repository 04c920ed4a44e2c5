"""The loop: label-only loss equals the full-logits loss, accumulation equivalence, exact resume,
schedules, NaN handling."""
import json
import math

import pytest
import torch

from plugtune.adapters import attach_adapter
from plugtune.config import TrainingConfig
from plugtune.data.batching import collate
from plugtune.data.tokenize import IGNORE_INDEX, Tokenized
from plugtune.models.tiny import build_model
from plugtune.training.engine.loop import fit
from plugtune.training.engine.types import IndexedBatches, NonFiniteLossError
from plugtune.training.compute.next_token import CausalLMObjective
from tests.references import full_logits_loss_sum
from plugtune.training.engine.schedule import lr_multiplier

VOCAB = 400


def uneven_items(n=8, seed=0):
    """Examples of different lengths with different numbers of supervised tokens."""
    g = torch.Generator().manual_seed(seed)
    items = []
    for i in range(n):
        length = 6 + (i * 3) % 11
        ids = torch.randint(3, VOCAB, (length,), generator=g).tolist()
        prompt = 2 + i % 4  # prompt tokens carry no label
        items.append(Tokenized(ids, [IGNORE_INDEX] * prompt + ids[prompt:]))
    return items


def test_label_only_head_equals_full_logits_loss():
    model = build_model("llama", VOCAB)
    batch = collate(uneven_items(), pad_id=0)
    ours, _ = CausalLMObjective()(model, batch)
    torch.testing.assert_close(ours, full_logits_loss_sum(model, batch))
    assert CausalLMObjective().units(batch) == int((batch["labels"][:, 1:] != -100).sum())


def lora_model(seed=0):
    model = build_model("llama", VOCAB, seed=seed)
    torch.manual_seed(123)
    attach_adapter(model, "lora", {"r": 4, "alpha": 8})
    return model


def run(tmp_path, items, batch_size, accum, steps=3, **kw):
    model = lora_model()
    cfg = TrainingConfig(max_steps=steps, batch_size=batch_size, grad_accum=accum, lr=1e-2, warmup_steps=0,
                         schedule="constant", progress=False, max_grad_norm=0.0, **kw)

    def make_batch(i):  # the same 8 examples each step, split into micro-batches
        k = i % accum
        return collate(items[k * batch_size:(k + 1) * batch_size], pad_id=0)

    result = fit(model, IndexedBatches(make_batch, len(items), batch_size, accum), cfg, tmp_path, resume="never")
    return model, result


def test_gradient_accumulation_equivalence(tmp_path):
    items = uneven_items(8)
    m1, r1 = run(tmp_path / "a", items, batch_size=8, accum=1)
    m2, r2 = run(tmp_path / "b", items, batch_size=2, accum=4)
    losses1 = [h["loss"] for h in r1.history if h["kind"] == "train"]
    losses2 = [h["loss"] for h in r2.history if h["kind"] == "train"]
    assert losses1 == pytest.approx(losses2, rel=1e-5, abs=1e-6)
    for (n, p1), (_, p2) in zip(m1.named_parameters(), m2.named_parameters()):
        torch.testing.assert_close(p1, p2, rtol=1e-4, atol=1e-5, msg=n)
    # A mean of per-micro-batch means would differ, since micro-batches hold different token counts.
    per_micro = [CausalLMObjective().units(collate(items[k * 2:(k + 1) * 2], 0)) for k in range(4)]
    assert len(set(per_micro)) > 1


def test_resume_reproduces_the_uninterrupted_run(tmp_path):
    from tests.references import micro_batch

    items = uneven_items(16)
    cfg = dict(max_steps=6, batch_size=4, grad_accum=2, lr=5e-3, warmup_steps=2, schedule="cosine",
               progress=False, save_every=3, seed=7)

    def train(out, crash_at=None, resume="auto"):
        model = build_model("llama", VOCAB)
        torch.manual_seed(123)
        attach_adapter(model, "lora", {"r": 4, "dropout": 0.1})  # dropout: the RNG state must be restored too

        def make_batch(i):
            if crash_at is not None and i >= crash_at:
                raise KeyboardInterrupt("simulated crash")
            return micro_batch(items, i, 4, 7, 0)

        return model, fit(model, IndexedBatches(make_batch, len(items), 4, 2), TrainingConfig(**cfg), out, resume=resume)

    full_model, full = train(tmp_path / "full", resume="never")
    with pytest.raises(KeyboardInterrupt):
        train(tmp_path / "crash", crash_at=4 * 2 + 1)  # dies during step 5, after the step-3 checkpoint
    resumed_model, resumed = train(tmp_path / "crash")
    losses = lambda r: [h["loss"] for h in r.history if h["kind"] == "train"]
    assert len(losses(resumed)) == 6
    assert losses(resumed) == pytest.approx(losses(full), rel=1e-6)
    for (n, p1), (_, p2) in zip(full_model.named_parameters(), resumed_model.named_parameters()):
        torch.testing.assert_close(p1, p2, msg=n)


def test_schedule_warmup_then_cosine_to_floor():
    mult = [lr_multiplier(s, 10, 2, "cosine", 0.1) for s in range(10)]
    assert mult[0] == 0.5 and mult[1] == 1.0
    assert all(a >= b for a, b in zip(mult[1:], mult[2:]))
    assert lr_multiplier(10, 10, 2, "cosine", 0.1) == pytest.approx(0.1)
    assert lr_multiplier(6, 10, 2, "linear") == pytest.approx(0.5)


def test_nan_loss_stops_without_touching_the_checkpoint(tmp_path):
    model = lora_model()
    items = uneven_items(4)
    cfg = TrainingConfig(max_steps=4, batch_size=4, lr=1e-3, progress=False, save_every=1)

    def make_batch(i):
        batch = collate(items, 0)
        if i >= 2:  # poison step 3: an adapter weight set to NaN makes the loss NaN
            with torch.no_grad():
                next(p for p in model.parameters() if p.requires_grad).fill_(float("nan"))
        return batch

    with pytest.raises(NonFiniteLossError, match="step 3.*checkpoint .*step-0000002 is intact"):
        fit(model, IndexedBatches(make_batch, 4, 4), cfg, tmp_path, resume="never")
    saved = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert saved == ["step-0000001", "step-0000002"]


def test_metrics_and_loss_curve_are_written(tmp_path):
    _, result = run(tmp_path, uneven_items(8), batch_size=4, accum=2, steps=4)
    lines = [json.loads(l) for l in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [l["step"] for l in lines] == [1, 2, 3, 4]
    assert all(math.isfinite(l["loss"]) and l["tokens_per_s"] > 0 for l in lines)
    assert (tmp_path / "loss_curve.png").stat().st_size > 1000
    assert lines[-1]["loss"] < lines[0]["loss"]


def test_output_plot_false_writes_no_loss_curve(tmp_path, tiny_model_dir):
    import plugtune
    from plugtune.config import load_run_config

    common = [f"model.name={tiny_model_dir}", "training.batch_size=4", "training.progress=false", "training.max_steps=1",
              "data.max_length=128", "data.train=plugtune:skills/dates_train.jsonl"]
    plugtune.train(load_run_config(None, common + [f"output.dir={tmp_path / 'off'}", "output.plot=false"]))
    plugtune.train(load_run_config(None, common + [f"output.dir={tmp_path / 'on'}"]))
    assert not (tmp_path / "off" / "loss_curve.png").exists() and (tmp_path / "off" / "metrics.jsonl").is_file()
    assert (tmp_path / "on" / "loss_curve.png").stat().st_size > 1000
