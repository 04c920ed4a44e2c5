"""The Python API: the same operations as the CLI, as plain functions for scripts and notebooks.

    import plugtune
    report = plugtune.train(plugtune.load_run_config("demo_lora", ["training.max_steps=10"]))
    lm = plugtune.load("smollm2-135m", adapter=report.artifact)
    print(plugtune.generate(lm.model, lm.tokenizer, ["Rewrite this date in ISO format (YYYY-MM-DD): May 1, 2020"]))
"""
from __future__ import annotations

from plugtune.adapters import load_adapter
from plugtune.models.loading import LoadedModel, load_base


def load(model: str = "smollm2-135m", adapter: str | None = None, dtype: str = "auto", device: str = "auto",
         force: bool = False) -> LoadedModel:
    """Load a base model (built-in name or local directory), optionally with a saved adapter."""
    loaded = load_base(model, dtype, device)
    if adapter:
        load_adapter(loaded.model, adapter, name="default", force=force)
    loaded.model.eval()
    return loaded
