"""The recipes: what is optimised, on which data, and what is saved. Each recipe module has
`prepare(cfg, loaded) -> Setup` and `check_config(cfg)` (which validates its own config section),
and most define that section's dataclass beside their code. `RECIPES` maps `objective:` to them;
config.py asks it, run.py dispatches through it. Multi-task runs (`adapters:`) use `multitask`.
"""
from plugtune.training.recipes import dpo, grpo, multitask, ppo, reward_model, sft

RECIPES = {"sft": sft, "reward": reward_model, "dpo": dpo, "ppo": ppo, "grpo": grpo}

__all__ = ["RECIPES", "dpo", "grpo", "multitask", "ppo", "reward_model", "sft"]
