"""The adapter pool: plugtune.load with several adapters, add/remove at run time, use(), per-prompt
adapters in generate, info(), and the memory promise (no adapter left: exactly the base)."""
import shutil

import pytest
import torch

import plugtune
from plugtune.adapters import AdapterMismatchError, adapter_state, attach_adapter, load_adapter, save_adapter
from plugtune.adapters.layers import AdapterLayer, set_active_adapters
from plugtune.inference.generate import GenerationConfig
from plugtune.models.causal_lm import forward_logits
from plugtune.models.loading import load_base
from plugtune.models.tiny import save_tiny_model_dir

SPECS = {"x": ("lora", {"r": 4, "alpha": 8}), "y": ("bottleneck", {"reduction_factor": 8}),
         "z": ("prompt_tuning", {"num_virtual_tokens": 3}), "w": ("ia3", {})}
PROMPTS = ["hello world", "what is the date", "convert 3 km", "the quick brown fox", "answer question", "May 1"]
CFG = GenerationConfig(max_new_tokens=5)


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny matmuls: a second thread only adds synchronisation (and stalls on a busy machine)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def base_model(model_dir):
    return load_base(str(model_dir), device="cpu").model


def make_adapter(model_dir, out, name, seed=0):
    model = base_model(model_dir)
    method, cfg = SPECS[name]
    attach_adapter(model, method, cfg, name=name)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # large random weights: adapters that visibly change what the model says
        for p in adapter_state(model, name).values():
            p.add_(torch.randn(p.shape, generator=g) * 0.5)
    return save_adapter(model, out, name=name)


@pytest.fixture(scope="module")
def saved(tiny_model_dir, tmp_path_factory):
    """name -> directory of a saved adapter for the tiny base."""
    root = tmp_path_factory.mktemp("adapters")
    return {name: make_adapter(tiny_model_dir, root / name, name, seed) for seed, name in enumerate(SPECS)}


@pytest.fixture(scope="module")
def batch():
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, 300, (3, 8), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 5:] = 0
    return ids, mask


def reference(model_dir, saved, names, batch):
    """Logits of a fresh base that loaded only `names` (all active)."""
    model = base_model(model_dir)
    for name in names:
        load_adapter(model, saved[name], name=name)
    set_active_adapters(model, names)
    with torch.no_grad():
        return forward_logits(model, *batch)


def logits(lm, batch):
    with torch.no_grad():
        return forward_logits(lm.model, *batch)


def test_load_several_adapters_and_switch_between_them(tiny_model_dir, saved, batch):
    lm = plugtune.load(str(tiny_model_dir), adapter={"x": saved["x"], "y": saved["y"]}, device="cpu")
    assert lm.adapters == ["x", "y"] and lm.active == []  # several given: none active until use()
    torch.testing.assert_close(logits(lm, batch), reference(tiny_model_dir, saved, [], batch), rtol=0, atol=0)
    for names in (["x"], ["y"], ["x", "y"]):
        lm.use(names if len(names) > 1 else names[0])
        assert lm.active == names
        torch.testing.assert_close(logits(lm, batch), reference(tiny_model_dir, saved, names, batch))
    assert not torch.allclose(logits(lm.use("x"), batch), logits(lm.use("y"), batch), atol=1e-3)
    lm.use(None)
    torch.testing.assert_close(logits(lm, batch), reference(tiny_model_dir, saved, [], batch), rtol=0, atol=0)
    one = plugtune.load(str(tiny_model_dir), adapter=saved["z"], device="cpu")  # one adapter: 'default', active
    assert one.adapters == ["default"] and one.active == ["default"]
    torch.testing.assert_close(logits(one, batch), reference(tiny_model_dir, saved, ["z"], batch))


def test_add_and_remove_at_run_time_and_memory_returns_to_the_base(tiny_model_dir, saved, batch):
    base = base_model(tiny_model_dir)
    base_state = base.state_dict()
    lm = plugtune.load(str(tiny_model_dir), adapter={"x": saved["x"]}, use="x", device="cpu")
    lm.add_adapter("z", saved["z"]).add_adapter("w", saved["w"])
    assert sorted(lm.adapters) == ["w", "x", "z"] and lm.active == ["x"]  # added adapters load inactive
    torch.testing.assert_close(logits(lm, batch), reference(tiny_model_dir, saved, ["x"], batch))
    lm.use("z")
    torch.testing.assert_close(logits(lm, batch), reference(tiny_model_dir, saved, ["z"], batch))
    lm.remove_adapter("z")  # the active one: nothing active is left
    assert sorted(lm.adapters) == ["w", "x"] and lm.active == [] and not hasattr(lm.model, "prompt_encoder")
    torch.testing.assert_close(logits(lm, batch), reference(tiny_model_dir, saved, [], batch), rtol=0, atol=0)
    lm.use("w")
    torch.testing.assert_close(logits(lm, batch), reference(tiny_model_dir, saved, ["w"], batch))
    lm.remove_adapter("x").remove_adapter("w")
    assert lm.adapters == [] and lm.info() == []
    assert not any(isinstance(m, AdapterLayer) for m in lm.model.modules())
    assert sum(p.numel() for p in lm.model.parameters()) == sum(p.numel() for p in base.parameters())
    state = lm.model.state_dict()
    assert state.keys() == base_state.keys() and all(torch.equal(state[k], v) for k, v in base_state.items())
    with pytest.raises(KeyError, match="no adapter named 'x'"):
        lm.remove_adapter("x")


def test_generate_with_per_prompt_adapters_equals_use(tiny_model_dir, saved):
    lm = plugtune.load(str(tiny_model_dir), adapter={n: saved[n] for n in "xyzw"}, device="cpu")
    names = ["x", None, "y", "z", "w", "x"]
    got = lm.generate(PROMPTS, adapters=names, cfg=CFG)
    want, base = [], []
    for prompt, name in zip(PROMPTS, names):
        want += lm.use(name).generate([prompt], cfg=CFG)
        base += lm.use(None).generate([prompt], cfg=CFG)
    assert got == want
    assert sum(w != b for w, b in zip(want, base)) >= 3  # the adapters change what is generated
    lm.use("y")
    assert lm.generate(PROMPTS, cfg=CFG) == lm.generate(PROMPTS, adapters="y", cfg=CFG)  # None: the active ones
    assert lm.generate(PROMPTS[:2], adapters=[None, "__base__"], cfg=CFG) == base[:2]  # per row overrides use()
    with pytest.raises(ValueError, match="2 adapter names for 6 prompts"):
        lm.generate(PROMPTS, adapters=["x", "y"], cfg=CFG)
    with pytest.raises(KeyError, match=r"no adapter named 'nope'.*loaded: (\w, ){3}\w;") as err:
        lm.generate(PROMPTS[:1], adapters=["nope"], cfg=CFG)
    assert all(f" {n}" in str(err.value).split("loaded:")[1] for n in "xyzw")


def test_info_lists_method_params_and_path(tiny_model_dir, saved):
    lm = plugtune.load(str(tiny_model_dir), adapter={n: saved[n] for n in "xyzw"}, device="cpu")
    # Tiny Llama: hidden 64, 2 layers, k/v projections 64 -> 32 (2 KV heads of 16), MLP 128.
    lora = 2 * 4 * ((64 + 64) + (64 + 32) + (64 + 32) + (64 + 64))  # r 4 on q, k, v, o
    bottleneck = 2 * 2 * (64 * 8 + 8 + 8 * 64 + 64)  # width m = 64 // 8 = 8: down (8, 64) + b, up (64, 8) + b
    ia3 = 2 * (32 + 32 + 128)  # k, v outputs and down_proj's input
    prompt = 3 * 64
    info = {i.name: (i.method, i.params, i.path) for i in lm.info()}
    assert info == {"x": ("lora", lora, str(saved["x"])), "y": ("bottleneck", bottleneck, str(saved["y"])),
                    "z": ("prompt_tuning", prompt, str(saved["z"])), "w": ("ia3", ia3, str(saved["w"]))}


def test_pool_errors_leave_the_pool_unchanged(tiny_model_dir, saved, tmp_path):
    lm = plugtune.load(str(tiny_model_dir), adapter={"x": saved["x"], "y": saved["y"]}, use="x", device="cpu")
    with pytest.raises(KeyError, match=r"'nope'.*loaded: x, y"):
        lm.use("nope")
    with pytest.raises(ValueError, match="already has an adapter named 'x'"):
        lm.add_adapter("x", saved["z"])
    other_dir = save_tiny_model_dir(tmp_path / "other-base", seed=1)
    with pytest.raises(AdapterMismatchError, match="other base weights"):
        lm.add_adapter("o", make_adapter(other_dir, tmp_path / "o", "x"))
    broken = shutil.copytree(saved["w"], tmp_path / "broken")
    (broken / "adapter_model.safetensors").write_bytes((tmp_path / "o" / "adapter_model.safetensors").read_bytes())
    with pytest.raises(AdapterMismatchError, match="missing keys"):  # LoRA weights under an IA3 config
        lm.add_adapter("b", broken)
    with pytest.raises(FileNotFoundError, match="not an adapter directory"):
        lm.add_adapter("n", tmp_path)
    assert lm.adapters == ["x", "y"] and lm.active == ["x"]
    assert [(i.name, i.path) for i in lm.info()] == [("x", str(saved["x"])), ("y", str(saved["y"]))]
