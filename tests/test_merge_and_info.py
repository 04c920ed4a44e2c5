"""`plugtune merge` writes a model plain transformers loads with the same logits; `adapters info`."""
import json

import pytest
import torch

from plugtune.adapters import adapter_state, attach_adapter, save_adapter
from plugtune.cli import main


def make_adapter(model_dir, out, method, cfg):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir)
    attach_adapter(model, method, cfg)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in adapter_state(model, "default").values():
            p.add_(torch.randn(p.shape, generator=g) * 0.1)
    save_adapter(model, out)
    return model


@pytest.mark.parametrize("method,cfg", [("lora", {"r": 4}), ("lora", {"r": 4, "use_dora": True,
                                                                          "target_modules": "all-linear"}),
                                        ("ia3", {})])
def test_merge_command_writes_a_plain_transformers_model(tmp_path, tiny_model_dir, method, cfg):
    from transformers import AutoModelForCausalLM

    adapted = make_adapter(tiny_model_dir, tmp_path / "adapter", method, cfg)
    assert main(["merge", "--model", str(tiny_model_dir), "--adapter", str(tmp_path / "adapter"),
                 "--out", str(tmp_path / "merged")]) == 0
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")  # no plugtune classes involved
    assert not any("lora" in k or "ia3" in k or "base_layer" in k for k in merged.state_dict())
    x = torch.randint(3, 400, (2, 9))
    torch.testing.assert_close(merged(x).logits, adapted(x).logits, rtol=1e-4, atol=1e-5)


def test_merge_refuses_non_mergeable_methods(tmp_path, tiny_model_dir, capsys):
    make_adapter(tiny_model_dir, tmp_path / "adapter", "bottleneck", {"variant": "pfeiffer"})
    assert main(["merge", "--model", str(tiny_model_dir), "--adapter", str(tmp_path / "adapter"),
                 "--out", str(tmp_path / "merged")]) == 2
    assert "cannot be folded" in capsys.readouterr().err
    assert not (tmp_path / "merged").exists()


def test_adapters_info_lists_every_method(tmp_path, tiny_model_dir, capsys):
    from plugtune.adapters import available_methods

    out = tmp_path / "info.json"
    assert main(["adapters", "info", "--model", str(tiny_model_dir), "--repeats", "1", "--seq-len", "8",
                 "--json", str(out)]) == 0
    rows = json.loads(out.read_text())
    assert {r["method"] for r in rows} == set(available_methods())
    lora = next(r for r in rows if r["variant"] == "lora r=8")
    assert lora["trainable_params"] == 2 * 2 * 8 * (64 + 64) + 2 * 2 * 8 * (64 + 32)  # q,o: 64->64; k,v: 64->32
    from plugtune.adapters import get_method

    assert all((r["merged_ms"] is None) == (not get_method(r["method"]).can_merge) for r in rows)
    assert "pfeiffer" in capsys.readouterr().out
