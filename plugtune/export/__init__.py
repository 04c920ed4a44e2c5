"""Export to GGUF for llama.cpp and Ollama: a merged model, or a LoRA adapter alone, plus a Modelfile.

Layering: above models and adapters (it loads a base, an adapter, merges), below the CLI and UIs;
it never imports training.
"""
from plugtune.export.export_gguf import ExportResult, export_gguf

__all__ = ["ExportResult", "export_gguf"]
