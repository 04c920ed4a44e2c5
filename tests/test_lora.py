"""LoRA / rsLoRA / DoRA: identity at init, the plain formula, only adapter weights train,
PEFT parity in both directions, merge/unmerge."""
import copy

import pytest
import torch

from plugtune.adapters import (adapter_state, attach_adapter, load_adapter, merge_adapters, save_adapter,
                               unmerge_adapters, unwrap_merged)
from plugtune.models.tiny import build_model
from plugtune.training.compute.next_token import CausalLMObjective
from tests.conftest import random_batch

VOCAB = 400


def perturb(model, name="default", scale=0.1, seed=1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in adapter_state(model, name).values():
            p.add_(torch.randn(p.shape, generator=g) * scale)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
@pytest.mark.parametrize("variant", [{}, {"use_rslora": True}, {"use_dora": True}])
def test_identity_at_init(arch, variant):
    model = build_model(arch, VOCAB)
    x = torch.randint(0, VOCAB, (2, 9))
    before = model(x).logits
    attach_adapter(model, "lora", {"r": 4, **variant})
    torch.testing.assert_close(model(x).logits, before, rtol=0, atol=1e-6)


def test_forward_equals_formula():
    model = build_model("llama", VOCAB)
    attach_adapter(model, "lora", {"r": 4, "alpha": 8})
    perturb(model)
    layer = model.model.layers[0].self_attn.q_proj
    x = torch.randn(3, 5, 64)
    W = layer.base_layer.weight
    A, B = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    expected = x @ W.T + (8 / 4) * (x @ A.T @ B.T)
    torch.testing.assert_close(layer(x), expected)


def test_rslora_scaling_and_dora_formula():
    model = build_model("llama", VOCAB)
    attach_adapter(model, "lora", {"r": 4, "alpha": 8, "use_rslora": True, "use_dora": True})
    perturb(model)
    layer = model.model.layers[0].self_attn.v_proj
    x = torch.randn(2, 3, 64)
    W = layer.base_layer.weight
    A, B = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    m = layer.lora_magnitude_vector["default"]
    adapted = W + (8 / 4 ** 0.5) * B @ A  # rsLoRA: alpha / sqrt(r)
    expected = x @ (m[:, None] * adapted / adapted.norm(dim=1, keepdim=True)).T  # DoRA eq. 5
    torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-5)


def test_only_lora_parameters_train():
    model = build_model("llama", VOCAB)
    base_before = {k: v.clone() for k, v in model.state_dict().items()}
    n = attach_adapter(model, "lora", {"r": 4})
    trainable = {k for k, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_A." in k or ".lora_B." in k for k in trainable)
    lora_before = {k: p.detach().clone() for k, p in adapter_state(model, "default").items()}
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    batch = random_batch(VOCAB)
    objective = CausalLMObjective()
    model.train()
    for _ in range(3):
        loss, _ = objective(model, batch)
        (loss / objective.units(batch)).backward()
        opt.step()
        opt.zero_grad()
    after = {k.replace(".base_layer", ""): v for k, v in model.state_dict().items() if "lora_" not in k}
    for k, v in base_before.items():
        assert torch.equal(after[k], v), f"base parameter {k} changed"
    changed = [k for k, p in adapter_state(model, "default").items() if not torch.equal(p, lora_before[k])]
    assert len(changed) == len(lora_before), "every LoRA tensor (A and B) should have moved"
    assert len(n) == 8  # q, k, v, o in 2 layers


@pytest.mark.parametrize("arch,targets", [("llama", "attention"), ("gpt2", "attention"), ("llama", "all-linear"),
                                          ("gpt2", "all-linear")])
@pytest.mark.parametrize("variant", [{}, {"use_dora": True, "use_rslora": True}])
def test_plugtune_adapter_loads_in_peft(tmp_path, arch, targets, variant):
    peft = pytest.importorskip("peft")
    model = build_model(arch, VOCAB)
    attach_adapter(model, "lora", {"r": 4, "alpha": 8, "target_modules": targets, **variant})
    perturb(model)
    save_adapter(model, tmp_path)
    x = torch.randint(0, VOCAB, (2, 7))
    peft_model = peft.PeftModel.from_pretrained(build_model(arch, VOCAB), tmp_path)
    torch.testing.assert_close(peft_model(x).logits, model(x).logits)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
@pytest.mark.parametrize("variant", [{}, {"use_dora": True}, {"use_rslora": True}])
def test_peft_adapter_loads_in_plugtune(tmp_path, arch, variant):
    peft = pytest.importorskip("peft")
    base = build_model(arch, VOCAB)
    cfg = peft.LoraConfig(r=4, lora_alpha=16, target_modules="all-linear", **variant)
    peft_model = peft.get_peft_model(base, cfg)
    with torch.no_grad():
        for n, p in peft_model.named_parameters():
            if "lora_" in n:
                p.add_(torch.randn_like(p) * 0.1)
    peft_model.save_pretrained(tmp_path)
    x = torch.randint(0, VOCAB, (2, 7))
    ours = build_model(arch, VOCAB)
    load_adapter(ours, tmp_path)
    torch.testing.assert_close(ours(x).logits, peft_model(x).logits)


@pytest.mark.parametrize("variant", [{}, {"use_dora": True}])
def test_merge_then_unmerge_is_bit_exact(variant):
    model = build_model("gpt2", VOCAB)
    originals = {k: v.clone() for k, v in model.state_dict().items()}
    attach_adapter(model, "lora", {"r": 4, "target_modules": "all-linear", **variant})
    perturb(model)
    x = torch.randint(0, VOCAB, (2, 7))
    unmerged = model(x).logits
    merge_adapters(model)
    torch.testing.assert_close(model(x).logits, unmerged, rtol=1e-5, atol=1e-5)
    unmerge_adapters(model)
    restored = {k.replace(".base_layer", ""): v for k, v in model.state_dict().items() if "lora_" not in k}
    assert all(torch.equal(restored[k], v) for k, v in originals.items())
    merge_adapters(model)
    plain = unwrap_merged(copy.deepcopy(model))
    assert not any("lora" in k for k in plain.state_dict())
    torch.testing.assert_close(plain(x).logits, unmerged, rtol=1e-5, atol=1e-5)


def test_adapter_for_another_base_is_refused(tmp_path):
    from plugtune.adapters import AdapterMismatchError

    model = build_model("llama", VOCAB, seed=0)
    attach_adapter(model, "lora", {"r": 4})
    save_adapter(model, tmp_path)
    with pytest.raises(AdapterMismatchError, match="other base weights"):
        load_adapter(build_model("llama", VOCAB, seed=1), tmp_path)
    with pytest.raises(AdapterMismatchError, match="different architecture"):
        load_adapter(build_model("llama", VOCAB, hidden=32), tmp_path)
    load_adapter(build_model("llama", VOCAB, seed=1), tmp_path, force=True)  # forced: same shapes, loads


def test_unknown_target_module_is_a_clear_error():
    with pytest.raises(ValueError, match="matched no module"):
        attach_adapter(build_model("llama", VOCAB), "lora", {"target_modules": ["qkv"]})


@pytest.mark.parametrize("arch,embedding", [("llama", "embed_tokens"), ("gpt2", "wte")])
def test_lora_on_embeddings_matches_peft_both_ways(tmp_path, arch, embedding):
    peft = pytest.importorskip("peft")
    model = build_model(arch, VOCAB)
    x = torch.randint(0, VOCAB, (2, 7))
    base_logits = model(x).logits
    attach_adapter(model, "lora", {"r": 4, "target_modules": [embedding, "c_attn" if arch == "gpt2" else "q_proj"]})
    torch.testing.assert_close(model(x).logits, base_logits)  # A is zero at init
    perturb(model)
    save_adapter(model, tmp_path / "ours")
    theirs = peft.PeftModel.from_pretrained(build_model(arch, VOCAB), tmp_path / "ours")
    torch.testing.assert_close(theirs(x).logits, model(x).logits)
    theirs.save_pretrained(tmp_path / "peft")
    back = build_model(arch, VOCAB)
    load_adapter(back, tmp_path / "peft")
    torch.testing.assert_close(back(x).logits, model(x).logits)


def test_merging_embedding_lora_unties_the_lm_head(tmp_path, tokenizer):
    from transformers import AutoModelForCausalLM

    from plugtune.adapters.merge import merge_and_save

    model = build_model("llama", len(tokenizer))  # tied embeddings
    attach_adapter(model, "lora", {"r": 4, "target_modules": ["embed_tokens", "v_proj"]})
    perturb(model)
    x = torch.randint(0, len(tokenizer), (2, 7))
    expected = model(x).logits
    merge_and_save(model, tokenizer, tmp_path / "merged")
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    torch.testing.assert_close(merged(x).logits, expected, rtol=1e-4, atol=1e-5)
