"""Experiment tracking, offline: every metrics.jsonl record reaches TensorBoard's event files and
MLflow's local store (read back with their own readers), the run config as params; a resumed run
continues the same MLflow run; a missing extra or an unknown name is a clear error."""
import json
import sys

import pytest

import plugtune
from plugtune.config import ConfigError, load_run_config
from plugtune.training.engine.tracking import flatten, make_tracker


def run_args(model_dir, data, out, *extra):
    return [f"model.name={model_dir}", f"data.train={data}", f"output.dir={out}", "adapter.r=4",
            "training.max_steps=3", "training.batch_size=4", "training.progress=false", *extra]


@pytest.fixture
def data_file(tmp_path):
    path = tmp_path / "data.jsonl"
    path.write_text("".join(json.dumps({"instruction": f"say {i}", "output": f"{i} {i}"}) + "\n" for i in range(12)))
    return path


def train_records(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()
            if json.loads(line)["kind"] == "train"]


def test_tensorboard_event_files_hold_every_record(tmp_path, tiny_model_dir, data_file):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "run"
    plugtune.train(load_run_config(None, run_args(tiny_model_dir, data_file, out, "training.report_to=[tensorboard]",
                                                  "training.lr=1e-3")))
    events = EventAccumulator(str(out / "tensorboard"))
    events.Reload()
    records = train_records(out)
    loss = events.Scalars("train/loss")
    assert [e.step for e in loss] == [r["step"] for r in records] == [1, 2, 3]
    assert [e.value for e in loss] == pytest.approx([r["loss"] for r in records], rel=1e-6)
    assert [e.value for e in events.Scalars("train/lr")] == pytest.approx([r["lr"] for r in records])
    text = events.Tensors("config/text_summary")[0].tensor_proto.string_val[0].decode()
    assert "| training.lr | 0.001 |" in text


def test_mlflow_local_store_holds_params_and_metrics_and_resume_continues_the_run(tmp_path, tiny_model_dir,
                                                                                 data_file, monkeypatch):
    pytest.importorskip("mlflow")
    from mlflow.tracking import MlflowClient

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    out = tmp_path / "run"
    args = run_args(tiny_model_dir, data_file, out, "training.report_to=[mlflow]", "training.save_every=2")
    plugtune.train(load_run_config(None, args))
    client = MlflowClient(tracking_uri=(out / "mlruns").resolve().as_uri())
    run_id = json.loads((out / "tracking.json").read_text())["mlflow"]
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params["training.max_steps"] == "3" and run.data.params["method"] == "lora"
    history = client.get_metric_history(run_id, "train/loss")
    records = train_records(out)
    assert sorted((m.step, m.value) for m in history) == [(r["step"], pytest.approx(r["loss"])) for r in records]
    # Resumed from the same directory: it logs into the same MLflow run.
    plugtune.train(load_run_config(None, args + [f"output.resume={out / 'checkpoints' / 'step-0000002'}"]))
    assert json.loads((out / "tracking.json").read_text())["mlflow"] == run_id
    assert len(client.search_runs([run.info.experiment_id])) == 1


def test_tracker_errors_are_clear(tmp_path, monkeypatch):
    with pytest.raises(ConfigError, match="unknown tracker.*'tensorbord'.*tensorboard, mlflow, wandb"):
        make_tracker(["tensorbord"], tmp_path, {})
    monkeypatch.setitem(sys.modules, "wandb", None)  # as if not installed
    with pytest.raises(ImportError, match=r'pip install "plugtune\[wandb\]"'):
        make_tracker(["wandb"], tmp_path, {})
    assert make_tracker([], tmp_path, {}) is None


def test_flatten_run_config():
    assert flatten({"training": {"lr": 1e-4, "betas": [0.9, 0.99]}, "adapter": {}, "method": "lora"}) == {
        "training.lr": 1e-4, "training.betas": [0.9, 0.99], "adapter": {}, "method": "lora"}
