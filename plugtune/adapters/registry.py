"""The adapter-method registry. A method is one file in `plugtune/adapters/methods/` that calls
`register(AdapterMethod(...))` at import; the files are discovered, so adding a method edits no list.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

from torch import nn

from plugtune.schema import ConfigError, from_dict, to_dict


@dataclass(frozen=True)
class AdapterMethod:
    name: str  # stored in adapter_config.json (as PEFT's peft_type where PEFT has the method)
    config_cls: type  # the method's own config dataclass
    # (model, config, adapter_name) -> (wrapped module names, the config with targets resolved). The
    # given config is never modified: the resolved one is a copy (dataclasses.replace).
    attach: Callable[[nn.Module, Any, str], tuple[list[str], Any]]
    peft_type: str | None = None  # PEFT's name for the method, if PEFT has it
    can_merge: bool = False  # whether the method's adapters fold into the base weights
    # Representative settings, for cost reports and docs: {label: config mapping}.
    examples: dict[str, dict] = field(default_factory=dict)
    # adapter_config.json <-> config dataclass; defaults write/read our fields plus `method`.
    to_saved: Callable[[Any], dict] | None = None
    from_saved: Callable[[dict], Any] | None = None
    # Weights file <-> adapter parameters, for methods whose file is not one tensor per parameter
    # keyed by module path (PEFT's prompt learning writes a single `prompt_embeddings`).
    # saved_state(model, name) -> {file key: tensor}; load_state(model, name, {file key: tensor})
    # -> {adapter_state key: tensor}, which io checks (names, shapes) and copies in.
    saved_state: Callable[[nn.Module, str], dict] | None = None
    load_state: Callable[[nn.Module, str, dict], dict] | None = None

    def parse_config(self, raw: dict[str, Any] | Any) -> Any:
        if isinstance(raw, self.config_cls):
            return raw
        return from_dict(self.config_cls, dict(raw or {}), where=f"adapter ({self.name})")

    def saved_config(self, cfg: Any) -> dict:
        if self.to_saved is not None:
            return self.to_saved(cfg)
        return {"method": self.name, **to_dict(cfg)}

    def config_from_saved(self, saved: dict) -> Any:
        if self.from_saved is not None:
            return self.from_saved(saved)
        fields = {k: v for k, v in saved.items() if k not in ("method", "base_model_name_or_path")}
        return self.parse_config(fields)


_METHODS: dict[str, AdapterMethod] = {}  # filled by the method modules as the adapters package imports them


def register(method: AdapterMethod) -> AdapterMethod:
    if method.name in _METHODS and _METHODS[method.name] is not method:
        raise ValueError(f"adapter method '{method.name}' is registered twice")
    _METHODS[method.name] = method
    return method


def available_methods() -> list[str]:
    return sorted(_METHODS)


def get_method(name: str) -> AdapterMethod:
    if name not in _METHODS:
        import difflib

        close = difflib.get_close_matches(name, list(_METHODS) + ["full"], n=1)
        hint = f" Did you mean '{close[0]}'?" if close else ""
        raise ConfigError(f"unknown method '{name}'.{hint} Choose 'full' or one of: {', '.join(sorted(_METHODS))}")
    return _METHODS[name]


def method_from_saved(saved: dict) -> tuple[AdapterMethod, Any]:
    """Find the method of an adapter_config.json (ours or PEFT's) and parse its config."""
    if "method" in saved:
        method = get_method(saved["method"])
    else:
        peft_type = saved.get("peft_type")
        matches = [m for m in _METHODS.values() if m.peft_type and m.peft_type == peft_type]
        if not matches:
            raise ValueError(f"adapter_config.json has peft_type={peft_type!r}, which plugtune does not support "
                             f"(supported: {', '.join(sorted({m.peft_type for m in _METHODS.values() if m.peft_type}))})")
        method = matches[0]
    return method, method.config_from_saved(saved)
