"""Typed run configuration: YAML -> nested dataclasses, strict keys, `a.b=c` overrides.

A run config has four fixed sections (model, data, training, output) plus `method` and
`adapter`. `adapter` holds the parameters of the chosen adapter method; it is converted to
that method's own config dataclass by the adapter registry, so each method owns its keys.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from plugtune.schema import ConfigError, from_dict, to_dict  # noqa: F401  (re-exported)


@dataclass
class ModelConfig:
    name: str = "smollm2-135m"  # a built-in short name or a local Hugging Face model directory
    dtype: str = "auto"  # auto (fp32 on CPU, fp32 weights + bf16 autocast on CUDA) | float32 | bfloat16
    device: str = "auto"  # auto | cpu | cuda | cuda:N


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
class TrainingConfig:
    max_steps: int = 0  # optimizer steps; 0 = derive from epochs
    epochs: float = 1.0
    batch_size: int = 8  # examples per micro-batch
    grad_accum: int = 1  # micro-batches per optimizer step
    lr: float = 2e-4
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    warmup_steps: int = 0
    schedule: str = "cosine"  # cosine | linear | constant
    min_lr_ratio: float = 0.0  # cosine/linear decay floor, as a fraction of lr
    max_grad_norm: float = 1.0  # 0 disables clipping
    seed: int = 0
    log_every: int = 1
    eval_every: int = 0  # 0 = only at the end (when data.eval is set)
    save_every: int = 0  # 0 = only the final checkpoint
    keep_checkpoints: int = 2
    progress: bool = True
    on_nonfinite: str = "stop"  # stop | skip : a NaN/inf loss or gradient stops the run or skips the step
    # Under torchrun (WORLD_SIZE > 1): auto = ddp (replicas, gradients summed) | fsdp (FSDP2 shards).
    distributed: str = "auto"
    report_to: list[str] = field(default_factory=list)  # tensorboard | mlflow | wandb, all offline
    gradient_checkpointing: bool = False  # recompute layer activations in the backward: less memory, ~1/3 slower
    threads: int = 0  # torch intra-op threads for the run; 0 = leave as is (OMP_NUM_THREADS or all cores)


@dataclass
class OutputConfig:
    dir: str = "runs/plugtune"
    resume: str = "auto"  # auto (latest checkpoint in dir if any) | never | a checkpoint directory
    overwrite: bool = False  # start afresh in a dir that holds another run: its checkpoints and logs are removed
    plot: bool = True  # write loss_curve.png at the end


@dataclass
class TaskConfig:
    """One adapter of a multi-task run: its method and keys, and its own data."""

    method: str = "lora"
    adapter: dict[str, Any] = field(default_factory=dict)  # the method's parameters
    train: str = ""  # this adapter's training file
    eval: str = ""  # optional held-out file
    format: str = "auto"
    rows: int = 0  # rows of every micro-batch taken from this adapter's data; 0: an equal share of batch_size


@dataclass
class RouterConfig:
    build: bool = True  # build a router from the adapters' training prompts (multi-task runs)
    max_prompts: int = 256  # training prompts per adapter used to fit it
    quantile: float = 0.01  # similarity threshold: this quantile of an adapter's own prompts ...
    margin: float = 0.02  # ... minus this margin
    min_prob: float = 0.5


@dataclass
class RewardConfig:
    """Reward model: a scalar head on the last non-padding token, Bradley-Terry loss."""

    center_rewards_coefficient: float = 0.0  # TRL's reward centring: + c * (r_c + r_r)^2 (Eisenstein et al. 2023)
    head_init_std: float = 0.0  # 0: 1/sqrt(hidden + 1), as TRL initialises its score head


@dataclass
class DPOConfig:
    """The DPO family on preference pairs."""

    loss: str = "sigmoid"  # sigmoid (DPO) | cdpo | ipo | simpo | orpo
    beta: float = 0.1
    label_smoothing: float = 0.0  # cdpo's epsilon
    simpo_gamma: float = 0.5  # SimPO's target margin (the paper's gamma)
    orpo_lambda: float = 0.1
    rpo_alpha: float = 0.0  # > 0: add alpha x the chosen answer's NLL per token (RPO, Pang et al. 2024; TRL's rpo_alpha)
    precompute_ref: bool = False  # compute the reference log-probs once before training and cache them
    max_prompt_length: int = 0  # 0: no separate prompt limit


@dataclass
class RolloutConfig:
    """What PPO and GRPO generate and how it is scored."""

    prompts_per_step: int = 8  # prompts in one rollout batch
    samples_per_prompt: int = 1  # completions per prompt (GRPO's group size G; PPO usually 1)
    max_new_tokens: int = 64
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    epochs: int = 1  # optimisation passes over each rollout batch (PPO epochs / GRPO iterations)
    minibatches: int = 1  # optimizer steps per pass
    reward_functions: list[str] = field(default_factory=list)  # registered names or "module:function"
    reward_model: str = ""  # a reward model directory (plugtune train objective=reward)
    missing_eos_penalty: float = 0.0  # subtracted from the score of a completion that never ended


@dataclass
class PPOConfig:
    kl_coef: float = 0.05  # beta of the per-token KL penalty (InstructGPT eq. 2)
    kl_estimator: str = "k1"  # k1 | k3
    adaptive_kl: bool = False  # Ziegler et al. 2019's controller towards kl_target
    kl_target: float = 6.0
    kl_horizon: int = 10000
    gamma: float = 1.0
    lam: float = 0.95
    clip_range: float = 0.2
    value_clip: float = 0.2
    vf_coef: float = 0.1
    whiten_advantages: bool = True
    value_lr_scale: float = 1.0  # the value head's learning rate, as a multiple of training.lr


@dataclass
class GRPOConfig:
    beta: float = 0.0  # KL (k3) to the reference; 0 skips the reference pass
    clip_low: float = 0.2
    clip_high: float = 0.2  # DAPO's clip-higher: e.g. 0.28
    scale_rewards: bool = True  # False: Dr. GRPO (no division by the group's std)
    loss_aggregation: str = "sequence_mean"  # sequence_mean (GRPO) | token_mean (DAPO) | constant_normaliser (Dr. GRPO)


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
    # What is optimised: sft (next-token loss on data.train) | reward | dpo | ppo | grpo.
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
        try:
            data = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"{path}: not valid YAML: {exc}") from exc
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: the top level must be a mapping of sections")
    data = apply_overrides(data, overrides or [])
    cfg = from_dict(RunConfig, data, where=str(path) if path else "config")
    validate_run_config(cfg)
    return cfg


def validate_run_config(cfg: RunConfig) -> None:
    from plugtune.adapters import registry  # late import: registry imports method modules

    choices = {
        "data.overflow": (cfg.data.overflow, ("truncate", "drop")),
        "data.train_on": (cfg.data.train_on, ("responses", "all")),
        "data.packed_attention": (cfg.data.packed_attention, ("auto", "varlen", "mask")),
        "training.schedule": (cfg.training.schedule, ("cosine", "linear", "constant")),
        "model.dtype": (cfg.model.dtype, ("auto", "float32", "bfloat16")),
        "training.on_nonfinite": (cfg.training.on_nonfinite, ("stop", "skip")),
        "objective": (cfg.objective, ("sft", "reward", "dpo", "ppo", "grpo")),
        "dpo.loss": (cfg.dpo.loss, ("sigmoid", "cdpo", "ipo", "simpo", "orpo")),
        "ppo.kl_estimator": (cfg.ppo.kl_estimator, ("k1", "k3")),
        "grpo.loss_aggregation": (cfg.grpo.loss_aggregation, ("sequence_mean", "token_mean", "constant_normaliser")),
    }
    for key, (value, allowed) in choices.items():
        if value not in allowed:
            raise ConfigError(f"{key}={value!r} is not one of {', '.join(allowed)}")
    if cfg.adapters and cfg.objective != "sft":
        raise ConfigError(f"objective={cfg.objective} trains one model or adapter; multi-task runs (adapters:) are SFT only")
    if cfg.objective in ("ppo", "grpo"):
        r = cfg.rollout
        if not r.reward_functions and not r.reward_model:
            raise ConfigError(f"objective={cfg.objective} needs a reward: set rollout.reward_functions (e.g. "
                              "[instructions]) or rollout.reward_model (a directory from objective=reward)")
        if cfg.objective == "grpo" and r.samples_per_prompt < 2:
            raise ConfigError("GRPO compares samples of the same prompt: set rollout.samples_per_prompt >= 2")
        if min(r.prompts_per_step, r.max_new_tokens, r.epochs, r.minibatches) < 1:
            raise ConfigError("rollout.prompts_per_step, max_new_tokens, epochs and minibatches must be >= 1")
        if (r.prompts_per_step * r.samples_per_prompt) % r.minibatches:
            raise ConfigError(f"rollout.minibatches={r.minibatches} must divide the rollout batch "
                              f"({r.prompts_per_step} prompts x {r.samples_per_prompt} samples)")
    if cfg.adapters:
        if cfg.adapter:
            raise ConfigError("a run has either one adapter (method + adapter) or several (adapters: {name: "
                              "{method, adapter, train, ...}}); move the top-level 'adapter' keys into each entry")
        for name, task in cfg.adapters.items():
            if task.method == "full":
                raise ConfigError(f"adapters.{name}.method=full: a multi-task run trains adapters on a frozen base")
            registry.get_method(task.method).parse_config(task.adapter)
            if not task.train:
                raise ConfigError(f"adapters.{name}.train is not set: give each adapter its training file")
            if task.rows < 0:
                raise ConfigError(f"adapters.{name}.rows must be >= 0")
    elif cfg.method == "full":
        if cfg.adapter:
            raise ConfigError("method=full trains every parameter: remove the 'adapter' section")
    else:
        registry.get_method(cfg.method).parse_config(cfg.adapter)  # raises on unknown keys
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
    shipped = Path(__file__).parent / "configs" / (p.name if p.suffix else p.name + ".yaml")
    if shipped.is_file():
        return shipped
    raise ConfigError(f"config file '{path}' not found (shipped configs: {', '.join(shipped_configs())})")


def shipped_configs() -> list[str]:
    return sorted(p.stem for p in (Path(__file__).parent / "configs").glob("*.yaml"))
