"""A quantized frozen base (models/quantize.py): the layers against a plain dequantize-then-matmul
reference, round-trip error bounds, adapters training on top without an fp32 copy of the base, mixed
per-row batches, the server, merge refusals and the errors."""
import json

import pytest
import torch
from torch import nn
from torch.nn import functional as F

import plugtune
from plugtune.adapters import adapter_state, attach_adapter, save_adapter
from plugtune.adapters.layers import adapter_layers, mark_trainable, merge_adapters, set_active_adapters
from plugtune.adapters.merge import fold_into_base
from plugtune.adapters.mixed import mixed_adapters
from plugtune.cli import main
from plugtune.models import quantize as qmod
from plugtune.models.quantize import (INT4_GROUP, Int4Linear, Int8Linear, QuantizationError, QuantizedLinear,
                                      check_scheme, quantization_of, quantize_model, quantized_layers)
from plugtune.models.tiny import build_model
from tests.conftest import random_batch


def weight(out=48, inp=128, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(out, inp, generator=g) * 0.05


def ref_int8(layer: Int8Linear) -> torch.Tensor:
    """The plain formula W ~= q * s_row, from the stored buffers."""
    return layer.qweight.float() * layer.scales[:, None]


def ref_int4(layer: Int4Linear) -> torch.Tensor:
    """Unpack by hand (low nibble = even column), then W ~= q * s_group + lo_group."""
    out, half = layer.qweight.shape
    q = torch.empty(out, half * 2)
    q[:, 0::2] = (layer.qweight % 16).float()
    q[:, 1::2] = (layer.qweight // 16).float()
    s = layer.scales.repeat_interleave(INT4_GROUP, dim=1)
    lo = layer.offsets.repeat_interleave(INT4_GROUP, dim=1)
    return q * s + lo


@pytest.mark.parametrize("cls,ref", [(Int8Linear, ref_int8), (Int4Linear, ref_int4)])
def test_quantized_linear_equals_dequantize_then_matmul(cls, ref):
    w, b = weight(), torch.randn(48)
    layer = cls(w, b)
    x = torch.randn(3, 5, 128)
    expected = F.linear(x, ref(layer), b)
    if cls is Int8Linear and layer._packed is not None:
        # fbgemm quantizes the activations too (8 bits, one scale per call): ~1% of the output's size.
        err = ((layer(x) - expected).norm() / (expected - b).norm()).item()
        assert 1e-4 < err < 0.02, err
        layer._packed, layer._qweight = None, layer.qweight  # the plain path: exactly the reference
    torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(layer.weight, ref(layer))
    # The gradient w.r.t. the input (what adapters below this layer need) is that of the reference.
    x.requires_grad_(True)
    layer(x).square().sum().backward()
    x_ref = x.detach().clone().requires_grad_(True)
    F.linear(x_ref, ref(layer), b).square().sum().backward()
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=1e-5, atol=1e-5)


def test_int8_keeps_only_the_packed_weight_on_x86():
    layer = Int8Linear(weight())
    if not qmod.fbgemm_available(torch.device("cpu")):
        pytest.skip("no fbgemm on this CPU")
    assert layer._qweight is None and [n for n, _ in layer.named_buffers()] == ["scales"]
    assert layer.qweight.dtype == torch.int8 and layer.storage_bytes() == 48 * 128 + 48 * 4


def test_round_trip_error_is_within_half_a_step():
    w = weight(out=64, inp=256, seed=1)
    i8, i4 = Int8Linear(w), Int4Linear(w)
    # int8: |W - q s| <= s / 2 per row; int4: <= s / 2 per group (plus float rounding).
    assert ((w - i8.dequantize()).abs() <= i8.scales[:, None] / 2 * (1 + 1e-5)).all()
    s4 = i4.scales.repeat_interleave(INT4_GROUP, dim=1)
    assert ((w - i4.dequantize()).abs() <= s4 / 2 * (1 + 1e-4) + 1e-7).all()
    rel8 = ((w - i8.dequantize()).norm() / w.norm()).item()
    rel4 = ((w - i4.dequantize()).norm() / w.norm()).item()
    assert rel8 < 0.01 and rel4 < 0.12 and rel8 < rel4
    assert i8.qweight.dtype == torch.int8 and i8.qweight.numel() == w.numel()  # 1 byte per weight
    assert i4.qweight.dtype == torch.uint8 and i4.qweight.numel() == w.numel() // 2  # 2 weights per byte


@pytest.mark.parametrize("arch,count", [("llama", 14), ("gpt2", 8)])
def test_quantize_model_replaces_linear_layers_but_the_head(arch, count):
    model = build_model(arch)
    ids = torch.randint(3, 400, (2, 9))
    with torch.no_grad():
        ref = model(ids).logits
        quantize_model(model, "int8")
        out = model(ids).logits
    assert len(quantized_layers(model)) == count and quantization_of(model) == "int8"
    assert isinstance(model.get_output_embeddings(), nn.Linear)  # lm_head skipped (tied to the embeddings)
    assert (out - ref).abs().max() < 0.02 * ref.abs().max()
    assert (out - ref).abs().max() > 0  # it did quantize


def base_state(model):
    """Every quantized layer's buffers, keyed by the layer object (names change when adapters wrap it)."""
    return {id(m): {k: v.clone() for k, v in m.state_dict().items()} for _, m in quantized_layers(model)}


def no_fp32_copy_of_the_base(model):
    """The only full-size float tensors left are the (unquantized) embeddings / norms; no quantized
    layer has a float tensor of its weight's size, and no parameter or buffer anywhere has that shape."""
    shapes = {(m.out_features, m.in_features) for _, m in quantized_layers(model)}
    shapes |= {(i, o) for o, i in shapes}
    for name, t in [*model.named_parameters(), *model.named_buffers()]:
        if t.is_floating_point():
            assert tuple(t.shape) not in shapes, name
    for _, m in quantized_layers(model):
        floats = sum(t.numel() for t in m.buffers() if t.is_floating_point())
        assert floats <= m.out_features * m.in_features // 16 + m.out_features


CASES = {
    "lora": ("lora", {"r": 4, "alpha": 8, "target_modules": "all-linear"}),
    "rslora": ("lora", {"r": 4, "alpha": 8, "use_rslora": True}),
    "dora": ("lora", {"r": 4, "alpha": 8, "use_dora": True}),
    "ia3": ("ia3", {}),
    "bottleneck": ("bottleneck", {"reduction_factor": 4}),
}


@pytest.mark.parametrize("scheme", ["int8", "int4"])
@pytest.mark.parametrize("case", list(CASES))
def test_adapters_train_on_a_quantized_base(case, scheme):
    method, cfg = CASES[case]
    torch.manual_seed(0)
    model = quantize_model(build_model("llama"), scheme)
    before = base_state(model)
    attach_adapter(model, method, cfg, name="default")
    trainable = mark_trainable(model, "default")
    params = [p for p in model.parameters() if p.requires_grad]
    assert trainable == sum(p.numel() for p in adapter_state(model, "default").values()) > 0
    opt = torch.optim.AdamW(params, lr=2e-2 if method != "ia3" else 1e-1)
    batch = random_batch(400, batch=4, length=16)
    losses = []
    for _ in range(8):
        loss = model(**batch).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.01
    after = base_state(model)
    assert before.keys() == after.keys()
    for key, state in before.items():
        for name, t in state.items():
            assert torch.equal(t, after[key][name]), name  # the base never changes
    assert not any(b.requires_grad for b in model.buffers())
    no_fp32_copy_of_the_base(model)


def test_full_base_memory_is_a_quarter_or_less():
    model = build_model("llama", hidden=128)
    linear_bytes = sum(m.weight.numel() * 4 for n, m in model.named_modules()
                       if isinstance(m, nn.Linear) and "lm_head" not in n)
    for scheme, most in [("int8", 0.27), ("int4", 0.16)]:
        q = quantize_model(build_model("llama", hidden=128), scheme)
        stored = sum(m.storage_bytes() for _, m in quantized_layers(q))
        assert stored <= most * linear_bytes, (scheme, stored / linear_bytes)


def two_lora_model(scheme):
    torch.manual_seed(0)
    model = quantize_model(build_model("llama"), scheme)
    for k, name in enumerate(["a", "b"]):
        attach_adapter(model, "lora", {"r": 4, "target_modules": "all-linear"}, name=name)
        g = torch.Generator().manual_seed(k + 1)
        with torch.no_grad():
            for p in adapter_state(model, name).values():
                p.add_(torch.randn(p.shape, generator=g) * 0.2)
    attach_adapter(model, "ia3", {}, name="c")
    with torch.no_grad():
        for p in adapter_state(model, "c").values():
            p.mul_(1.5)
    return model.eval()


@pytest.mark.parametrize("scheme", ["int8", "int4"])
def test_mixed_batch_on_a_quantized_base_equals_each_adapter_alone(scheme):
    model = two_lora_model(scheme)
    ids = random_batch(400, batch=5, length=10)["input_ids"]
    names = ["a", None, "b", "c", "a"]
    with torch.no_grad():
        with mixed_adapters(model, names):
            mixed = model(ids).logits
        alone = []
        for i, name in enumerate(names):
            set_active_adapters(model, name)
            alone.append(model(ids[i:i + 1]).logits)
    torch.testing.assert_close(mixed, torch.cat(alone), rtol=1e-4, atol=1e-4)
    assert not torch.allclose(alone[0], alone[2])  # the adapters differ


@pytest.fixture(scope="module")
def adapter_dirs(tiny_model_dir, tmp_path_factory):
    top = tmp_path_factory.mktemp("qadapters")
    for seed, name in enumerate(["a", "b"], start=1):
        lm = plugtune.load(str(tiny_model_dir))
        attach_adapter(lm.model, "lora", {"r": 4}, name=name)
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for p in adapter_state(lm.model, name).values():
                p.add_(torch.randn(p.shape, generator=g) * 0.3)
        save_adapter(lm.model, top / name, name)
    return top


def test_serve_engine_answers_on_a_quantized_base(tiny_model_dir, adapter_dirs):
    from plugtune.data.tokenize import prompt_ids
    from plugtune.inference.generate import GenerationConfig, generate
    from plugtune.serve.engine import Engine, Request

    lm = plugtune.load(str(tiny_model_dir), adapter={n: adapter_dirs / n for n in "ab"}, quantize="int8")
    lm.use(None)
    assert quantization_of(lm.model) == "int8"
    prompts, names = ["hello world", "convert 3 km", "what is the date"], ["a", "b", None]
    cfg = GenerationConfig(max_new_tokens=8)
    expected = [generate(lm.model, lm.tokenizer, [p], cfg, adapter_names=[n])[0] for p, n in zip(prompts, names)]
    engine = Engine(lm.model, lm.tokenizer, max_batch=4).start()
    try:
        engine.pause()
        handles = [engine.submit(Request(prompt_ids(lm.tokenizer, [{"role": "user", "content": p}]), n, cfg))
                   for p, n in zip(prompts, names)]
        engine.resume()
        outs = [h.result(timeout=60) for h in handles]
    finally:
        engine.shutdown()
    assert [o.text for o in outs] == expected
    assert all(o.completion_tokens == 8 for o in outs) and len(set(expected)) > 1


def test_serve_cli_loads_a_quantized_base(tiny_model_dir, adapter_dirs):
    import argparse

    from plugtune.serve.cli import add_serve_args, build_app, startup_lines

    p = argparse.ArgumentParser()
    add_serve_args(p)
    args = p.parse_args(["--model", str(tiny_model_dir), "--adapter", f"a={adapter_dirs / 'a'}", "--quantize", "int4"])
    app, settings, lm = build_app(args)
    assert quantization_of(lm.model) == "int4"
    assert any("base weights: int4" in line for line in startup_lines(args, settings, lm))


def test_merge_into_a_quantized_base_is_refused(tiny_model_dir, adapter_dirs, tmp_path, capsys):
    model = two_lora_model("int8")
    with pytest.raises(RuntimeError, match=r"quantized base \(int8\).*quantize=none"):
        merge_adapters(model, ["a"])
    assert not any(layer.merged for _, layer in adapter_layers(model))  # nothing half-merged
    with pytest.raises(RuntimeError, match="quantized base"):
        merge_adapters(model, ["c"])  # IA3 too (it would also rescale the bias)
    with pytest.raises(ValueError, match=r"base is quantized \(int8\).*quantize=none"):
        fold_into_base(model, "a")
    out = tmp_path / "merged"
    assert main(["merge", "--model", str(tiny_model_dir), "--adapter", str(adapter_dirs / "a"), "--out", str(out),
                 "--quantize", "int8"]) == 2
    assert "base is quantized (int8)" in capsys.readouterr().err and not out.exists()


def test_train_a_lora_through_the_config_on_an_int8_base(tiny_model_dir, tmp_path):
    from plugtune.config import load_run_config

    rows = [{"messages": [{"role": "user", "content": f"what is {i}"}, {"role": "assistant", "content": f"{i % 7}"}]}
            for i in range(16)]
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = load_run_config("lora_sft", [f"model.name={tiny_model_dir}", f"data.train={data}", "model.quantize=int8",
                                       f"output.dir={tmp_path / 'run'}", "training.max_steps=3", "training.batch_size=4",
                                       "training.progress=false", "output.plot=false", "adapter.r=4"])
    report = plugtune.train(cfg)
    assert report.steps == 3 and report.trainable_params > 0
    lm = plugtune.load(str(tiny_model_dir), adapter=report.artifact, quantize="int8")  # the adapter loads back
    assert quantization_of(lm.model) == "int8" and lm.generate(["what is 3"], cfg=None)
    plugtune.load(str(tiny_model_dir), adapter=report.artifact)  # and on the fp32 base: same base fingerprint


# Errors ----------------------------------------------------------------------------------------------------
def test_unknown_scheme_is_refused_everywhere(tiny_model_dir, capsys):
    from plugtune.config import load_run_config
    from plugtune.schema import ConfigError

    with pytest.raises(QuantizationError, match="unknown quantization 'fp8': use one of none, int8, int4, nf4"):
        quantize_model(build_model("llama"), "fp8")
    with pytest.raises(ConfigError, match="model.quantize='int3' is not one of none, int8, int4, nf4"):
        load_run_config("lora_sft", ["model.quantize=int3"])
    assert main(["generate", "--model", str(tiny_model_dir), "--prompt", "hi", "--quantize", "int2"]) == 2
    assert "unknown quantization 'int2'" in capsys.readouterr().err


def test_full_fine_tuning_on_a_quantized_base_is_refused():
    from plugtune.config import load_run_config
    from plugtune.schema import ConfigError

    with pytest.raises(ConfigError, match="method=full trains every base weight: use an adapter method"):
        load_run_config("full_finetune", ["model.quantize=int8"])


def test_nf4_on_cpu_names_the_fix(tiny_model_dir):
    with pytest.raises(QuantizationError, match="nf4 needs a CUDA GPU.*On CPU use quantize=int4"):
        check_scheme("nf4", "cpu")
    with pytest.raises(QuantizationError, match="nf4 needs a CUDA GPU"):
        plugtune.load(str(tiny_model_dir), quantize="nf4", device="cpu")
    with pytest.raises(QuantizationError, match="nf4 needs a CUDA GPU"):
        quantize_model(build_model("llama"), "nf4")


def test_a_device_without_a_kernel_and_a_missing_backend(monkeypatch):
    with pytest.raises(QuantizationError, match="quantize=int8 has no kernel for device 'mps'.*or quantize=none"):
        check_scheme("int8", "mps")
    with pytest.raises(QuantizationError, match="quantize=nf4 has no kernel for device 'xpu'"):
        check_scheme("nf4", "xpu")
    # On CUDA without bitsandbytes (checked by name, so this runs on a machine without a GPU too).
    real = qmod.importlib.util.find_spec
    monkeypatch.setattr(qmod.importlib.util, "find_spec", lambda n, *a: None if n == "bitsandbytes" else real(n, *a))
    with pytest.raises(QuantizationError, match=r"needs the bitsandbytes package: pip install 'plugtune\[quantize\]'"):
        check_scheme("nf4", "cuda")
    check_scheme("int8", "cuda")  # plain PyTorch: no extra package


def test_int4_needs_whole_groups():
    with pytest.raises(QuantizationError, match="multiple of the group size.*quantize=int8"):
        Int4Linear(torch.randn(8, 100))


def test_quantized_layers_are_not_trainable():
    layer = Int8Linear(weight())
    assert list(layer.parameters()) == [] and isinstance(layer, QuantizedLinear)


def test_modules_to_save_on_a_quantized_module_is_refused():
    model = quantize_model(build_model("llama"), "int8")
    with pytest.raises(ValueError, match="train a copy of a quantized module"):
        attach_adapter(model, "lora", {"r": 4, "modules_to_save": ["down_proj"]}, name="x")
