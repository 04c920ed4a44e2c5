"""Configs: every shipped file loads; unknown keys name the nearest valid one; overrides."""
import pytest

from plugtune.config import ConfigError, load_run_config, shipped_configs
from plugtune.training.pipeline import is_pipeline, load_pipeline

RUNS = [n for n in shipped_configs() if not is_pipeline(n)]
PIPELINES = [n for n in shipped_configs() if is_pipeline(n)]


@pytest.mark.parametrize("name", PIPELINES)
def test_every_shipped_pipeline_checks(name):
    """Every shipped pipeline parses: each stage's sections validate and its references are to earlier stages."""
    from plugtune.data.formats import read_records

    _, stages, _ = load_pipeline(name)
    assert [s.kind for s in stages] and all(s.kind in ("sample", "sft", "reward", "dpo", "ppo", "grpo") for s in stages)
    for s in stages:
        prompts = (s.raw.get("sample") or {}).get("prompts") or s.raw.get("data", {}).get("train", "")
        if prompts and not prompts.startswith("@"):
            assert read_records(prompts)


@pytest.mark.parametrize("name", RUNS)
def test_every_shipped_config_loads(name):
    """Every shipped config parses, its adapter settings are valid, and its data files read."""
    from plugtune.adapters.registry import get_method
    from plugtune.data import load_examples
    from plugtune.data.formats import read_records
    from plugtune.data.preference import load_preferences

    cfg = load_run_config(name)
    if cfg.adapters:  # multi-task: each adapter has its own method and data
        for task in cfg.adapters.values():
            get_method(task.method).parse_config(task.adapter)
            assert load_examples(task.train)
        return
    if cfg.method != "full":
        get_method(cfg.method).parse_config(cfg.adapter)
    load = {"reward": load_preferences, "dpo": load_preferences,  # pairs, not examples
            "ppo": read_records, "grpo": read_records}.get(cfg.objective, load_examples)  # prompts
    assert load(cfg.data.train) and (not cfg.data.eval or load(cfg.data.eval))


def test_shipped_configs_exist():
    assert {"demo_lora", "full_finetune", "lora_sft"} <= set(shipped_configs())


def test_unknown_key_suggests_the_nearest(tmp_path):
    with pytest.raises(ConfigError, match="unknown key 'learning_rate'.*"):
        load_run_config(None, ["training.learning_rate=1e-3"])
    with pytest.raises(ConfigError, match="Did you mean 'batch_size'"):
        load_run_config(None, ["training.batchsize=4"])
    with pytest.raises(ConfigError, match="Did you mean 'alpha'"):
        load_run_config(None, ["adapter.alpah=4"])
    with pytest.raises(ConfigError, match="Did you mean 'lora'"):
        load_run_config(None, ["method=lorra"])


def test_overrides_and_types(tmp_path):
    cfg = load_run_config("demo_lora", ["training.lr=1e-4", "adapter.r=4", "adapter.target_modules=[q_proj,v_proj]",
                                        "training.progress=false"])
    assert cfg.training.lr == 1e-4 and cfg.adapter["r"] == 4 and cfg.training.progress is False
    with pytest.raises(ConfigError, match="expected an integer"):
        load_run_config(None, ["training.batch_size=two"])
    with pytest.raises(ConfigError, match="not one of"):
        load_run_config(None, ["data.overflow=explode"])
    with pytest.raises(ConfigError, match="remove the 'adapter' section"):
        load_run_config(None, ["method=full", "adapter.r=4"])
    with pytest.raises(ConfigError, match="key=value"):
        load_run_config(None, ["training.lr"])
    bad = tmp_path / "bad.yaml"
    bad.write_text("training: [1, 2")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_run_config(bad)
