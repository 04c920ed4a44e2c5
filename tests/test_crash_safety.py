"""Crash safety: a failure (or kill -9) between the files of a checkpoint leaves the previous one
intact and resume continues from it bit-exactly; a full disk gets a clear message and leaves nothing
half-written; resume=auto refuses a different config; NaN/inf gradients stop or skip as configured."""
import errno
import hashlib
import json
import math
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import plugtune
from plugtune.adapters import attach_adapter
from plugtune.config import ConfigError, TrainingConfig, load_run_config
from tests.references import micro_batch
from plugtune.data.tokenize import IGNORE_INDEX, Tokenized
from plugtune.models.tiny import build_model
from plugtune.training.engine import checkpoint
from plugtune.training.engine.checkpoint import CheckpointWriteError, list_checkpoints, publish
from plugtune.training.engine.loop import fit
from plugtune.training.engine.types import IndexedBatches, NonFiniteLossError
from plugtune.training.engine.metrics_log import MetricsLog

ROOT = Path(__file__).resolve().parents[1]
VOCAB = 400


def items(n=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        ids = torch.randint(3, VOCAB, (6 + (i * 3) % 11,), generator=g).tolist()
        out.append(Tokenized(ids, [IGNORE_INDEX] * (2 + i % 3) + ids[2 + i % 3:]))
    return out


def train(out, steps=4, resume="auto", poison=None, **kw):
    """LoRA (with dropout: the RNG state matters) on fixed data; `poison(step, model)` may tamper."""
    model = build_model("llama", VOCAB)
    torch.manual_seed(123)
    attach_adapter(model, "lora", {"r": 4, "dropout": 0.1})
    data = items()

    def make_batch(i):
        if poison is not None:
            poison(i // 2 + 1, model)
        return micro_batch(data, i, 4, 7, 0)

    cfg = TrainingConfig(**{"max_steps": steps, "batch_size": 4, "grad_accum": 2, "lr": 5e-3, "warmup_steps": 1,
                            "progress": False, "save_every": 1, "keep_checkpoints": 3, "seed": 7, **kw})
    result = fit(model, IndexedBatches(make_batch, len(data), 4, 2), cfg, out, resume=resume)
    return model, result


def trainable(model):
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def assert_bit_identical(a: dict, b: dict):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def digest(directory: Path) -> dict:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(directory.iterdir())}


def failing_save_at(step_dir: str, exc: BaseException, seen: dict):
    """torch.save that raises `exc` when writing into the temporary directory of `step_dir`, i.e.
    after the weights file (safetensors) of that checkpoint is written, before the others."""
    real = torch.save

    def save(obj, f, *args, **kwargs):
        if f"{checkpoint.TMP_PREFIX}{step_dir}" in str(f):
            root = Path(f).parent.parent
            seen["before"] = {p.name: digest(p) for p in list_checkpoints(root)}
            seen["tmp_files"] = sorted(p.name for p in Path(f).parent.iterdir())
            raise exc
        return real(obj, f, *args, **kwargs)

    return save


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    model, result = train(tmp_path_factory.mktemp("full"), resume="never")
    return trainable(model), [h["loss"] for h in result.history if h["kind"] == "train"]


def test_failure_between_checkpoint_files_keeps_the_previous_one(tmp_path, monkeypatch, uninterrupted):
    seen = {}
    monkeypatch.setattr(torch, "save", failing_save_at("step-0000002", RuntimeError("injected failure"), seen))
    with pytest.raises(RuntimeError, match="injected failure"):
        train(tmp_path)
    monkeypatch.undo()
    assert seen["tmp_files"] == [checkpoint.WEIGHTS]  # it failed between the files
    root = tmp_path / "checkpoints"
    assert [p.name for p in list_checkpoints(root)] == ["step-0000001"]
    assert sorted(p.name for p in root.iterdir()) == ["step-0000001"]  # the partial directory is gone
    assert {p.name: digest(p) for p in list_checkpoints(root)} == seen["before"]  # untouched, byte for byte
    model, result = train(tmp_path)  # resume=auto continues from step 1
    assert_bit_identical(trainable(model), uninterrupted[0])
    assert [h["loss"] for h in result.history if h["kind"] == "train"] == uninterrupted[1]


def _victim(out: str) -> None:
    """Run in a subprocess: killed with SIGKILL after the weights of the step-3 checkpoint are on disk."""
    torch.set_num_threads(1)
    real = torch.save

    def save(obj, f, *args, **kwargs):
        if f"{checkpoint.TMP_PREFIX}step-0000003" in str(f):
            os.kill(os.getpid(), signal.SIGKILL)
        return real(obj, f, *args, **kwargs)

    torch.save = save
    train(Path(out), resume="never")


def test_kill_9_while_writing_a_checkpoint(tmp_path, uninterrupted):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    code = f"from tests.test_crash_safety import _victim; _victim({str(tmp_path)!r})"
    done = subprocess.run([sys.executable, "-c", code], env=env, cwd=ROOT, capture_output=True, timeout=300)
    assert done.returncode == -signal.SIGKILL, done.stderr.decode()[-2000:]
    root = tmp_path / "checkpoints"
    stale = root / f"{checkpoint.TMP_PREFIX}step-0000003"
    assert stale.is_dir() and not (stale / checkpoint.STATE).exists()  # half-written, never taken for a checkpoint
    assert [p.name for p in list_checkpoints(root)] == ["step-0000001", "step-0000002"]
    model, result = train(tmp_path)
    assert not stale.exists()  # cleaned at start
    assert_bit_identical(trainable(model), uninterrupted[0])
    assert [h["loss"] for h in result.history if h["kind"] == "train"] == uninterrupted[1]


def test_full_disk_gets_a_clear_message_and_no_partial_checkpoint(tmp_path, monkeypatch):
    seen = {}
    full = OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(torch, "save", failing_save_at("step-0000002", full, seen))
    with pytest.raises(CheckpointWriteError) as info:
        train(tmp_path)
    message = str(info.value)
    root = tmp_path / "checkpoints"
    assert f"no space left on the device holding {root}" in message
    assert "MiB needed" in message and "MiB free" in message and "training.keep_checkpoints" in message
    assert "the previous checkpoint is intact" in message and info.value.errno == errno.ENOSPC
    assert sorted(p.name for p in root.iterdir()) == ["step-0000001"]
    assert {p.name: digest(p) for p in list_checkpoints(root)} == seen["before"]


def test_a_directory_without_every_file_is_not_a_checkpoint(tmp_path):
    root = tmp_path / "checkpoints"
    train(tmp_path, steps=2, resume="never")
    (root / "step-0000002" / checkpoint.STATE).unlink()  # e.g. copied by hand, or an older crash
    assert [p.name for p in list_checkpoints(root)] == ["step-0000001"]


def test_artifact_is_replaced_whole_or_not_at_all(tmp_path):
    (tmp_path / "adapter").mkdir()
    (tmp_path / "adapter" / "weights").write_text("old")

    def broken(where: Path) -> Path:
        (where / "adapter").mkdir()
        (where / "adapter" / "weights").write_text("new, half")
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(CheckpointWriteError, match="no space left"):
        publish(broken, tmp_path)
    assert (tmp_path / "adapter" / "weights").read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter"]

    def good(where: Path) -> Path:
        (where / "adapter").mkdir()
        (where / "adapter" / "weights").write_text("new")
        return where / "adapter"

    assert publish(good, tmp_path) == tmp_path / "adapter"
    assert (tmp_path / "adapter" / "weights").read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter"]


def test_metrics_log_drops_a_torn_last_line_on_resume(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"kind": "train", "step": 1, "loss": 2.0}\n{"kind": "train", "step": 2, "loss": 1.5}\n{"kind": "tr')
    log = MetricsLog(path, resume_from_step=1)
    assert log.read() == [{"kind": "train", "step": 1, "loss": 2.0}]


# ---------------------------------------------------------------- resume=auto and the run's config


def run_args(model_dir, data, out, *extra):
    return [f"model.name={model_dir}", f"data.train={data}", f"output.dir={out}", "adapter.r=4",
            "training.max_steps=2", "training.batch_size=4", "training.progress=false", *extra]


@pytest.fixture
def data_file(tmp_path):
    path = tmp_path / "data.jsonl"
    path.write_text("".join(json.dumps({"instruction": f"say {i}", "output": f"{i} {i}"}) + "\n" for i in range(8)))
    return path


def test_resume_auto_refuses_another_config_and_overwrite_starts_afresh(tmp_path, tiny_model_dir, data_file):
    out = tmp_path / "run"
    plugtune.train(load_run_config(None, run_args(tiny_model_dir, data_file, out)))
    before = digest(out / "checkpoints" / "step-0000002")
    with pytest.raises(ConfigError) as info:
        plugtune.train(load_run_config(None, run_args(tiny_model_dir, data_file, out, "training.lr=1e-3",
                                                      "adapter.alpha=4")))
    message = str(info.value)
    assert "training.lr: 0.0002 -> 0.001" in message and "adapter.alpha: (unset) -> 4" in message
    assert "output.overwrite=true" in message
    assert digest(out / "checkpoints" / "step-0000002") == before  # nothing touched
    # Keys that do not change the trajectory may differ: it resumes (at the end already: no new step).
    report = plugtune.train(load_run_config(None, run_args(tiny_model_dir, data_file, out, "training.log_every=5",
                                                           "training.save_every=7", "training.keep_checkpoints=1")))
    assert report.steps == 2 and digest(out / "checkpoints" / "step-0000002") == before
    # Explicit overwrite: the old run's checkpoints and metrics go, the new run starts at step 1.
    (out / "checkpoints" / f"{checkpoint.TMP_PREFIX}step-0000009").mkdir()
    plugtune.train(load_run_config(None, run_args(tiny_model_dir, data_file, out, "training.lr=1e-3",
                                                  "output.overwrite=true")))
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines if r["kind"] == "train"] == [1, 2]
    assert digest(out / "checkpoints" / "step-0000002") != before
    assert json.loads((out / "checkpoints" / "step-0000002" / "state.json").read_text())["config"]["training"]["lr"] == 1e-3


# ---------------------------------------------------------------- NaN / inf in the gradients


def poison_gradients_at(bad_step: int):
    """An inf in one LoRA gradient during step `bad_step`'s backward; the loss stays finite."""
    state = {"step": 0, "hooked": False}

    def poison(step, model):
        state["step"] = step
        if not state["hooked"]:
            p = next(p for n, p in model.named_parameters() if p.requires_grad and "lora_B" in n)
            p.register_hook(lambda g: g + float("inf") if state["step"] == bad_step else g)
            state["hooked"] = True

    return poison


def test_inf_gradient_stops_the_run_and_keeps_the_checkpoint(tmp_path):
    with pytest.raises(NonFiniteLossError) as info:
        train(tmp_path, poison=poison_gradients_at(3))
    assert "the gradient norm became inf at step 3" in str(info.value)
    assert "step-0000002 is intact" in str(info.value) and "on_nonfinite=skip" in str(info.value)
    root = tmp_path / "checkpoints"
    assert [p.name for p in list_checkpoints(root)] == ["step-0000001", "step-0000002"]
    assert sorted(p.name for p in root.iterdir()) == ["step-0000001", "step-0000002"]
    lines = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert all(math.isfinite(r["loss"]) for r in lines) and [r["step"] for r in lines] == [1, 2]


def test_inf_gradient_skips_the_step_without_touching_the_optimizer(tmp_path):
    """Step 2 skipped: its update never happens, AdamW's step count stays 1, and step 3 uses step 3's
    learning rate (the schedule counts skipped steps). So the weights after step 2 equal those after step 1."""
    clean_out, skip_out = tmp_path / "clean", tmp_path / "skip"
    train(clean_out, steps=3, resume="never")
    model, result = train(skip_out, steps=3, resume="never", poison=poison_gradients_at(2), on_nonfinite="skip")
    assert result.skipped_steps == 1
    kinds = [(r["kind"], r["step"]) for r in result.history]
    assert kinds == [("train", 1), ("skipped", 2), ("train", 3)]
    load = lambda out, step: checkpoint.read_safetensors(out / "checkpoints" / f"step-{step:07d}" / checkpoint.WEIGHTS)
    assert_bit_identical(load(skip_out, 2), load(clean_out, 1))
    opt = lambda out, step: torch.load(out / "checkpoints" / f"step-{step:07d}" / checkpoint.OPTIMIZER, weights_only=False)
    assert {float(s["step"]) for s in opt(skip_out, 2)["state"].values()} == {1.0}
    assert {float(s["step"]) for s in opt(skip_out, 3)["state"].values()} == {2.0}
    lrs = {r["step"]: r["lr"] for r in result.history if r["kind"] == "train"}
    clean = [json.loads(line) for line in (clean_out / "metrics.jsonl").read_text().splitlines()]
    assert lrs[3] == clean[2]["lr"]
    state = json.loads((skip_out / "checkpoints" / "step-0000003" / checkpoint.STATE).read_text())
    assert state["skipped_steps"] == 1
