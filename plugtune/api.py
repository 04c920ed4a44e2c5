"""The Python API: the same operations as the CLI, as plain functions for scripts and notebooks.

    import plugtune
    report = plugtune.train(plugtune.load_run_config("demo_lora", ["training.max_steps=10"]))
    lm = plugtune.load("smollm2-135m", adapter={"dates": report.artifact})
    print(lm.generate(["Rewrite this date in ISO format (YYYY-MM-DD): May 1, 2020"]))
"""
from __future__ import annotations

from pathlib import Path

from plugtune.inference.language_model import LanguageModel
from plugtune.models.loading import load_base


def load(model: str = "smollm2-135m", adapter: str | Path | dict[str, str | Path] | None = None,
         dtype: str = "auto", device: str = "auto", force: bool = False, use: str | list[str] | None = None,
         router: str | Path | None = None, quantize: str = "none") -> LanguageModel:
    """Load a base model (built-in name or local directory) with any number of saved adapters.

    `adapter` is one directory (loaded as 'default' and made active) or {name: directory}; `use`
    picks the active adapter(s) (default: the only one, if exactly one was given); `router` loads a
    saved router for adapters="auto"; `quantize` (none | int8 | int4 | nf4) stores the base's linear
    weights in 8 or 4 bits (models/quantize.py)."""
    lm = LanguageModel(load_base(model, dtype, device, quantize))
    adapters = {"default": adapter} if isinstance(adapter, (str, Path)) else dict(adapter or {})
    for name, path in adapters.items():
        lm.add_adapter(name, path, force=force)
    if use is None and len(adapters) == 1:
        use = next(iter(adapters))
    lm.use(use)
    if router:
        lm.load_router(router)
    lm.model.eval()
    return lm
