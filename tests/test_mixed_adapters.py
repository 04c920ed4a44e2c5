"""Per-row mixed-adapter batches and adapters of several methods on one base.

Every adapter gets non-zero random weights, so adapters differ from each other and from the base.
The reference for a mixed batch is each row run alone with its adapter active (or PEFT's own
mixed batch); for nested adapters, a fresh base that only ever had the adapter."""
import pytest
import torch
from torch import nn

from plugtune.adapters import (AdapterMismatchError, adapter_names, adapter_state, adapters_disabled,
                               attach_adapter, load_adapter, mark_trainable, merge_adapters, save_adapter,
                               set_active_adapters, unmerge_adapters)
from plugtune.adapters.layers import base_parameters, remove_adapter, wrapper_chain
from plugtune.adapters.mixed import mixed_adapters
from plugtune.inference.generate import GenerationConfig, generate_ids
from plugtune.models.causal_lm import forward_logits
from plugtune.models.tiny import build_classifier, build_model
from tests.virtual_inputs import lively_model

VOCAB = 400
ATTN = {"llama": ["q_proj", "v_proj"], "gpt2": ["c_attn"]}
OUT = {"llama": ["o_proj"], "gpt2": ["attn.c_proj"]}
EMBED = {"llama": "embed_tokens", "gpt2": "wte"}


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny matmuls: a second thread only adds synchronisation (and stalls on a busy machine)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def bump(model, name, scale=0.2, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in adapter_state(model, name).values():
            p.add_(torch.randn(p.shape, generator=g) * scale)


def add(model, specs):
    """specs: [(name, method, cfg)], each attached (inactive for training) with random non-zero weights."""
    for seed, (name, method, cfg) in enumerate(specs):
        attach_adapter(model, method, cfg, name=name, trainable=False)
        bump(model, name, seed=seed)
    return model


def tokens(padding="right", batch=8, length=9, seed=0):
    """(B, T) ids and mask; rows have different lengths, padded on the right (training) or left (generation)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (batch, length), generator=g)
    mask = torch.ones_like(ids)
    for row, n in enumerate([9, 6, 4, 8, 5, 9, 3, 7][:batch]):
        pad = slice(n, None) if padding == "right" else slice(0, length - n)
        mask[row, pad], ids[row, pad] = 0, 0
    return ids, mask


def mixed(model, names, ids, mask):
    """A plain model call inside the mixed context (virtual tokens come from the call hooks)."""
    with mixed_adapters(model, names):
        return model(input_ids=ids, attention_mask=mask).logits


def alone(model, names, ids, mask):
    """Row by row, a batch of one with only that row's adapter active."""
    rows = []
    with torch.no_grad():
        for row, name in enumerate(names):
            set_active_adapters(model, name)
            rows.append(forward_logits(model, ids[row:row + 1], mask[row:row + 1]))
    set_active_adapters(model, None)
    return torch.cat(rows)


def case_specs(case, arch):
    lora = ("lora", "lora", {"r": 4, "alpha": 8, "target_modules": ATTN[arch]})
    rs = ("rs", "lora", {"r": 16, "alpha": 8, "use_rslora": True, "target_modules": "all-linear"})
    ia3 = ("ia3", "ia3", {})  # this architecture's defaults: k, v and a feed-forward (input-scaled) layer
    ia3_out = ("ia3o", "ia3", {"target_modules": ATTN[arch] + OUT[arch], "feedforward_modules": []})
    houlsby = ("hb", "bottleneck", {"variant": "houlsby", "reduction_factor": 8})
    pfeiffer = ("pf", "bottleneck", {"variant": "pfeiffer", "reduction_factor": 4, "residual": False})
    pt3 = ("pt3", "prompt_tuning", {"num_virtual_tokens": 3})
    pt6 = ("pt6", "prompt_tuning", {"num_virtual_tokens": 6})
    emb = ("emb", "lora", {"r": 4, "target_modules": [EMBED[arch], *OUT[arch]]})
    emb2 = ("emb2", "lora", {"r": 2, "target_modules": [EMBED[arch]]})
    return {"lora": [lora, ("lora8", "lora", {"r": 8, "target_modules": "all-linear"})],
            "rslora": [rs, ("lora2", "lora", {"r": 2, "target_modules": OUT[arch]})],
            "ia3": [ia3, ia3_out], "bottleneck": [houlsby, pfeiffer], "prompt": [pt3, pt6],
            "embedding": [emb, emb2],
            "all": [lora, rs, ia3, houlsby, pt3, emb, ("head", "lora", {"r": 2, "modules_to_save": ["lm_head"]})]}[case]


@pytest.mark.parametrize("arch,padding", [("llama", "right"), ("llama", "left"), ("gpt2", "right")])
@pytest.mark.parametrize("case", ["lora", "rslora", "ia3", "bottleneck", "prompt", "embedding", "all"])
def test_mixed_batch_equals_each_row_alone(case, arch, padding):
    specs = case_specs(case, arch)
    model = add(build_model(arch, VOCAB), specs)
    present = [s[0] for s in specs]
    names = ([*present, None] * 8)[:8]  # every adapter, base rows, repeats
    ids, mask = tokens(padding)
    want = alone(model, names, ids, mask)
    base = alone(model, [None] * 8, ids, mask)
    real = mask.bool()
    for row, name in enumerate(names):  # every adapter changes its rows (the comparison is not vacuous)
        if name is not None:
            assert not torch.allclose(want[row][real[row]], base[row][real[row]], atol=1e-3), name
    set_active_adapters(model, present[0])  # the active set must not leak into a mixed batch
    with torch.no_grad():  # eval + no_grad: LoRA's stacked (bmm) path
        torch.testing.assert_close(mixed(model, names, ids, mask)[real], want[real])
    grouped = mixed(model, names, ids, mask)  # grad enabled: index_select / index_add
    torch.testing.assert_close(grouped.detach()[real], want[real])


@pytest.mark.parametrize("arch,head", [("bert", "classifier"), ("llama", "score")])
def test_modules_to_save_heads_mix_per_row(arch, head):
    model = build_classifier(arch)
    targets = ["query", "value"] if arch == "bert" else ["q_proj", "v_proj"]
    add(model, [("a", "lora", {"r": 4, "target_modules": targets, "modules_to_save": [head]}),
                ("b", "ia3", {"modules_to_save": [head]})])
    names = ["a", None, "b", "a", None, "b"]
    ids, mask = tokens("right", batch=6)

    def rows_alone(names):
        rows = []
        for row, name in enumerate(names):
            set_active_adapters(model, name)
            with torch.no_grad():
                rows.append(model(input_ids=ids[row:row + 1], attention_mask=mask[row:row + 1]).logits)
        set_active_adapters(model, None)
        return torch.cat(rows)  # (B, num_labels)

    want, base = rows_alone(names), rows_alone([None] * 6)
    assert all(not torch.allclose(want[i], base[i], atol=1e-3) for i in (0, 2, 3, 5))
    with torch.no_grad():
        torch.testing.assert_close(mixed(model, names, ids, mask), want)
    torch.testing.assert_close(mixed(model, names, ids, mask).detach(), want)


def test_peft_made_adapters_mix_exactly_like_peft(tmp_path):
    peft = pytest.importorskip("peft")
    # (Names that are not substrings of 'lora_': PEFT warns about those.)
    cfgs = {"math": peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]),
            "code": peft.LoraConfig(r=8, lora_alpha=16, target_modules="all-linear"),
            "docs": peft.LoraConfig(r=16, lora_alpha=8, use_rslora=True,
                                    target_modules=["q_proj", "k_proj", "v_proj", "o_proj"])}
    made = peft.get_peft_model(build_model("llama", VOCAB), cfgs["math"], adapter_name="math")
    for name in ("code", "docs"):
        made.add_adapter(name, cfgs[name])
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():  # random non-zero A and B for every adapter
        for n, p in made.named_parameters():
            if "lora_" in n:
                p.add_(torch.randn(p.shape, generator=g) * 0.2)
    made.save_pretrained(tmp_path)  # one folder per adapter
    ours = build_model("llama", VOCAB)
    for name in cfgs:
        load_adapter(ours, tmp_path / name, name=name)
    names = ["math", None, "code", "docs", "math", "docs", None, "code"]
    ids, mask = tokens("left")
    made.eval()
    with torch.no_grad():
        theirs = made(input_ids=ids, attention_mask=mask, adapter_names=[n or "__base__" for n in names]).logits
        stacked = mixed(ours, names, ids, mask)
    real = mask.bool()
    torch.testing.assert_close(stacked[real], theirs[real])
    torch.testing.assert_close(mixed(ours, names, ids, mask).detach()[real], theirs[real])  # grouped path


def lora_trio():
    return add(build_model("llama", VOCAB), [("a", "lora", {"r": 4, "target_modules": ["q_proj", "v_proj"]}),
                                             ("b", "lora", {"r": 8, "target_modules": "all-linear"}),
                                             ("c", "lora", {"r": 16, "use_rslora": True})])


def test_stacked_path_equals_grouped_and_follows_weight_changes():
    model = lora_trio()
    q = model.model.layers[0].self_attn.q_proj
    ids, mask = tokens("right")
    names = ["a", None, "b", "c", "a", "c", None, "b"]
    real = mask.bool()

    def check(names):
        with torch.no_grad():
            stacked = mixed(model, names, ids, mask)
        grouped = mixed(model, names, ids, mask)
        torch.testing.assert_close(stacked[real], grouped.detach()[real])
        torch.testing.assert_close(stacked[real], alone(model, names, ids, mask)[real])
        return stacked, grouped

    mark_trainable(model, ["a", "b", "c"])
    before, grouped = check(names)
    assert q._stack is not None and q._stack[0].shape == (4, 16, 64)  # entry 0 = no adapter, ranks padded to 16
    (grouped[real].logsumexp(-1).sum()).backward()
    torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5, foreach=True).step()
    after, _ = check(names)  # the optimizer changed the weights: the stack is rebuilt
    assert not torch.allclose(after[real], before[real], atol=1e-3)
    bump(model, "b", scale=0.5, seed=9)  # in place, under no_grad
    check(names)
    add(model, [("d", "lora", {"r": 2, "target_modules": ["q_proj"]})])
    check(["d", "a", None, "b", "c", "d", "a", "b"])
    remove_adapter(model, "b")
    check(["d", "a", None, "c", "c", "d", "a", None])


def test_each_adapter_gets_gradient_only_from_its_rows():
    model = add(build_model("llama", VOCAB), [
        ("a", "lora", {"r": 4, "target_modules": ["q_proj", "v_proj"]}), ("b", "lora", {"r": 8}),
        ("c", "ia3", {}), ("d", "bottleneck", {"reduction_factor": 8}),
        ("e", "prompt_tuning", {"num_virtual_tokens": 3}), ("f", "prompt_tuning", {"num_virtual_tokens": 5}),
        ("absent_lora", "lora", {"r": 2}), ("absent_ia3", "ia3", {})])
    mark_trainable(model, adapter_names(model))
    names = ["a", "c", None, "e", "b", "d", "f", "a"]
    ids, mask = tokens("right")

    def loss(logits, rows):  # summed per-row token losses: row i's term depends on row i only
        lp = logits[:, :-1].log_softmax(-1).gather(-1, ids[rows, 1:, None]).squeeze(-1)
        return -(lp * mask[rows, 1:]).sum()

    def grads():
        out = {n: {k: (p.grad.clone() if p.grad is not None else None) for k, p in adapter_state(model, n).items()}
               for n in adapter_names(model)}
        model.zero_grad(set_to_none=True)
        return out

    loss(mixed(model, names, ids, mask), list(range(8))).backward()
    got = grads()
    assert all(p.grad is None for p in model.parameters() if not p.requires_grad)
    assert not any(p.requires_grad for n, p in model.named_parameters() if n.endswith("base_layer.weight"))
    for name in "abcdef":
        rows = [i for i, n in enumerate(names) if n == name]
        set_active_adapters(model, name)
        loss(forward_logits(model, ids[rows], mask[rows]), rows).backward()
        for key, want in grads()[name].items():
            assert want is not None and want.abs().sum() > 0, key
            torch.testing.assert_close(got[name][key], want, msg=key)
    for name in ("absent_lora", "absent_ia3"):
        assert all(g is None or not g.any() for g in got[name].values()), name


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_mixed_kv_cache_generation_equals_each_prompt_alone(arch):
    model = add(lively_model(arch), [("lora", "lora", {"r": 4}), ("ia3", "ia3", {}),
                                     ("bn", "bottleneck", {"reduction_factor": 8}),
                                     ("pt", "prompt_tuning", {"num_virtual_tokens": 3})])
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(3, VOCAB, (n,), generator=g).tolist() for n in (5, 9, 3, 7, 6, 4)]
    names = ["lora", None, "ia3", "bn", "pt", "lora"]
    cfg = GenerationConfig(max_new_tokens=6)
    got = generate_ids(model, prompts, stop_ids=[2], pad_id=0, cfg=cfg, adapter_names=names)
    want, base = [], []
    for prompt, name in zip(prompts, names):
        set_active_adapters(model, name)
        want += generate_ids(model, [prompt], stop_ids=[2], pad_id=0, cfg=cfg)
        set_active_adapters(model, None)
        base += generate_ids(model, [prompt], stop_ids=[2], pad_id=0, cfg=cfg)
    assert got == want
    assert sum(w != b for w, b in zip(want, base)) >= 4  # the adapters change what is generated


NEST = [("a", "lora", {"r": 4, "alpha": 8, "target_modules": ["v_proj", "o_proj"]}),
        ("b", "ia3", {"target_modules": ["v_proj", "o_proj"], "feedforward_modules": ["o_proj"]}),
        ("c", "bottleneck", {"target_modules": ["v_proj", "o_proj"], "reduction_factor": 4})]


def test_nested_adapters_each_equal_a_base_that_only_had_it(tmp_path):
    model = add(build_model("llama", VOCAB), NEST)
    o_proj = model.model.layers[0].self_attn.o_proj
    assert [type(x).__name__ for x in wrapper_chain(o_proj)] == ["BottleneckAdapter", "IA3Linear", "LoraLinear"]
    ids, mask = tokens("right", batch=3)
    for name, *_ in NEST:  # saved from the nest, loaded alone into a fresh base
        set_active_adapters(model, name)
        save_adapter(model, tmp_path / name, name=name)
        fresh = load_adapter(build_model("llama", VOCAB), tmp_path / name, name=name)
        torch.testing.assert_close(forward_logits(model, ids, mask), forward_logits(fresh, ids, mask))
    # All three active on one module: bottleneck(ia3(lora)), o_proj's IA3 scales its input.
    set_active_adapters(model, ["a", "b", "c"])
    x = torch.randn(2, 3, 64)
    lora, ia3, bn = o_proj.base_layer.base_layer, o_proj.base_layer, o_proj
    xs = x * ia3.ia3_l["b"].flatten()
    h = xs @ lora.base_layer.weight.T + (xs @ lora.lora_A["a"].weight.T @ lora.lora_B["a"].weight.T) * 2.0
    down, up = bn.adapter_down["c"], bn.adapter_up["c"]
    torch.testing.assert_close(o_proj(x), h + up(torch.relu(down(h))))
    with torch.no_grad():  # and per row, each row gets only its own adapter of the nest
        torch.testing.assert_close(mixed(model, ["a", "b", "c"], ids, mask), alone(model, ["a", "b", "c"], ids, mask))
    set_active_adapters(model, ["a", "c"])
    with_a_c = forward_logits(model, ids, mask)
    remove_adapter(model, "b")  # the middle wrapper goes; the others are untouched
    assert [type(x).__name__ for x in wrapper_chain(model.model.layers[0].self_attn.o_proj)] == \
        ["BottleneckAdapter", "LoraLinear"]
    torch.testing.assert_close(forward_logits(model, ids, mask), with_a_c, rtol=0, atol=0)
    remove_adapter(model, "c")
    remove_adapter(model, "a")
    base = build_model("llama", VOCAB)
    assert type(model.model.layers[0].self_attn.o_proj) is nn.Linear
    assert sum(p.numel() for p in model.parameters()) == sum(p.numel() for p in base.parameters())
    assert all(torch.equal(v, base.state_dict()[k]) for k, v in model.state_dict().items())
    assert model.state_dict().keys() == base.state_dict().keys()


def gpt2_with_biases():
    model = build_model("gpt2", VOCAB)
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n.endswith(".bias"):
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    return model


def test_merge_unmerge_with_nested_wrappers_is_bit_exact():
    model = gpt2_with_biases()
    originals = {k: p.detach().clone() for k, p in model.named_parameters()}
    add(model, [("a", "lora", {"r": 4, "target_modules": ["c_attn", "mlp.c_proj"]}),
                ("b", "ia3", {})])  # IA3 wraps LoRA on c_attn (output scale, bias too) and mlp.c_proj (input)
    ids, mask = tokens("right", batch=3)
    set_active_adapters(model, ["a", "b"])
    unmerged = forward_logits(model, ids, mask)

    def base_is_original():
        state = base_parameters(model)
        return state.keys() == originals.keys() and all(torch.equal(state[k], v) for k, v in originals.items())

    with pytest.raises(RuntimeError, match="inner LoraLinear"):  # the outer IA3 first, inner LoRA live
        merge_adapters(model, ["b"])
    assert base_is_original()  # a refused merge changes nothing (IA3 scales the bias too)
    merge_adapters(model)
    assert not base_is_original()
    torch.testing.assert_close(forward_logits(model, ids, mask), unmerged, rtol=1e-5, atol=1e-5)
    with pytest.raises(RuntimeError, match="merged"):
        remove_adapter(model, "a")
    with pytest.raises(ValueError, match="merged into the base weights"):
        mixed(model, ["a", None, "b"], ids, mask)
    unmerge_adapters(model)
    assert base_is_original()
    torch.testing.assert_close(forward_logits(model, ids, mask), unmerged, rtol=0, atol=0)


def test_per_row_errors_are_clear():
    model = add(build_model("llama", VOCAB), [("a", "lora", {"r": 4}), ("dora", "lora", {"r": 4, "use_dora": True}),
                                              ("pre", "prefix_tuning", {"num_virtual_tokens": 2})])
    ids, mask = tokens("right", batch=3)
    with pytest.raises(KeyError, match=r"'zz'.*loaded: a, dora, pre"):
        mixed(model, ["a", "zz", None], ids, mask)
    with pytest.raises(KeyError, match=r"'zz'.*loaded: a, dora, pre"):
        set_active_adapters(model, ["zz"])
    with pytest.raises(ValueError, match="2 names for a batch of 3 rows"):
        mixed(model, ["a", None], ids, mask)
    with pytest.raises(ValueError, match="2 adapter names for 3 prompts"):
        generate_ids(model, [[5], [6], [7]], [2], 0, adapter_names=["a", None])
    with pytest.raises(ValueError, match="DoRA"):
        mixed(model, ["dora", None, "a"], ids, mask)
    with pytest.raises(ValueError, match="prefix tuning"):
        mixed(model, ["pre", None, "a"], ids, mask)
    with pytest.raises(ValueError, match="already has an adapter named 'a'"):
        attach_adapter(model, "ia3", {}, name="a")
    # A prefix adapter that is active but not named in the batch applies to no row.
    set_active_adapters(model, ["pre"])
    with torch.no_grad():
        torch.testing.assert_close(mixed(model, ["a", None, None], ids, mask)[1:],
                                   alone(model, [None, None], ids[1:], mask[1:]))


def test_adapter_made_for_another_base_is_refused(tmp_path):
    other = add(build_model("llama", VOCAB, seed=1), [("x", "lora", {"r": 4})])
    save_adapter(other, tmp_path / "x", name="x")
    model = add(build_model("llama", VOCAB), [("a", "lora", {"r": 4})])
    with pytest.raises(AdapterMismatchError, match="other base weights"):
        load_adapter(model, tmp_path / "x", name="x")
    assert adapter_names(model) == ["a"]
    (tmp_path / "x" / "plugtune_adapter.json").unlink()
    (tmp_path / "x" / "adapter_model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="adapter_model.safetensors"):
        load_adapter(model, tmp_path / "x", name="x")
    assert adapter_names(model) == ["a"]  # a failed load leaves nothing behind


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
@pytest.mark.parametrize("method", ["prompt_tuning", "prefix_tuning"])
def test_plain_model_call_applies_virtual_tokens(tmp_path, arch, method):
    peft = pytest.importorskip("peft")
    model = build_model(arch, VOCAB)
    ids, mask = tokens("right", batch=3)
    with torch.no_grad():
        base = model(input_ids=ids, attention_mask=mask).logits
    add(model, [("v", method, {"num_virtual_tokens": 4})])
    save_adapter(model, tmp_path, name="v")
    theirs = peft.PeftModel.from_pretrained(build_model(arch, VOCAB), tmp_path).eval()
    labels, real = ids.masked_fill(mask == 0, -100), mask.bool()
    with torch.no_grad():
        want = forward_logits(model, ids, mask)
        out = model(input_ids=ids, attention_mask=mask, labels=labels)
        torch.testing.assert_close(out.logits, want)
        if arch == "llama":  # positional arguments (Llama's order: input_ids, attention_mask)
            torch.testing.assert_close(model(ids, mask).logits, want)
        peft_out = theirs(input_ids=ids, attention_mask=mask, labels=labels)
        torch.testing.assert_close(out.logits[real], peft_out.logits[:, -ids.shape[1]:][real])
        torch.testing.assert_close(out.loss, peft_out.loss)  # PEFT's loss (prompt tuning: also the 1st token)
        if method == "prefix_tuning":  # no virtual positions in the logits: the loss is forward_logits' loss
            ref = nn.functional.cross_entropy(want[:, :-1].flatten(0, 1), labels[:, 1:].flatten())
            torch.testing.assert_close(out.loss, ref)
        assert not torch.allclose(want, base, atol=1e-3)
        with adapters_disabled(model):
            torch.testing.assert_close(model(input_ids=ids, attention_mask=mask).logits, base, rtol=0, atol=0)
        with pytest.raises(ValueError):  # a call that fails half-way must not disturb the next one
            model(input_ids=ids, attention_mask=mask, labels=labels[:1])
        torch.testing.assert_close(forward_logits(model, ids, mask), want)
