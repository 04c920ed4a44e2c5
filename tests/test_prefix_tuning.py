"""Prefix tuning: only the prefix (and its MLP) trains, PEFT parity both ways with and without the
reparameterisation, cached generation equals a no-cache re-run, save/load round trip, training
lowers the loss, and the near-identity story: not identity at init (not even a zero prefix), but
disabling the adapter gives the base back exactly."""
import json

import pytest
import torch
from safetensors.torch import load_file

from plugtune.adapters import (adapter_state, adapters_disabled, attach_adapter, load_adapter, merge_adapters,
                               read_adapter_config, save_adapter)
from plugtune.adapters.layers import base_parameters
from plugtune.inference.generate import GenerationConfig, generate_ids
from plugtune.models.causal_lm import forward_logits, hidden_states, lm_head
from plugtune.models.tiny import build_model
from plugtune.training.compute.next_token import CausalLMObjective
from tests.conftest import random_batch
from tests.virtual_inputs import lively_model, ours_logits, padded_batch

VOCAB, N = 400, 3
peft = pytest.importorskip("peft")
PROJ = {"prefix_projection": True, "encoder_hidden_size": 20}


def ours_logits(model, batch):
    with torch.no_grad():
        return lm_head(model)(hidden_states(model, batch["input_ids"], batch["attention_mask"]))  # (B, T, V)


def peft_logits(model, batch):
    with torch.no_grad():  # PEFT's prefix sits in the cache: its logits are the real tokens' only
        return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits


def test_only_prefix_and_mlp_train_and_base_is_bit_identical():
    model = build_model("llama", VOCAB)
    attach_adapter(model, "prefix_tuning", {"num_virtual_tokens": N, **PROJ})
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"prefix_encoder.prefix_embeddings.default"} | {
        f"prefix_encoder.prefix_mlp.default.{i}.{w}" for i in (0, 2) for w in ("weight", "bias")}
    base_before = {k: v.detach().clone() for k, v in base_parameters(model).items()}
    adapter_before = {k: v.detach().clone() for k, v in adapter_state(model, "default").items()}
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.1)
    objective, batch = CausalLMObjective(), random_batch(VOCAB)
    for _ in range(3):
        loss, _ = objective(model, batch)
        opt.zero_grad()
        loss.backward()
        opt.step()
    for k, v in base_parameters(model).items():
        assert torch.equal(v, base_before[k]), k
    for k, v in adapter_state(model, "default").items():
        assert not torch.equal(v, adapter_before[k]), k


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
@pytest.mark.parametrize("variant", [{}, PROJ], ids=["table", "projection"])
def test_plugtune_adapter_loads_in_peft(tmp_path, arch, variant):
    model = build_model(arch, VOCAB)
    attach_adapter(model, "prefix_tuning", {"num_virtual_tokens": N, **variant})
    save_adapter(model, tmp_path)
    batch, real = padded_batch(), padded_batch()["attention_mask"].bool()
    theirs = peft.PeftModel.from_pretrained(build_model(arch, VOCAB), tmp_path)
    torch.testing.assert_close(ours_logits(model, batch)[real], peft_logits(theirs, batch)[real])


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
@pytest.mark.parametrize("variant", [{}, {"prefix_projection": True, "encoder_hidden_size": 20}],
                         ids=["table", "projection"])
def test_peft_adapter_loads_in_plugtune(tmp_path, arch, variant):
    made = peft.get_peft_model(build_model(arch, VOCAB),
                               peft.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=N, **variant))
    with torch.no_grad():
        emb = made.prompt_encoder["default"].embedding.weight
        emb.add_(0.1 * torch.randn(emb.shape))
    made.save_pretrained(tmp_path)
    batch, real = padded_batch(), padded_batch()["attention_mask"].bool()
    ours = load_adapter(build_model(arch, VOCAB), tmp_path)
    assert read_adapter_config(tmp_path)["prefix_projection"] == bool(variant)  # PEFT's own record
    torch.testing.assert_close(ours_logits(ours, batch)[real], peft_logits(made, batch)[real])
    torch.testing.assert_close(forward_logits(ours, batch["input_ids"], batch["attention_mask"])[real],
                               peft_logits(made, batch)[real])


def test_saved_format_is_peft_prefix_layout(tmp_path):
    model = build_model("llama", VOCAB)  # grouped-query attention: 4 heads, 2 KV heads of 16
    attach_adapter(model, "prefix_tuning", {"num_virtual_tokens": N, **PROJ})
    save_adapter(model, tmp_path)
    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    assert {k: saved[k] for k in ("peft_type", "token_dim", "num_attention_heads", "num_layers", "prefix_projection")} \
        == {"peft_type": "PREFIX_TUNING", "token_dim": 32, "num_attention_heads": 2, "num_layers": 2,
            "prefix_projection": False}
    tensors = load_file(str(tmp_path / "adapter_model.safetensors"))
    assert list(tensors) == ["prompt_embeddings"] and tensors["prompt_embeddings"].shape == (N, 2 * 2 * 32)
    with torch.no_grad():
        torch.testing.assert_close(tensors["prompt_embeddings"], model.prefix_encoder.prefix("default"))


def no_cache_greedy(model, prompt, steps, stop):
    """Reference: re-run the whole sequence (with a fresh prefix cache) for every new token."""
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
    attach_adapter(model, "prefix_tuning", {"num_virtual_tokens": N}, trainable=False)
    prompts = [[5, 17, 42, 7, 99], [8, 3], [250, 11, 12]]  # different lengths: left padding
    got = generate_ids(model, prompts, stop_ids=[2], pad_id=0, cfg=GenerationConfig(max_new_tokens=6))
    assert got == [no_cache_greedy(model, p, 6, [2]) for p in prompts]
    with adapters_disabled(model):
        base = generate_ids(model, prompts, stop_ids=[2], pad_id=0, cfg=GenerationConfig(max_new_tokens=6))
    assert got != base


def test_save_load_round_trip_keeps_the_resolved_prefix(tmp_path):
    model = build_model("gpt2", VOCAB)
    attach_adapter(model, "prefix_tuning", {"num_virtual_tokens": N, **PROJ})
    save_adapter(model, tmp_path)
    loaded = load_adapter(build_model("gpt2", VOCAB), tmp_path, name="again")
    assert loaded.prefix_encoder.configs["again"].prefix_projection is False  # the MLP is not saved (as PEFT)
    batch = padded_batch()
    torch.testing.assert_close(ours_logits(loaded, batch), ours_logits(model, batch))


def test_short_training_lowers_the_loss():  # the MLP's gradients are checked in the first test
    torch.manual_seed(0)
    model = lively_model("llama")  # a base that reacts to its inputs
    attach_adapter(model, "prefix_tuning", {"num_virtual_tokens": 8})
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


@pytest.mark.parametrize("init", [None, "zero"])
def test_not_identity_at_init_but_disabling_restores_the_base(init):
    model = build_model("llama", VOCAB)
    batch = padded_batch()
    base = ours_logits(model, batch)
    attach_adapter(model, "prefix_tuning", {"num_virtual_tokens": N, "init_weights": init})
    assert not torch.allclose(ours_logits(model, batch), base, atol=1e-4)  # even zero K/V take attention mass
    with adapters_disabled(model):
        assert torch.equal(ours_logits(model, batch), base)
    with pytest.raises(TypeError, match="cannot be merged"):
        merge_adapters(model)


def test_gradient_checkpointing_is_refused():
    model = build_model("gpt2", VOCAB)
    attach_adapter(model, "prefix_tuning", {"num_virtual_tokens": N})
    enable = getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable
    enable()  # layers then run without a KV cache
    model.train()
    with pytest.raises(ValueError, match="gradient checkpointing"):
        CausalLMObjective()(model, random_batch(VOCAB))
