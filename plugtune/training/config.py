"""Typed run configuration: YAML -> nested dataclasses, strict keys, `a.b=c` overrides.

A run config has the sections model, data, output (defined here), training (the loop's settings,
training/engine/settings.py), `method` + `adapter`, and one section per objective. Each section is
owned by the code that reads it: `adapter` is converted to the chosen method's own config dataclass
by the adapter registry; `reward`, `dpo`, `rollout`, `ppo`, `grpo`, `adapters` and `router` are
dataclasses defined beside their recipe (training/recipes/), and each recipe checks its own section
(`check_config`). Validation asks those registries (adapter methods, RECIPES, the losses they name)
instead of keeping lists of its own. So this module sits above the recipes and below run.py; the
public path `plugtune.config` re-exports it.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from plugtune.adapters import registry
from plugtune.models.quantize import SCHEMES
from plugtune.schema import ConfigError, from_dict, read_yaml_mapping, to_dict  # noqa: F401  (re-exported)
from plugtune.training.engine.settings import TrainingConfig
from plugtune.training.recipes import RECIPES, multitask
from plugtune.training.recipes.dpo import DPOConfig
from plugtune.training.recipes.grpo import GRPOConfig
from plugtune.training.recipes.multitask import RouterConfig, TaskConfig
from plugtune.training.recipes.ppo import PPOConfig
from plugtune.training.recipes.reward_model import RewardConfig
from plugtune.training.recipes.rollouts import RolloutConfig

CONFIGS_DIR = Path(__file__).resolve().parents[1] / "configs"  # the shipped run configs (plugtune/configs)

__all__ = ["ConfigError", "DPOConfig", "DataConfig", "GRPOConfig", "ModelConfig", "OutputConfig", "PPOConfig",
           "RewardConfig", "RolloutConfig", "RouterConfig", "RunConfig", "TaskConfig", "TrainingConfig",
           "apply_overrides", "from_dict", "load_run_config", "resolve_config_path", "shipped_configs", "to_dict",
           "validate_run_config"]


@dataclass
class ModelConfig:
    name: str = "smollm2-135m"  # a built-in short name or a local Hugging Face model directory
    dtype: str = "auto"  # auto (fp32 on CPU, fp32 weights + bf16 autocast on CUDA) | float32 | bfloat16
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    # A frozen quantized base for adapter training (QLoRA-style; models/quantize.py): none | int8 | int4
    # (CPU or CUDA, plain PyTorch) | nf4 (CUDA, bitsandbytes, double quantization). Not with method=full.
    quantize: str = "none"
    # Start from this saved adapter and continue training it (a pipeline stage after SFT); DPO, PPO and
    # GRPO then take a frozen copy of it as the reference policy. "" = a fresh adapter.
    adapter: str = ""


@dataclass
class DataConfig:
    train: str = ""  # JSONL/JSON file
    eval: str = ""  # optional held-out file for loss/perplexity during training
    format: str = "auto"  # auto | alpaca | messages | sharegpt | prompt_completion | text
    max_length: int = 512  # tokens per example (prompt + response)
    overflow: str = "truncate"  # truncate | drop : what to do with longer examples
    train_on: str = "responses"  # responses (assistant tokens only) | all
    system_prompt: str | None = None  # added as a system turn when an example has none
    eval_limit: int = 0  # 0 = all eval examples
    # Speed without changing results (SFT). packing: a micro-batch's examples laid end to end, attention
    # kept within each example (data/packing.py). auto = on where exact (not with prompt/prefix tuning;
    # the model is probed), unless group_by_length is true.
    packing: bool | str = "auto"  # auto | true | false
    # How packed examples are kept apart: varlen (one row, attention per example; replaces sdpa) |
    # mask (rows of <= max_length under a block-diagonal mask) | auto (varlen where possible, else mask).
    packed_attention: str = "auto"
    group_by_length: bool | str = "auto"  # padded batches of similar lengths; auto = on when not packing


@dataclass
class OutputConfig:
    dir: str = "runs/plugtune"
    resume: str = "auto"  # auto (latest checkpoint in dir if any) | never | a checkpoint directory
    overwrite: bool = False  # start afresh in a dir that holds another run: its checkpoints and logs are removed
    plot: bool = True  # write loss_curve.png at the end


@dataclass
class RunConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    output: OutputConfig = field(default_factory=OutputConfig)
    method: str = "lora"  # "full" (all parameters) or a registered adapter method
    adapter: dict[str, Any] = field(default_factory=dict)  # that method's parameters
    # Multi-task: several adapters trained at once, each on its own data, in shared mixed batches.
    adapters: dict[str, TaskConfig] = field(default_factory=dict)
    router: RouterConfig = field(default_factory=RouterConfig)
    # What is optimised: a name in training.recipes.RECIPES: sft (next-token loss on data.train) | reward | dpo | ppo | grpo.
    objective: str = "sft"
    reward: RewardConfig = field(default_factory=RewardConfig)
    dpo: DPOConfig = field(default_factory=DPOConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    ppo: PPOConfig = field(default_factory=PPOConfig)
    grpo: GRPOConfig = field(default_factory=GRPOConfig)


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply `a.b=c` overrides to a raw config mapping; values are parsed as YAML scalars/lists."""
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override '{item}' is not of the form key=value (e.g. training.lr=1e-4)")
        dotted, raw = item.split("=", 1)
        value = yaml.safe_load(raw) if raw.strip() else ""
        node = data
        parts = dotted.strip().split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override '{item}': '{part}' is not a section")
        node[parts[-1]] = value
    return data


def load_run_config(path: str | Path | None = None, overrides: list[str] | None = None) -> RunConfig:
    """YAML file (optional) + overrides -> RunConfig; adapter keys are validated by the method."""
    data: dict[str, Any] = {}
    if path is not None:
        path = resolve_config_path(path)
        data = read_yaml_mapping(path)
    data = apply_overrides(data, overrides or [])
    cfg = from_dict(RunConfig, data, where=str(path) if path else "config")
    validate_run_config(cfg)
    return cfg


def validate_run_config(cfg: RunConfig) -> None:
    choices = {
        "data.overflow": (cfg.data.overflow, ("truncate", "drop")),
        "data.train_on": (cfg.data.train_on, ("responses", "all")),
        "data.packed_attention": (cfg.data.packed_attention, ("auto", "varlen", "mask")),
        "training.schedule": (cfg.training.schedule, ("cosine", "linear", "constant")),
        "model.dtype": (cfg.model.dtype, ("auto", "float32", "bfloat16")),
        "model.quantize": (cfg.model.quantize, SCHEMES),
        "training.on_nonfinite": (cfg.training.on_nonfinite, ("stop", "skip")),
        "objective": (cfg.objective, tuple(RECIPES)),
    }
    for key, (value, allowed) in choices.items():
        if value not in allowed:
            raise ConfigError(f"{key}={value!r} is not one of {', '.join(allowed)}")
    (multitask if cfg.adapters else RECIPES[cfg.objective]).check_config(cfg)  # the recipe's own section
    if not cfg.adapters:  # (a multi-task run's adapters are its recipe's to check)
        if cfg.method == "full" and cfg.model.quantize != "none":
            raise ConfigError(f"model.quantize={cfg.model.quantize} freezes the base in 8/4 bits, and method=full "
                              "trains every base weight: use an adapter method (method=lora) on the quantized "
                              "base, or model.quantize=none for full fine-tuning")
        if cfg.method == "full" and cfg.adapter:
            raise ConfigError("method=full trains every parameter: remove the 'adapter' section")
        if cfg.method != "full":
            registry.get_method(cfg.method).parse_config(cfg.adapter)  # raises on unknown keys
        if cfg.model.adapter and cfg.method == "full":
            raise ConfigError("model.adapter continues a saved adapter; method=full trains a whole model: point "
                              "model.name at the previous model directory instead")
    for key in ("packing", "group_by_length"):
        if getattr(cfg.data, key) not in (True, False, "auto"):
            raise ConfigError(f"data.{key}={getattr(cfg.data, key)!r} is not one of auto, true, false")
    if cfg.data.packing is True and cfg.data.group_by_length is True:
        raise ConfigError("data.packing=true and data.group_by_length=true: grouping applies to padded batches "
                          "only; choose one")
    if cfg.data.packing is True and (cfg.objective != "sft" or cfg.adapters):
        raise ConfigError("data.packing=true applies to single-adapter or full SFT runs (objective=sft, no "
                          "'adapters:' section); remove it")
    t = cfg.training
    if t.threads < 0:
        raise ConfigError(f"training.threads must be >= 0 (0 = leave as is), got {t.threads}")
    if t.batch_size < 1 or t.grad_accum < 1:
        raise ConfigError("training.batch_size and training.grad_accum must be >= 1")
    if t.lr <= 0:
        raise ConfigError("training.lr must be > 0")


def resolve_config_path(path: str | Path) -> Path:
    """A file path, or the name of a config shipped with plugtune (e.g. 'demo_lora')."""
    p = Path(path)
    if p.is_file():
        return p
    shipped = CONFIGS_DIR / (p.name if p.suffix else p.name + ".yaml")
    if shipped.is_file():
        return shipped
    raise ConfigError(f"config file '{path}' not found (shipped configs: {', '.join(shipped_configs())})")


def shipped_configs() -> list[str]:
    return sorted(p.stem for p in CONFIGS_DIR.glob("*.yaml"))
