"""A base model with a pool of named adapters ("skill plug-ins"): load any number, of any method,
switch between them, stack them, or answer each request with its own adapter in one batch.

    lm = plugtune.load("smollm2-135m")
    lm.add_adapter("dates", "runs/dates/adapter")
    lm.add_adapter("units", "runs/units/adapter")
    lm.use("dates")                                       # one active adapter (or several, or None)
    lm.generate(["Convert 3 km to m.", "May 1, 2020 in ISO?"], adapters=["units", "dates"])
    lm.generate(prompts, adapters="auto")                 # the router picks per prompt

Memory is the base once plus each adapter's own weights: adapters wrap the base's modules in place
(adapters/layers.py); removing the last adapter of a module takes its wrapper out again.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from torch import nn

from plugtune.adapters.io import adapter_method_and_config, load_adapter, read_adapter_config
from plugtune.adapters.layers import adapter_names, adapter_state, remove_adapter, set_active_adapters
from plugtune.inference.generate import GenerationConfig, generate
from plugtune.inference.router import HOW_TO_MAKE, Router, load_router
from plugtune.models.loading import LoadedModel

AUTO = "auto"


@dataclass
class AdapterInfo:
    name: str
    method: str
    path: str | None
    params: int


class LanguageModel:
    """A loaded base model (`.model`, `.tokenizer`) and its adapter pool."""

    def __init__(self, loaded: LoadedModel):
        self.model: nn.Module = loaded.model
        self.tokenizer = loaded.tokenizer
        self.path: Path = loaded.path
        self.name: str = loaded.name
        self.router: Router | None = None  # for adapters="auto"
        self._sources: dict[str, str | None] = {}
        self._active: list[str] = []

    # The pool ---------------------------------------------------------------------------------
    @property
    def adapters(self) -> list[str]:
        """Loaded adapters, in the order they were added."""
        present = adapter_names(self.model)
        return [n for n in self._sources if n in present] + [n for n in present if n not in self._sources]

    def info(self) -> list[AdapterInfo]:
        return [AdapterInfo(n, adapter_method_and_config(self.model, n)[0].name, self._sources.get(n),
                            sum(p.numel() for p in adapter_state(self.model, n).values())) for n in self.adapters]

    def add_adapter(self, name: str, path: str | Path, force: bool = False) -> "LanguageModel":
        """Load the adapter saved in `path` (plugtune or PEFT format) into the pool as `name`. The
        adapters that were active stay active; the new one is loaded inactive."""
        read_adapter_config(path)  # a clear error for a directory that is not an adapter
        load_adapter(self.model, path, name=name, force=force)
        self._sources[name] = str(path)
        set_active_adapters(self.model, self._active)
        self.model.eval()
        return self

    def remove_adapter(self, name: str) -> "LanguageModel":
        remove_adapter(self.model, name)
        self._sources.pop(name, None)
        self._active = [a for a in self._active if a != name]
        if self.router is not None and name in self.router.adapters:
            self.router = None  # it could route to an adapter that is gone
        return self

    def use(self, names: str | list[str] | None) -> "LanguageModel":
        """Activate one adapter, several (stacked: their effects add up), or none (the base)."""
        names = [] if names is None else [names] if isinstance(names, str) else list(names)
        set_active_adapters(self.model, names)
        self._active = names
        return self

    @property
    def active(self) -> list[str]:
        return list(self._active)

    # Using it -----------------------------------------------------------------------------------
    def resolve(self, prompts: list, adapters: str | list[str | None] | None) -> list[str | None] | None:
        """Per-prompt adapter names for `adapters`: None (the active adapters for all), one name or
        None-for-base per prompt, or 'auto' (the router)."""
        if adapters is None:
            return None
        if adapters == AUTO:
            if self.router is None:
                raise ValueError("adapters='auto' needs a router: load one with lm.load_router(PATH) (or "
                                 "plugtune.load(..., router=PATH)). To make one: " + HOW_TO_MAKE)
            return self.router.route(self.model, self.tokenizer, prompts)
        if isinstance(adapters, str):
            return [adapters] * len(prompts)
        names = list(adapters)
        if len(names) != len(prompts):
            raise ValueError(f"{len(names)} adapter names for {len(prompts)} prompts; give one per prompt")
        if AUTO in names:
            auto_rows = [i for i, n in enumerate(names) if n == AUTO]
            routed = self.resolve([prompts[i] for i in auto_rows], AUTO)
            for i, n in zip(auto_rows, routed):
                names[i] = n
        return names

    def generate(self, prompts: list, adapters: str | list[str | None] | None = None,
                 cfg: GenerationConfig | None = None, batch_size: int = 16, chat: bool = True) -> list[str]:
        """Replies to `prompts`. Rows with different adapters decode together in one batch."""
        names = self.resolve(prompts, adapters)
        return generate(self.model, self.tokenizer, prompts, cfg, batch_size=batch_size, chat=chat,
                        adapter_names=names)

    def load_router(self, path: str | Path) -> "LanguageModel":
        self.router = load_router(path, self.model, known=self.adapters)
        return self
