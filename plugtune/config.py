"""The run configuration's public path: `from plugtune.config import load_run_config, RunConfig`.
It lives in training/config.py, above the recipes whose sections it holds (ARCHITECTURE.md)."""
from plugtune.training.config import (ConfigError, DPOConfig, DataConfig, GRPOConfig, ModelConfig,
                                      OutputConfig, PPOConfig, RewardConfig, RolloutConfig, RouterConfig,
                                      RunConfig, TaskConfig, TrainingConfig, apply_overrides, from_dict,
                                      load_run_config, resolve_config_path, shipped_configs, to_dict,
                                      validate_run_config)

__all__ = ["ConfigError", "DPOConfig", "DataConfig", "GRPOConfig", "ModelConfig", "OutputConfig", "PPOConfig",
           "RewardConfig", "RolloutConfig", "RouterConfig", "RunConfig", "TaskConfig", "TrainingConfig",
           "apply_overrides", "from_dict", "load_run_config", "resolve_config_path", "shipped_configs",
           "to_dict", "validate_run_config"]
