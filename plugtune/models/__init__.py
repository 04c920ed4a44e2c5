from plugtune.models.causal_lm import backbone, hidden_states, lm_head
from plugtune.models.default_model import DEFAULT_MODEL, ensure_default_model
from plugtune.models.loading import LoadedModel, load_base, resolve_model_dir

__all__ = ["DEFAULT_MODEL", "LoadedModel", "backbone", "ensure_default_model", "hidden_states", "lm_head",
           "load_base", "resolve_model_dir"]
