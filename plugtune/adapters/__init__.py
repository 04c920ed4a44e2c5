"""Adapters: small trainable modules attached to a frozen base by target-module pattern."""
from plugtune.adapters.io import (AdapterMismatchError, attach_adapter, base_fingerprint, load_adapter,
                                  read_adapter_config, save_adapter)
from plugtune.adapters.layers import (AdapterLayer, adapter_layers, adapter_names, adapter_state, adapters_disabled,
                                      mark_trainable, merge_adapters, set_active_adapters, unmerge_adapters,
                                      unwrap_merged)
from plugtune.adapters.registry import AdapterMethod, available_methods, get_method, register
from plugtune.adapters import methods  # noqa: E402,F401  (each method module registers itself)

__all__ = ["AdapterLayer", "AdapterMethod", "AdapterMismatchError", "adapter_layers", "adapter_names",
           "adapter_state", "adapters_disabled", "attach_adapter", "available_methods", "base_fingerprint",
           "get_method", "load_adapter", "mark_trainable", "merge_adapters", "read_adapter_config", "register",
           "save_adapter", "set_active_adapters", "unmerge_adapters", "unwrap_merged"]
