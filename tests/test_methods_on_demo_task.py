"""Every adapter method, trained briefly through the real data pipeline on the demo task (dates),
lowers the held-out loss of a tiny model."""
import pytest
import torch

from plugtune.adapters import attach_adapter
from plugtune.config import TrainingConfig
from plugtune.data import load_examples, tokenize_dataset
from tests.references import micro_batch
from plugtune.data.batching import collate
from plugtune.models.tiny import build_model
from plugtune.training.engine.loop import evaluate_loss, fit
from plugtune.training.engine.types import IndexedBatches
from plugtune.training.compute.next_token import CausalLMObjective

VARIANTS = {
    "lora": ("lora", {"r": 8, "alpha": 16}, 1e-2),
    "dora": ("lora", {"r": 8, "alpha": 16, "use_dora": True}, 1e-2),
    "rslora-all-linear": ("lora", {"r": 8, "alpha": 8, "use_rslora": True, "target_modules": "all-linear"}, 1e-2),
    "ia3": ("ia3", {}, 5e-2),
    "houlsby": ("bottleneck", {"variant": "houlsby", "reduction_factor": 4}, 1e-2),
    "pfeiffer": ("bottleneck", {"variant": "pfeiffer", "reduction_factor": 4}, 1e-2),
    "prompt": ("prompt_tuning", {"num_virtual_tokens": 8}, 3e-1),  # the usual prompt-tuning rate
    "prefix": ("prefix_tuning", {"num_virtual_tokens": 8}, 2e-2),
}


@pytest.fixture(scope="module")
def demo_data(tokenizer):
    train, _ = tokenize_dataset(tokenizer, load_examples("plugtune:skills/dates_train.jsonl")[:96], 160)
    test, _ = tokenize_dataset(tokenizer, load_examples("plugtune:skills/dates_test.jsonl")[:16], 160)
    return train, [collate(test, tokenizer.pad_token_id)]


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_short_training_lowers_held_out_loss(tmp_path, tokenizer, demo_data, variant):
    method, cfg, lr = VARIANTS[variant]
    train, eval_batches = demo_data
    model = build_model("llama", len(tokenizer))
    attach_adapter(model, method, cfg)
    before = evaluate_loss(model, eval_batches, CausalLMObjective(), torch.device("cpu"))
    settings = TrainingConfig(max_steps=12, batch_size=8, lr=lr, warmup_steps=1, progress=False)
    fit(model, IndexedBatches(lambda i: micro_batch(train, i, 8, 0, tokenizer.pad_token_id), len(train), 8), settings,
        tmp_path, resume="never")
    after = evaluate_loss(model, eval_batches, CausalLMObjective(), torch.device("cpu"))
    assert after < before - 0.05, (variant, before, after)
