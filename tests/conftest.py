import importlib.util
import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture(scope="session")
def tokenizer():
    from plugtune.models.tiny import build_tokenizer

    return build_tokenizer()


@pytest.fixture
def tiny_llama(tokenizer):
    from plugtune.models.tiny import build_model

    return build_model("llama", vocab_size=len(tokenizer))


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    from plugtune.models.tiny import save_tiny_model_dir

    return save_tiny_model_dir(tmp_path_factory.mktemp("tiny") / "tiny-llama")


def random_batch(vocab: int, batch: int = 4, length: int = 12, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab, (batch, length), generator=g)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}


def load_bench(name: str):
    """bench/<name>.py as a module (bench/ is not a package), for the tests that keep each benchmark running."""
    path = Path(__file__).resolve().parents[1] / "bench" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"bench_{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(autouse=True)
def _restore_thread_count():
    """training.threads sets torch's process-wide thread count; put it back after each test, so a test
    that trains with one thread does not change the numerics of the tests that run after it."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)
