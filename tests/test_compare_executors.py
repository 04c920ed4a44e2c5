"""Where compare's runs execute: the Ray executor on a local 2-CPU cluster gives the local executor's
numbers, and a worker killed mid-run is retried; a compare started again keeps its finished runs;
bad executor input fails fast with a clear message; Ray is never imported unless asked for."""
import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from plugtune.compare.config import load_compare_config
from plugtune.compare.executors import RESULT_FILE, make_executor
from plugtune.compare.runner import run_compare
from plugtune.config import ConfigError
from tests.test_compare import task, tiny_config, write  # noqa: F401  (task is a fixture)


@pytest.fixture(autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def small_config(tiny_model_dir, task, out, **changes):  # noqa: F811
    small = {"methods": [{"name": "lora", "method": "lora", "adapter": {"r": 4, "alpha": 8}},
                         {"name": "prompt", "method": "prompt_tuning", "adapter": {"num_virtual_tokens": 4},
                          "lr": 3e-2}],
             "data_sweep": {"sizes": [8, "all"], "methods": ["lora"]}, "sft_then_dpo": {"after": ""}}
    return tiny_config(tiny_model_dir, task, out, **{**small, **changes})


def numbers(report):
    """What the report says about each row and sweep point (not timings)."""
    rows = [{k: r[k] for k in ("name", "trainable_params", "correct", "total", "item_correct", "exact_match_ci",
                               "checkpoint_bytes")} | {"loss": r["heldout_loss"], "retention": r["retention_loss"]}
            for r in report["rows"]]
    sweep = [{k: p[k] for k in ("method", "examples", "correct", "item_correct")} for p in report["sweep"]]
    return rows, sweep, report["separation"], [t["exact_match"]["p"] for t in report["tests"]]


def test_ray_gives_the_local_numbers_and_retries_a_killed_worker(tmp_path, tiny_model_dir, task, monkeypatch):  # noqa: F811
    pytest.importorskip("ray")
    from plugtune.compare.ray_executor import KILL_ONCE_ENV

    local = run_compare(load_compare_config(write(tmp_path, small_config(tiny_model_dir, task, tmp_path / "local"))))
    # One run's worker is killed (SIGKILL) on its first attempt: markers already there spare the others.
    kills = tmp_path / "kills"
    kills.mkdir()
    for key in ("base", "main/prompt/seed0", "sweep/lora/n8/seed0"):
        (kills / (key.replace("/", "__") + ".killed")).write_text("spared")
    monkeypatch.setenv(KILL_ONCE_ENV, str(kills))
    cfg = load_compare_config(write(tmp_path, small_config(tiny_model_dir, task, tmp_path / "ray")))
    t0 = time.perf_counter()
    remote = run_compare(cfg, executor="ray", cpus_per_run=1, max_retries=2)
    print(f"ray compare: {time.perf_counter() - t0:.1f} s")
    killed = (kills / "main__lora__seed0.killed").read_text()
    assert killed.isdigit()  # the pid of the worker that died; the run was then retried and finished

    lr, ls, lsep, lp = numbers(local)
    rr, rs, rsep, rp = numbers(remote)
    for a, b in zip(lr, rr):
        assert {k: v for k, v in a.items() if k not in ("loss", "retention")} == \
            {k: v for k, v in b.items() if k not in ("loss", "retention")}
        torch.testing.assert_close(a["loss"], b["loss"], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(a["retention"], b["retention"], rtol=1e-5, atol=1e-6)
    assert (ls, lsep, lp) == (rs, rsep, rp)
    assert remote["executor"]["name"] == "ray" and remote["rows"][0]["memory_measured"]  # a worker process each
    assert (tmp_path / "ray" / "report.md").is_file()


def test_a_compare_started_again_keeps_its_finished_runs(tmp_path, tiny_model_dir, task, capsys):  # noqa: F811
    path = write(tmp_path, small_config(tiny_model_dir, task, tmp_path / "out"))
    first = run_compare(load_compare_config(path))
    capsys.readouterr()
    # as if the first compare had died before its prompt-tuning run finished
    (tmp_path / "out" / "runs" / "prompt" / RESULT_FILE).unlink()
    again = run_compare(load_compare_config(path))
    log = capsys.readouterr().out
    assert "kept the finished run main/lora/seed0" in log and "kept the finished run base" in log
    assert "kept the finished run sweep/lora/n8/seed0" in log
    assert "finished main/prompt/seed0" in log and "kept the finished run main/prompt/seed0" not in log
    assert numbers(first) == numbers(again)
    # a changed setting is a different job: that method trains again
    run_compare(load_compare_config(write(tmp_path, small_config(tiny_model_dir, task, tmp_path / "out",
                                                                 budget={"max_steps": 3, "batch_size": 4}))))
    log = capsys.readouterr().out
    assert "kept the finished run base" in log and "kept the finished run main/lora/seed0" not in log


def test_seeds_repeat_every_run(tmp_path, tiny_model_dir, task):  # noqa: F811
    cfg = small_config(tiny_model_dir, task, tmp_path / "out", seeds=2, data_sweep={"sizes": [], "methods": []})
    report = run_compare(load_compare_config(write(tmp_path, cfg)))
    lora = next(r for r in report["rows"] if r["name"] == "lora")
    assert lora["seeds"] == 2 and [s["training_seed"] for s in lora["per_seed"]] == [0, 1]
    assert lora["total"] == 8 and len(lora["item_correct"]) == 8 and len(lora["loss_curves"]) == 2
    seeds = [r for r in report["per_seed"] if r["name"] == "lora"]
    assert lora["exact_match"] == pytest.approx(sum(r["exact_match"] for r in seeds) / 2)
    assert Path(seeds[1]["run_dir"]).name == "lora-s1"
    assert seeds[0]["loss_curve"] != seeds[1]["loss_curve"]  # a different seed trains differently


def test_bad_executor_input_fails_fast(tmp_path, tiny_model_dir, task, monkeypatch):  # noqa: F811
    with pytest.raises(ConfigError, match="--address .* needs --executor ray"):
        make_executor("local", lambda: None, address="127.0.0.1:6379")
    pytest.importorskip("ray")
    t0 = time.perf_counter()
    with pytest.raises(ConfigError, match="no Ray cluster answers at 127.0.0.1:9"):
        make_executor("ray", lambda: None, address="127.0.0.1:9")
    with pytest.raises(ConfigError, match="is not HOST:PORT"):
        make_executor("ray", lambda: None, address="nonsense")
    assert time.perf_counter() - t0 < 30
    monkeypatch.setitem(sys.modules, "ray", None)  # as if Ray were not installed
    with pytest.raises(ConfigError, match=r"needs Ray, which is not installed: pip install 'plugtune\[ray\]'"):
        make_executor("ray", lambda: None)


def test_a_budget_that_cannot_fit_the_data_is_refused_before_training(tmp_path, tiny_model_dir, task):  # noqa: F811
    def fails(match, **changes):
        cfg = load_compare_config(write(tmp_path, small_config(tiny_model_dir, task, tmp_path / "out", **changes)))
        with pytest.raises(ConfigError, match=match):
            run_compare(cfg)
        assert not (tmp_path / "out").exists()

    fails(r"batch_size x grad_accum = 64 .* only 40", budget={"max_steps": 2, "batch_size": 64})
    fails(r"data_sweep.sizes: 2 examples is less than one batch \(4\)",
          data_sweep={"sizes": [2, "all"], "methods": ["lora"]})
    fails(r"data_sweep.sizes: 400 examples, but the training file has only 40",
          data_sweep={"sizes": [400], "methods": ["lora"]})
    fails(r"eval.n=50, but the held-out file has only 6", eval={"n": 50, "max_new_tokens": 3, "batch_size": 4})


def test_ray_is_imported_only_when_asked_for():
    code = ("import sys, plugtune.cli, plugtune.compare.runner, plugtune.compare.executors; "
            "assert 'ray' not in sys.modules, 'ray imported'")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).parent.parent)


def test_report_directory_layout(tmp_path, tiny_model_dir, task):  # noqa: F811
    """The files a reader of the report directory (e.g. a web UI) relies on, as report.py documents them."""
    report = run_compare(load_compare_config(write(tmp_path, small_config(tiny_model_dir, task, tmp_path / "out"))))
    out = tmp_path / "out"
    saved = json.loads((out / "report.json").read_text())
    assert saved["plots"] == ["loss_curves.png", "quality_vs_params.png", "quality_vs_examples.png"]
    for key in ("settings", "machine", "base", "rows", "per_seed", "sweep", "tests", "separation", "data_column",
                "guide"):
        assert key in saved, key
    md = (out / "report.md").read_text()
    for section in ("## Which do I pick", "## Cost / data / control, measured", "## Which differences are significant",
                    "![loss_curves.png](loss_curves.png)", "McNemar", "Holm"):
        assert section in md
    assert len(report["guide"]) == 4
