"""(IA)^3: identity at init, the plain formula, training touches only the vectors, merge/unmerge,
and parity with PEFT in both directions (weights, keys and logits) on tiny Llama and GPT-2."""
import json
import warnings

import pytest
import torch
from safetensors.torch import load_file

from plugtune.adapters import (adapter_layers, adapter_state, attach_adapter, load_adapter, merge_adapters,
                               save_adapter, unmerge_adapters)
from plugtune.adapters.layers import base_parameters
from plugtune.adapters.methods.ia3 import IA3Config, IA3Linear
from plugtune.models.tiny import build_model
from plugtune.training.compute.next_token import CausalLMObjective

ARCHS = ["llama", "gpt2"]
VOCAB = 400


def _ids(seed=1, batch=2, length=12):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, VOCAB, (batch, length), generator=g)


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


def _perturb(params, seed=2):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in params:
            p.copy_(1 + 0.5 * torch.randn(p.shape, generator=g))


def _batch(seed=3, batch=4, length=16):
    ids = _ids(seed, batch, length)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}


@pytest.mark.parametrize("arch", ARCHS)
def test_identity_at_init_and_default_targets(arch):
    base, model = build_model(arch, vocab_size=VOCAB), build_model(arch, vocab_size=VOCAB)
    wrapped = attach_adapter(model, "ia3")
    ids = _ids()
    torch.testing.assert_close(_logits(model, ids), _logits(base, ids), rtol=0, atol=0)
    # PEFT's defaults: Llama k, v, down_proj (feed-forward down_proj); GPT-2 c_attn, mlp.c_proj.
    suffixes = {"llama": {"k_proj": False, "v_proj": False, "down_proj": True},
                "gpt2": {"c_attn": False, "c_proj": True}}[arch]
    assert len(wrapped) == 2 * len(suffixes)
    for name, layer in adapter_layers(model):
        assert layer.is_feedforward["default"] == suffixes[name.rsplit(".", 1)[-1]]
        assert "attn.c_proj" not in name  # GPT-2's attention output is not a default target


@pytest.mark.parametrize("arch", ARCHS)
def test_forward_matches_plain_formula(arch):
    model = build_model(arch, vocab_size=VOCAB)
    attach_adapter(model, "ia3")
    layers = dict(adapter_layers(model))
    _perturb(adapter_state(model, "default").values())
    out_name, ff_name = {"llama": ("model.layers.0.self_attn.k_proj", "model.layers.0.mlp.down_proj"),
                         "gpt2": ("transformer.h.0.attn.c_attn", "transformer.h.0.mlp.c_proj")}[arch]
    for name, feedforward in ((out_name, False), (ff_name, True)):
        layer = layers[name]
        w = layer.base_layer.weight.detach()
        w = w if arch == "gpt2" else w.T  # (in, out) either way: y = x @ w + b
        b = layer.base_layer.bias if layer.base_layer.bias is not None else torch.zeros(w.shape[1])
        x = torch.randn(3, 5, w.shape[0])
        vec = layer.ia3_l["default"].detach().flatten()
        expected = (x * vec) @ w + b if feedforward else (x @ w + b) * vec
        with torch.no_grad():
            torch.testing.assert_close(layer(x), expected)


@pytest.mark.parametrize("arch", ARCHS)
def test_training_touches_only_the_vectors(arch):
    model = build_model(arch, vocab_size=VOCAB).train()
    attach_adapter(model, "ia3", trainable=True)
    ours = adapter_state(model, "default")
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == set(ours) and all(n.endswith("ia3_l.default") for n in trainable)
    base_before = {n: p.detach().clone() for n, p in base_parameters(model).items()}
    ours_before = {n: p.detach().clone() for n, p in ours.items()}

    objective, batch = CausalLMObjective(), _batch()
    loss, _ = objective(model, batch)
    loss.backward()
    for n, p in model.named_parameters():
        assert (p.grad is not None) == (n in trainable), n
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(3):
        opt.step()
        opt.zero_grad()
        objective(model, batch)[0].backward()
    for n, p in base_parameters(model).items():
        assert torch.equal(p, base_before[n]), n
    assert all(not torch.equal(p, ours_before[n]) for n, p in ours.items())


@pytest.mark.parametrize("arch", ARCHS)
def test_merge_then_unmerge_is_exact(arch):
    model = build_model(arch, vocab_size=VOCAB)
    attach_adapter(model, "ia3")
    _perturb(adapter_state(model, "default").values())
    base_before = {n: p.detach().clone() for n, p in base_parameters(model).items()}
    ids = _ids()
    unmerged = _logits(model, ids)
    merge_adapters(model)
    assert all(layer.merged == ["default"] for _, layer in adapter_layers(model))
    torch.testing.assert_close(_logits(model, ids), unmerged, rtol=0, atol=1e-5)
    unmerge_adapters(model)
    for n, p in base_parameters(model).items():  # GPT-2's c_attn bias included
        assert torch.equal(p, base_before[n]), n
    torch.testing.assert_close(_logits(model, ids), unmerged, rtol=0, atol=0)


@pytest.mark.parametrize("arch", ARCHS)
def test_ours_to_peft(arch, tmp_path):
    from peft import PeftModel

    model = build_model(arch, vocab_size=VOCAB)
    attach_adapter(model, "ia3")
    _perturb(adapter_state(model, "default").values())
    save_adapter(model, tmp_path)
    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    assert saved["peft_type"] == "IA3" and saved["fan_in_fan_out"] == (arch == "gpt2")
    assert saved["feedforward_modules"] == {"llama": ["down_proj"], "gpt2": ["mlp.c_proj"]}[arch]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peft_model = PeftModel.from_pretrained(build_model(arch, vocab_size=VOCAB), tmp_path)
    ids = _ids()
    torch.testing.assert_close(_logits(peft_model, ids), _logits(model, ids))


@pytest.mark.parametrize("arch", ARCHS)
def test_peft_to_ours(arch, tmp_path):
    from peft import IA3Config as PeftIA3Config
    from peft import get_peft_model

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peft_model = get_peft_model(build_model(arch, vocab_size=VOCAB), PeftIA3Config(task_type="CAUSAL_LM"))
    _perturb([p for n, p in peft_model.named_parameters() if "ia3_l" in n])
    peft_model.save_pretrained(tmp_path / "peft")

    model = build_model(arch, vocab_size=VOCAB)
    load_adapter(model, tmp_path / "peft")
    ids = _ids()
    torch.testing.assert_close(_logits(model, ids), _logits(peft_model, ids))

    # Our file has PEFT's exact keys and shapes (e.g. base_model.model.model.layers.0.self_attn.k_proj.ia3_l).
    save_adapter(model, tmp_path / "ours")
    peft_sd = load_file(tmp_path / "peft" / "adapter_model.safetensors")
    our_sd = load_file(tmp_path / "ours" / "adapter_model.safetensors")
    assert {k: v.shape for k, v in our_sd.items()} == {k: v.shape for k, v in peft_sd.items()}
    assert all(k.startswith("base_model.model.") and k.endswith(".ia3_l") for k in our_sd)


def test_explicit_targets_and_config_checks(tmp_path):
    model = build_model("llama", vocab_size=VOCAB)
    cfg = IA3Config(target_modules=["q_proj", "up_proj"], feedforward_modules=["up_proj"])
    attach_adapter(model, "ia3", cfg)
    layers = dict(adapter_layers(model))
    assert isinstance(layers["model.layers.0.mlp.up_proj"], IA3Linear)
    assert layers["model.layers.0.mlp.up_proj"].ia3_l["default"].shape == (1, 64)  # (1, in)
    assert layers["model.layers.0.self_attn.q_proj"].ia3_l["default"].shape == (64, 1)  # (out, 1)
    save_adapter(model, tmp_path)
    fresh = build_model("llama", vocab_size=VOCAB)
    load_adapter(fresh, tmp_path)
    assert set(adapter_state(fresh, "default")) == set(adapter_state(model, "default"))
    with pytest.raises(ValueError, match="subset"):
        IA3Config(target_modules=["k_proj"], feedforward_modules=["down_proj"])


def test_short_training_lowers_the_loss():
    torch.manual_seed(0)
    model = build_model("llama", vocab_size=VOCAB).train()
    attach_adapter(model, "ia3", trainable=True)
    objective, batch = CausalLMObjective(), _batch(seed=4, batch=4, length=16)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=5e-2)
    losses = []
    for _ in range(30):
        loss = objective(model, batch)[0] / objective.units(batch)
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.1, losses
