"""Bottleneck adapters (Houlsby / Pfeiffer): identity at init, sites and parameter counts, the plain
formula, training touches only the adapters and lowers the loss, save/load round trip, no merging."""
import json

import pytest
import torch

from plugtune.adapters import (adapter_layers, adapter_state, attach_adapter, load_adapter, merge_adapters,
                               save_adapter)
from plugtune.adapters.layers import base_parameters
from plugtune.adapters.methods.bottleneck import BottleneckAdapter, BottleneckConfig
from plugtune.models.tiny import build_model
from plugtune.training.compute.next_token import CausalLMObjective

ARCHS = ["llama", "gpt2"]
VARIANTS = ["houlsby", "pfeiffer"]
VOCAB, HIDDEN, LAYERS = 400, 64, 2
# Per layer: module-name tails of the adapted projections.
SITES = {("llama", "houlsby"): {"self_attn.o_proj", "mlp.down_proj"}, ("llama", "pfeiffer"): {"mlp.down_proj"},
         ("gpt2", "houlsby"): {"attn.c_proj", "mlp.c_proj"}, ("gpt2", "pfeiffer"): {"mlp.c_proj"}}


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
            p.add_(0.1 * torch.randn(p.shape, generator=g))


def _batch(seed=3, batch=4, length=16):
    ids = _ids(seed, batch, length)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("arch", ARCHS)
def test_identity_at_init_sites_and_param_count(arch, variant):
    base, model = build_model(arch, vocab_size=VOCAB), build_model(arch, vocab_size=VOCAB)
    cfg = BottleneckConfig(variant=variant, reduction_factor=8, non_linearity="gelu")
    wrapped = attach_adapter(model, "bottleneck", cfg)
    ids = _ids()
    torch.testing.assert_close(_logits(model, ids), _logits(base, ids), rtol=0, atol=0)

    # Houlsby: 2 sites per layer (attention output + MLP output); Pfeiffer: 1 (MLP output).
    sites = SITES[(arch, variant)]
    assert len(wrapped) == LAYERS * len(sites)
    assert {n.split(".", 3)[-1] for n in wrapped} == sites  # 'model.layers.0.mlp.down_proj' -> 'mlp.down_proj'
    assert all(isinstance(layer, BottleneckAdapter) for _, layer in adapter_layers(model))

    # Per site: W_down (m, d) + b_down (m) + W_up (d, m) + b_up (d), m = d // reduction_factor.
    m = HIDDEN // 8
    per_site = 2 * HIDDEN * m + m + HIDDEN
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert trainable == len(wrapped) * per_site
    names = set(adapter_state(model, "default"))
    assert f"{wrapped[0]}.adapter_down.default.weight" in names and f"{wrapped[0]}.adapter_up.default.bias" in names


def test_bert_sites_by_name():
    """BERT's FFN output `layer.N.output.dense` is the Pfeiffer site, not `attention.output.dense`."""
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    bert = BertModel(BertConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                intermediate_size=64))
    pfeiffer = attach_adapter(bert, "bottleneck", {"variant": "pfeiffer"}, name="p")
    assert pfeiffer == ["encoder.layer.0.output.dense", "encoder.layer.1.output.dense"]
    torch.manual_seed(0)
    bert = BertModel(bert.config)
    houlsby = attach_adapter(bert, "bottleneck", {"variant": "houlsby", "reduction_factor": 4})
    assert houlsby == ["encoder.layer.0.attention.output.dense", "encoder.layer.0.output.dense",
                       "encoder.layer.1.attention.output.dense", "encoder.layer.1.output.dense"]


@pytest.mark.parametrize("residual", [True, False])
@pytest.mark.parametrize("arch", ARCHS)
def test_forward_matches_plain_formula(arch, residual):
    model = build_model(arch, vocab_size=VOCAB)
    attach_adapter(model, "bottleneck", {"variant": "pfeiffer", "non_linearity": "tanh", "residual": residual,
                                         "reduction_factor": 4})
    _perturb(adapter_state(model, "default").values())
    layer = next(layer for _, layer in adapter_layers(model))
    x = torch.randn(3, 5, HIDDEN * (4 if arch == "gpt2" else 2))  # the MLP's inner width
    down, up = layer.adapter_down["default"], layer.adapter_up["default"]
    with torch.no_grad():
        h = layer.base_layer(x)
        delta = torch.tanh(h @ down.weight.T + down.bias) @ up.weight.T + up.bias
        torch.testing.assert_close(layer(x), h + delta if residual else delta)


@pytest.mark.parametrize("arch", ARCHS)
def test_training_touches_only_the_adapters(arch):
    model = build_model(arch, vocab_size=VOCAB).train()
    attach_adapter(model, "bottleneck", {"variant": "houlsby"}, trainable=True)
    ours = adapter_state(model, "default")
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == set(ours)
    base_before = {n: p.detach().clone() for n, p in base_parameters(model).items()}
    ours_before = {n: p.detach().clone() for n, p in ours.items()}

    objective, batch = CausalLMObjective(), _batch()
    objective(model, batch)[0].backward()
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
def test_save_load_round_trip(arch, tmp_path):
    model = build_model(arch, vocab_size=VOCAB)
    cfg = {"variant": "houlsby", "reduction_factor": 4, "non_linearity": "silu"}
    attach_adapter(model, "bottleneck", cfg)
    _perturb(adapter_state(model, "default").values())
    save_adapter(model, tmp_path)
    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    assert saved["method"] == "bottleneck" and saved["variant"] == "houlsby" and saved["non_linearity"] == "silu"

    fresh = build_model(arch, vocab_size=VOCAB)
    load_adapter(fresh, tmp_path, name="loaded")
    ids = _ids()
    assert not torch.equal(_logits(model, ids), _logits(build_model(arch, vocab_size=VOCAB), ids))
    torch.testing.assert_close(_logits(fresh, ids), _logits(model, ids), rtol=0, atol=0)


def test_cannot_merge_and_bad_configs():
    model = build_model("llama", vocab_size=VOCAB)
    attach_adapter(model, "bottleneck", {"variant": "pfeiffer"})
    with pytest.raises(TypeError, match="cannot be merged"):
        merge_adapters(model)
    for bad in ({"variant": "parallel"}, {"non_linearity": "swish"}, {"reduction_factor": 0}):
        with pytest.raises(ValueError):
            BottleneckConfig(**bad)
    with pytest.raises(ValueError, match="no bottleneck"):
        attach_adapter(build_model("llama", vocab_size=VOCAB), "bottleneck", {"reduction_factor": 128})


@pytest.mark.parametrize("variant", VARIANTS)
def test_short_training_lowers_the_loss(variant):
    torch.manual_seed(0)
    model = build_model("llama", vocab_size=VOCAB).train()
    attach_adapter(model, "bottleneck", {"variant": variant, "reduction_factor": 4}, trainable=True)
    objective, batch = CausalLMObjective(), _batch(seed=4, batch=4, length=16)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for _ in range(30):
        loss = objective(model, batch)[0] / objective.units(batch)
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.1, losses
