"""Adapter arithmetic: `linear` is the exact weighted sum, every method matches PEFT's add_weighted_adapter,
TIES / DARE steps on hand-computed values, the output loads in PEFT and plugtune, clear errors, the CLI."""
import argparse
import json
import warnings

import pytest
import torch
from safetensors.torch import load_file

from plugtune.adapters import adapter_state, attach_adapter, load_adapter, save_adapter
from plugtune.adapters.arithmetic import (add_combine_parser, combine_adapters, dare_prune, dare_rescale,
                                          disjoint_merge, elect_sign, magnitude_trim, merge_tensors)
from plugtune.adapters.io import META_FILE
from plugtune.models.tiny import build_model

peft = pytest.importorskip("peft")
VOCAB = 400
PAIRS = ((".lora_A.weight", ".lora_B.weight"), (".lora_embedding_A", ".lora_embedding_B"))


def peft_adapter(path, seed, **lora):
    """A PEFT LoRA adapter on the tiny Llama (seed 0) with random non-zero A and B."""
    model = peft.get_peft_model(build_model("llama", VOCAB), peft.LoraConfig(**lora))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # PEFT's notes on tied embeddings
        model.save_pretrained(path)
    return path


def plugtune_adapter(path, seed, base_seed=0, **lora):
    model = build_model("llama", VOCAB, seed=base_seed)
    attach_adapter(model, "lora", lora)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in adapter_state(model, "default").values():
            p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    return save_adapter(model, path)


def deltas(path) -> dict:
    """s * B A per module, read straight from the files (the formula, independent of the code under test)."""
    cfg = json.loads((path / "adapter_config.json").read_text())
    state = load_file(path / "adapter_model.safetensors")
    out = {}
    for key, A in state.items():
        for a, b in PAIRS:
            if key.endswith(a):
                r = A.shape[0]
                s = cfg["lora_alpha"] / (r ** 0.5 if cfg.get("use_rslora") else r)
                out[key[: -len(a)]] = s * state[key[: -len(a)] + b].float() @ A.float()
    return out


def weighted_sum(paths, weights) -> dict:
    total = {}
    for path, w in zip(paths, weights):
        for m, d in deltas(path).items():
            total[m] = total.get(m, 0) + w * d  # a module an input lacks contributes zero
    return total


def logits(model, x):
    with torch.no_grad():
        return model(x).logits


@pytest.fixture(scope="module")
def mixed(tmp_path_factory):
    """Different ranks, different targets (an embedding among them), the second one rsLoRA."""
    d = tmp_path_factory.mktemp("mixed")
    a = peft_adapter(d / "a", 1, r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "embed_tokens"])
    b = peft_adapter(d / "b", 2, r=2, lora_alpha=4, use_rslora=True, target_modules=["v_proj", "o_proj", "down_proj"])
    return a, b


@pytest.fixture(scope="module")
def equal_rank(tmp_path_factory):
    """Rank 4 each; every module (q, v only: see the DARE note below) is targeted by two of the three."""
    d = tmp_path_factory.mktemp("equal")
    return (peft_adapter(d / "a", 1, r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]),
            peft_adapter(d / "b", 2, r=4, lora_alpha=16, use_rslora=True, target_modules=["v_proj"]),
            peft_adapter(d / "c", 3, r=4, lora_alpha=4, target_modules=["q_proj"]))


def test_linear_is_exact_and_loads_in_plugtune_and_peft(tmp_path, mixed):
    weights = [0.7, -0.4]
    out = combine_adapters(mixed, weights, tmp_path / "out")
    want, got = weighted_sum(mixed, weights), deltas(out)
    assert sorted(got) == sorted(want)
    for m in want:
        torch.testing.assert_close(got[m], want[m], rtol=1e-5, atol=1e-6)
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert (cfg["r"], cfg["lora_alpha"], cfg["use_rslora"]) == (6, 6, False)  # 4 + 2 where both target v_proj
    assert cfg["target_modules"] == ["down_proj", "embed_tokens", "o_proj", "q_proj", "v_proj"]

    # The formula applied to the base weights by hand vs the combined adapter in plugtune and in PEFT.
    x = torch.randint(0, VOCAB, (2, 7))
    merged = build_model("llama", VOCAB)
    merged.lm_head.weight = torch.nn.Parameter(merged.lm_head.weight.detach().clone())  # LoRA on embed only
    with torch.no_grad():
        for m, d in want.items():
            module = merged.get_submodule(m.removeprefix("base_model.model."))
            module.weight.add_(d.T if isinstance(module, torch.nn.Embedding) else d)  # an embedding is (vocab, dim)
    ours = load_adapter(build_model("llama", VOCAB), out)
    theirs = peft.PeftModel.from_pretrained(build_model("llama", VOCAB), out)
    torch.testing.assert_close(logits(ours, x), logits(merged, x), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(logits(theirs, x), logits(ours, x), rtol=1e-5, atol=1e-5)


def peft_combined_deltas(paths, weights, combination_type, **kwargs) -> dict:
    model = peft.PeftModel.from_pretrained(build_model("llama", VOCAB), paths[0], adapter_name="in0")
    for i, p in enumerate(paths[1:], 1):
        model.load_adapter(p, adapter_name=f"in{i}")
    model.add_weighted_adapter([f"in{i}" for i in range(len(paths))], weights, "combined",
                               combination_type=combination_type, **kwargs)
    return {n: layer.get_delta_weight("combined") for n, layer in model.named_modules()
            if hasattr(layer, "lora_A") and "combined" in layer.lora_A}


# (ours, PEFT's, our kwargs). The DARE masks agree because both draw torch.bernoulli from the same seeded
# generator in the same order; that order is per module (natural name order here, model order in PEFT: the
# same for q_proj, v_proj) and per module the A's then the B's, or the dW's.
PARITY = [("linear", "cat", {}), ("svd", "svd", {}), ("svd", "svd", {"rank": 2}),
          ("ties", "ties", {"density": 0.5}), ("ties", "ties", {"density": 0.5, "majority_sign": "frequency"}),
          ("ties_svd", "ties_svd", {"density": 0.3, "rank": 3}), ("dare_linear", "dare_linear", {"density": 0.5}),
          ("dare_ties", "dare_ties", {"density": 0.6}), ("dare_linear_svd", "dare_linear_svd", {"density": 0.5}),
          ("dare_ties_svd", "dare_ties_svd", {"density": 0.5, "majority_sign": "frequency"})]


@pytest.mark.parametrize("ours,theirs,kwargs", PARITY, ids=[f"{p[0]}-{i}" for i, p in enumerate(PARITY)])
def test_parity_with_peft_add_weighted_adapter(tmp_path, monkeypatch, equal_rank, ours, theirs, kwargs):
    weights, seed = [0.6, -0.5, 0.8], 7
    out = combine_adapters(equal_rank, weights, tmp_path / "out", method=ours, seed=seed, **kwargs)
    peft_kwargs = {"svd_rank": kwargs.get("rank"), "density": kwargs.get("density"),
                   "majority_sign_method": kwargs.get("majority_sign", "total")}
    g = torch.Generator().manual_seed(seed)
    bernoulli = torch.bernoulli
    with monkeypatch.context() as patch:  # PEFT draws from the global generator: give it ours
        patch.setattr(torch, "bernoulli", lambda p, *a, **k: bernoulli(p, generator=g))
        want = peft_combined_deltas(equal_rank, weights, theirs, **peft_kwargs)
    got = deltas(out)
    assert sorted(got) == sorted(want)
    for m in want:
        torch.testing.assert_close(got[m], want[m], rtol=1e-4, atol=1e-6)
    if ours.startswith("dare"):  # the masks really dropped something: not the same as no pruning
        dense = deltas(combine_adapters(equal_rank, weights, tmp_path / "dense", method=ours))
        assert not all(torch.allclose(dense[m], got[m]) for m in got)


def test_trim_keeps_the_largest_magnitudes():
    t = torch.tensor([0.5, -3.0, 2.0, 0.1, -0.7])
    torch.testing.assert_close(magnitude_trim(t, 0.4), torch.tensor([0.0, -3.0, 2.0, 0.0, 0.0]))  # k = 2
    torch.testing.assert_close(magnitude_trim(t, 0.6), torch.tensor([0.0, -3.0, 2.0, 0.0, -0.7]))  # k = 3
    assert torch.equal(magnitude_trim(t, 1.0), t)


def test_elect_sign_and_disjoint_merge_by_hand():
    tasks = torch.tensor([[1.0, -2.0, 0.0, 3.0, -1.0, 0.0],
                          [-2.0, 1.0, 0.0, 1.0, 1.0, 0.0],
                          [2.0, -1.0, 4.0, -5.0, 0.0, 0.0]])
    # total mass per column: 1, -2, 4, -1, 0, 0 -> signs +, -, +, -, + (a tie goes to +), +
    agree = elect_sign(tasks, "total")
    assert agree.tolist() == [[True, True, False, False, False, False],
                              [False, False, False, False, True, False],
                              [True, True, True, True, False, False]]
    # frequency (count of signs) per column: 1, -1, 1, 1, 0, 0 -> column 4 elects + here, - by total
    assert elect_sign(tasks, "frequency")[:, 3].tolist() == [True, True, False]
    # mean over agreeing tasks; a column nobody keeps stays 0
    torch.testing.assert_close(disjoint_merge(tasks, agree), torch.tensor([1.5, -1.5, 4.0, -5.0, 1.0, 0.0]))
    weighted = tasks * torch.tensor([1.0, 0.5, 2.0])[:, None]
    torch.testing.assert_close(disjoint_merge(weighted, agree), torch.tensor([2.5, -2.0, 8.0, -10.0, 0.5, 0.0]))


def test_ties_end_to_end_by_hand():
    a, b = torch.tensor([0.5, -3.0, 2.0, 0.1]), torch.tensor([-1.0, 1.5, -0.2, 4.0])
    # trim to 2 each: a -> [0, -3, 2, 0], b -> [0, 1.5, 0, 4]; signs from the sum [0, -1.5, 2, 4]: +, -, +, +;
    # weights 1, 2: column 2 keeps only a (-3), column 3 only a (2), column 4 only b (2 * 4).
    got = merge_tensors([a, b], [1.0, 2.0], "ties", density=0.5)
    torch.testing.assert_close(got, torch.tensor([0.0, -3.0, 2.0, 8.0]))


def test_dare_rescale_and_expectation():
    t = torch.tensor([1.0, -2.0, 3.0, -4.0, 5.0])
    mask = torch.tensor([1.0, 0.0, 1.0, 0.0, 0.0])
    torch.testing.assert_close(dare_rescale(t, mask, 0.4), torch.tensor([2.5, 0.0, 7.5, 0.0, 0.0]))
    g = torch.Generator().manual_seed(0)
    draws = torch.stack([dare_prune(t, 0.25, g) for _ in range(20000)])
    assert set(draws[:, 2].unique().tolist()) == {0.0, 12.0}  # kept values are rescaled by 1 / density
    torch.testing.assert_close(draws.mean(0), t, rtol=0.05, atol=0.1)  # E[d_hat] = d
    assert torch.equal(dare_prune(t, 1.0, g), t)


def test_sidecar_is_combined_and_checked(tmp_path):
    a = plugtune_adapter(tmp_path / "a", 1, r=4, target_modules=["q_proj", "v_proj"])
    b = plugtune_adapter(tmp_path / "b", 2, r=4, target_modules=["q_proj"])
    out = combine_adapters([a, b], [0.5, 0.5], tmp_path / "out", method="ties_svd", density=0.5, rank=3)
    meta, meta_a = (json.loads((p / META_FILE).read_text()) for p in (out, a))
    assert meta["base_fingerprint"] == meta_a["base_fingerprint"]
    assert meta["combined_from"] == {"adapters": [str(a), str(b)], "weights": [0.5, 0.5], "method": "ties_svd",
                                     "rank": 3, "density": 0.5, "majority_sign": "total", "seed": 0}
    x = torch.randint(0, VOCAB, (2, 7))
    ours = load_adapter(build_model("llama", VOCAB), out)  # passes the fingerprint check
    theirs = peft.PeftModel.from_pretrained(build_model("llama", VOCAB), out)
    torch.testing.assert_close(logits(theirs, x), logits(ours, x), rtol=1e-5, atol=1e-5)
    assert not torch.allclose(logits(ours, x), logits(build_model("llama", VOCAB), x))

    other_base = plugtune_adapter(tmp_path / "c", 3, base_seed=1, r=4, target_modules=["q_proj"])
    with pytest.raises(ValueError, match="made for different base models"):
        combine_adapters([a, other_base], [0.5, 0.5], tmp_path / "bad")
    no_sidecar = peft_adapter(tmp_path / "p", 4, r=4, lora_alpha=8, target_modules=["q_proj"])
    combine_adapters([a, no_sidecar], [0.5, 0.5], out)  # rewritten in place: the old sidecar must go
    assert not (out / META_FILE).exists()


def test_errors_name_the_problem_and_the_fix(tmp_path, equal_rank, mixed):
    a, b, _ = equal_rank
    out = tmp_path / "out"
    cases = [
        (dict(adapters=[a, b], weights=[1.0]), "1 weight\(s\) for 2 adapters"),
        (dict(adapters=[a], weights=[1.0], method="ties", density=0.5), "needs at least 2"),
        (dict(adapters=[a, b], weights=[1, 1], method="svd", rank=0), "rank must be >= 1"),
        (dict(adapters=[a, b], weights=[1, 1], method="ties", density=0.0), r"density must be in \(0, 1\]"),
        (dict(adapters=[a, b], weights=[1, 1], method="dare_linear", density=1.5), r"density must be in \(0, 1\]"),
        (dict(adapters=[a, b], weights=[1, 1], method="linear", rank=4), "SVD methods only"),
        (dict(adapters=list(mixed), weights=[1, 1], method="ties", density=0.5), "use ties_svd"),
        (dict(adapters=[a, b], weights=[1, 1], method="mean"), "unknown method"),
    ]
    for kwargs, message in cases:
        with pytest.raises(ValueError, match=message):
            combine_adapters(out_dir=out, **kwargs)

    dora = peft_adapter(tmp_path / "dora", 5, r=4, use_dora=True, target_modules=["q_proj"])
    with pytest.raises(ValueError, match="use_dora.*magnitude vectors do not combine linearly"):
        combine_adapters([a, dora], [1, 1], out)
    model = build_model("llama", VOCAB)
    attach_adapter(model, "ia3", {})
    ia3 = save_adapter(model, tmp_path / "ia3")
    with pytest.raises(ValueError, match="is a IA3 adapter; only LoRA"):
        combine_adapters([a, ia3], [1, 1], out)
    small = peft.get_peft_model(build_model("llama", VOCAB, hidden=32), peft.LoraConfig(r=4, target_modules=["q_proj"]))
    small.save_pretrained(tmp_path / "small")
    with pytest.raises(ValueError, match="made for different base models"):
        combine_adapters([a, tmp_path / "small"], [1, 1], out, method="svd")
    assert not out.exists()  # every check runs before anything is written


def test_cli_combine_through_argparse(tmp_path, capsys, equal_rank):
    parser = argparse.ArgumentParser(prog="plugtune adapters")
    add_combine_parser(parser.add_subparsers(dest="adapters_command", required=True))
    a, b, _ = equal_rank
    args = parser.parse_args(["combine", "--adapter", str(a), "--adapter", str(b), "--weights", "0.6", "-0.4",
                              "--method", "svd", "--rank", "3", "--out", str(tmp_path / "out")])
    args.func(args)
    assert f"into {tmp_path / 'out'}: LoRA rank 3" in capsys.readouterr().out
    torch.testing.assert_close(deltas(tmp_path / "out")["base_model.model.model.layers.0.self_attn.q_proj"],
                               peft_combined_deltas([a, b], [0.6, -0.4], "svd", svd_rank=3)[
                                   "base_model.model.model.layers.0.self_attn.q_proj"], rtol=1e-4, atol=1e-6)
