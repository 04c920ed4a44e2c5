from plugtune.inference.generate import GenerationConfig, generate, generate_ids

__all__ = ["GenerationConfig", "generate", "generate_ids"]
