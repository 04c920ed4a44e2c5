"""plugtune: fine-tune, adapt and instruction-tune transformer language models, offline, in plain PyTorch."""
from plugtune.api import load
from plugtune.config import RunConfig, load_run_config
from plugtune.evaluation import exact_match, loss_and_perplexity
from plugtune.inference.generate import GenerationConfig, generate
from plugtune.training.run import train

__version__ = "0.1.0"
__all__ = ["GenerationConfig", "RunConfig", "exact_match", "generate", "load", "load_run_config",
           "loss_and_perplexity", "train"]
