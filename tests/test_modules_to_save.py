"""modules_to_save: a classifier head trained whole beside an adapter. PEFT parity both ways (file keys
and logits), only adapter + head copy train, the original head is untouched, save/load, merge/unwrap."""
import copy

import pytest
import torch
from safetensors.torch import load_file

from plugtune.adapters import (adapter_state, adapters_disabled, attach_adapter, load_adapter, merge_adapters,
                               save_adapter, unwrap_merged)
from plugtune.adapters.modules_to_save import ModulesToSave
from plugtune.models.tiny import build_classifier

VOCAB = 100
HEADS = {"bert": "classifier", "llama": "score"}
TARGETS = {"bert": ["query", "value"], "llama": ["q_proj", "v_proj"]}


def perturb(named_params, scale=0.1, seed=1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in named_params:
            p.add_(torch.randn(p.shape, generator=g) * scale)


def inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, VOCAB, (3, 9), generator=g)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


@pytest.mark.parametrize("arch", ["bert", "llama"])
@pytest.mark.parametrize("method,cfg", [("lora", {"r": 4, "alpha": 8}), ("ia3", {"init_ia3_weights": False})])
def test_plugtune_adapter_loads_in_peft(tmp_path, arch, method, cfg):
    peft = pytest.importorskip("peft")
    model = build_classifier(arch, VOCAB)
    attach_adapter(model, method, {**cfg, "modules_to_save": [HEADS[arch]]})
    perturb(adapter_state(model, "default").items())
    save_adapter(model, tmp_path)
    keys = set(load_file(str(tmp_path / "adapter_model.safetensors")))
    assert {f"base_model.model.{HEADS[arch]}.weight"} <= keys  # the copy under the head's own name
    assert not any("modules_to_save" in k or "default" in k for k in keys)
    peft_model = peft.PeftModel.from_pretrained(build_classifier(arch, VOCAB), tmp_path)
    torch.testing.assert_close(peft_model(**inputs()).logits, model(**inputs()).logits)


@pytest.mark.parametrize("arch", ["bert", "llama"])
def test_peft_adapter_loads_in_plugtune_with_the_same_keys(tmp_path, arch):
    peft = pytest.importorskip("peft")
    # task_type=SEQ_CLS makes PEFT add ['classifier', 'score'] to modules_to_save itself.
    peft_cfg = peft.LoraConfig(task_type="SEQ_CLS", r=4, lora_alpha=8, target_modules=TARGETS[arch])
    peft_model = peft.get_peft_model(build_classifier(arch, VOCAB), peft_cfg)
    perturb((n, p) for n, p in peft_model.named_parameters() if p.requires_grad)
    peft_model.save_pretrained(tmp_path / "peft")
    ours = load_adapter(build_classifier(arch, VOCAB), tmp_path / "peft")
    torch.testing.assert_close(ours(**inputs()).logits, peft_model(**inputs()).logits)
    save_adapter(ours, tmp_path / "ours")  # and what we write back has exactly PEFT's keys
    theirs = load_file(str(tmp_path / "peft" / "adapter_model.safetensors"))
    assert set(load_file(str(tmp_path / "ours" / "adapter_model.safetensors"))) == set(theirs)


@pytest.mark.parametrize("method,cfg", [("lora", {"r": 4}), ("bottleneck", {"variant": "pfeiffer"})])
def test_only_adapter_and_head_copy_train_and_the_original_head_is_untouched(method, cfg):
    model = build_classifier("bert", VOCAB)
    fresh = copy.deepcopy(model)
    base_before = {k: v.clone() for k, v in model.state_dict().items()}
    wrapped = attach_adapter(model, method, {**cfg, "modules_to_save": ["classifier"]})
    assert "classifier" in wrapped and isinstance(model.classifier, ModulesToSave)
    trainable = {k for k, p in model.named_parameters() if p.requires_grad}
    assert trainable == set(adapter_state(model, "default"))
    assert {"classifier.modules_to_save.default.weight", "classifier.modules_to_save.default.bias"} <= trainable
    # The method never adapts inside the copied head, even when asked for every linear layer.
    assert not any("classifier" in n for n in attach_adapter(build_classifier("bert", VOCAB), "lora",
                                                             {"target_modules": "all-linear",
                                                              "modules_to_save": ["classifier"]})[:-1])
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    labels = torch.tensor([0, 3, 4])
    model.train()
    for _ in range(3):
        torch.nn.functional.cross_entropy(model(**inputs()).logits, labels).backward()
        opt.step()
        opt.zero_grad()
    model.eval()
    after = {k.replace(".base_layer", ""): v for k, v in model.state_dict().items()
             if not any(s in k for s in ("modules_to_save", "lora_", "adapter_"))}
    assert set(after) == set(base_before)
    for k, v in base_before.items():
        assert torch.equal(after[k], v), f"base parameter {k} changed"
    head = model.classifier.modules_to_save["default"]
    assert not torch.equal(head.weight, model.classifier.base_layer.weight), "the head copy should have trained"
    with adapters_disabled(model):  # the bare base, original head included
        torch.testing.assert_close(model(**inputs()).logits, fresh(**inputs()).logits)


def test_save_load_round_trip_merge_and_unwrap(tmp_path):
    model = build_classifier("bert", VOCAB)
    attach_adapter(model, "lora", {"r": 4, "modules_to_save": ["classifier"]})
    perturb(adapter_state(model, "default").items())
    expected = model(**inputs()).logits
    save_adapter(model, tmp_path)
    loaded = load_adapter(build_classifier("bert", VOCAB), tmp_path)
    assert loaded.classifier.configs["default"].modules_to_save == ["classifier"]
    torch.testing.assert_close(loaded(**inputs()).logits, expected)
    merge_adapters(loaded)
    plain = unwrap_merged(loaded)
    assert type(plain.classifier) is torch.nn.Linear and not any("lora" in k for k in plain.state_dict())
    torch.testing.assert_close(plain(**inputs()).logits, expected, rtol=1e-5, atol=1e-5)


def test_bad_entry_is_a_clear_error_and_leaves_the_model_bare():
    model = build_classifier("bert", VOCAB)
    with pytest.raises(ValueError, match="modules_to_save.*matched no module"):
        attach_adapter(model, "lora", {"modules_to_save": ["clasifier"]})
    with pytest.raises(ValueError, match="matched no module"):  # the method fails after the head was copied
        attach_adapter(model, "lora", {"target_modules": ["nope"], "modules_to_save": ["classifier"]})
    assert type(model.classifier) is torch.nn.Linear
