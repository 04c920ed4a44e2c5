"""Prompt tuning: only the soft prompt trains, PEFT parity both ways (and of the TEXT init), cached
generation equals a no-cache re-run, save/load round trip, training lowers the loss, and the
near-identity story: not identity at init, but disabling the adapter gives the base back exactly."""
import json

import pytest
import torch

from plugtune.adapters import (adapter_state, adapters_disabled, attach_adapter, load_adapter, merge_adapters,
                               save_adapter)
from plugtune.adapters.layers import base_parameters
from plugtune.adapters.methods.prompt_tuning import text_init
from plugtune.inference.generate import GenerationConfig, generate_ids
from plugtune.models.causal_lm import backbone, forward_logits, hidden_states, lm_head
from plugtune.models.tiny import build_model
from plugtune.training.compute.next_token import CausalLMObjective
from tests.conftest import random_batch
from tests.virtual_inputs import lively_model, ours_logits, padded_batch

VOCAB, N = 400, 4
peft = pytest.importorskip("peft")


def ours_logits(model, batch):
    with torch.no_grad():
        return lm_head(model)(hidden_states(model, batch["input_ids"], batch["attention_mask"]))  # (B, T, V)


def test_only_the_prompt_trains_and_base_is_bit_identical():
    model = build_model("llama", VOCAB)
    attach_adapter(model, "prompt_tuning", {"num_virtual_tokens": N})
    assert {n for n, p in model.named_parameters() if p.requires_grad} == {"prompt_encoder.prompt_embeddings.default"}
    base_before = {k: v.detach().clone() for k, v in base_parameters(model).items()}
    prompt_before = adapter_state(model, "default")["prompt_encoder.prompt_embeddings.default"].detach().clone()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.1)
    objective, batch = CausalLMObjective(), random_batch(VOCAB)
    for _ in range(3):
        loss, _ = objective(model, batch)
        opt.zero_grad()
        loss.backward()
        opt.step()
    for k, v in base_parameters(model).items():
        assert torch.equal(v, base_before[k]), k
    assert not torch.equal(adapter_state(model, "default")["prompt_encoder.prompt_embeddings.default"], prompt_before)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_plugtune_adapter_loads_in_peft(tmp_path, arch):
    model = build_model(arch, VOCAB)
    attach_adapter(model, "prompt_tuning", {"num_virtual_tokens": N})
    save_adapter(model, tmp_path)
    batch = padded_batch()
    theirs = peft.PeftModel.from_pretrained(build_model(arch, VOCAB), tmp_path)
    with torch.no_grad():  # PEFT's logits include the N virtual positions first
        their_logits = theirs(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, N:]
    real = batch["attention_mask"].bool()
    torch.testing.assert_close(ours_logits(model, batch)[real], their_logits[real])


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_peft_adapter_loads_in_plugtune(tmp_path, arch):
    made = peft.get_peft_model(build_model(arch, VOCAB),
                               peft.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=N))
    with torch.no_grad():
        made.prompt_encoder["default"].embedding.weight.add_(0.1 * torch.randn(N, 64))
    made.save_pretrained(tmp_path)
    batch = padded_batch()
    with torch.no_grad():
        their_logits = made(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, N:]
    ours = load_adapter(build_model(arch, VOCAB), tmp_path)
    real = batch["attention_mask"].bool()
    torch.testing.assert_close(ours_logits(ours, batch)[real], their_logits[real])
    torch.testing.assert_close(forward_logits(ours, batch["input_ids"], batch["attention_mask"])[real], their_logits[real])


def test_text_init_matches_peft_and_is_written_for_interop(tmp_path, tokenizer):
    tokenizer.save_pretrained(tmp_path / "tok")
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tmp_path / "tok")
    text = "what is the date"
    made = peft.get_peft_model(build_model("llama", len(tok)), peft.PromptTuningConfig(
        task_type="CAUSAL_LM", num_virtual_tokens=7, prompt_tuning_init="TEXT", prompt_tuning_init_text=text,
        tokenizer_name_or_path=str(tmp_path / "tok")))
    model = build_model("llama", len(tok))
    attach_adapter(model, "prompt_tuning", text_init(tok, text, num_virtual_tokens=7))
    ours = adapter_state(model, "default")["prompt_encoder.prompt_embeddings.default"]
    assert torch.equal(ours, made.prompt_encoder["default"].embedding.weight)  # text repeated to 7 tokens
    save_adapter(model, tmp_path / "a")
    saved = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    assert saved["prompt_tuning_init"] == "TEXT" and saved["prompt_tuning_init_text"] == text
    assert (saved["peft_type"], saved["token_dim"], saved["num_virtual_tokens"]) == ("PROMPT_TUNING", 64, 7)
    peft.PeftModel.from_pretrained(build_model("llama", len(tok)), tmp_path / "a")  # PEFT accepts the config


def no_cache_greedy(model, prompt, steps, stop):
    """Reference: re-run the whole sequence (soft prompt included) for every new token."""
    seq, new = list(prompt), []
    for _ in range(steps):
        with torch.no_grad():
            tok = int(forward_logits(model, torch.tensor([seq]))[0, -1].argmax())
        if tok in stop:
            break
        new.append(tok)
        seq.append(tok)
    return new


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_cached_generation_matches_no_cache_reference(arch):
    model = lively_model(arch)
    attach_adapter(model, "prompt_tuning", {"num_virtual_tokens": N}, trainable=False)
    prompts = [[5, 17, 42, 7, 99], [8, 3], [250, 11, 12]]  # different lengths: left padding
    got = generate_ids(model, prompts, stop_ids=[2], pad_id=0, cfg=GenerationConfig(max_new_tokens=6))
    assert got == [no_cache_greedy(model, p, 6, [2]) for p in prompts]
    with adapters_disabled(model):  # the base: a plain model's generation still matches its reference
        base = generate_ids(model, prompts, stop_ids=[2], pad_id=0, cfg=GenerationConfig(max_new_tokens=6))
        assert base == [no_cache_greedy(model, p, 6, [2]) for p in prompts]
    assert got != base  # the soft prompt does change what the model says


def test_save_load_round_trip(tmp_path):
    model = build_model("gpt2", VOCAB)
    attach_adapter(model, "prompt_tuning", {"num_virtual_tokens": N, "init": "sample_vocab"})
    save_adapter(model, tmp_path)
    loaded = load_adapter(build_model("gpt2", VOCAB), tmp_path, name="again")
    assert torch.equal(adapter_state(loaded, "again")["prompt_encoder.prompt_embeddings.again"],
                       adapter_state(model, "default")["prompt_encoder.prompt_embeddings.default"])
    batch = padded_batch()
    torch.testing.assert_close(ours_logits(loaded, batch), ours_logits(model, batch), rtol=0, atol=0)


def test_short_training_lowers_the_loss():
    torch.manual_seed(0)
    model = lively_model("llama")  # a base that reacts to its inputs
    attach_adapter(model, "prompt_tuning", {"num_virtual_tokens": 8, "init": "sample_vocab"})
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=0.05)
    objective, batch = CausalLMObjective(), random_batch(VOCAB, batch=4, length=12)
    losses = []
    for _ in range(30):
        loss_sum, _ = objective(model, batch)
        loss = loss_sum / objective.units(batch)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[0], losses


def test_not_identity_at_init_but_disabling_restores_the_base():
    model = build_model("llama", VOCAB)
    batch = padded_batch()
    base = ours_logits(model, batch)
    direct = backbone(model)(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False)[0]
    torch.testing.assert_close(base, lm_head(model)(direct).detach(), rtol=0, atol=0)  # no adapter: path unchanged
    attach_adapter(model, "prompt_tuning", {"num_virtual_tokens": N})
    assert not torch.allclose(ours_logits(model, batch), base, atol=1e-3)  # a soft prompt is extra context
    with adapters_disabled(model):
        assert torch.equal(ours_logits(model, batch), base)
    with pytest.raises(TypeError, match="cannot be merged"):
        merge_adapters(model)
