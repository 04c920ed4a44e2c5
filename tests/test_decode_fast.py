"""The fast decoder (inference/fast_decode.py) against the plain Hugging Face decode step: the same greedy and
seeded-sampled tokens (fp32), LoRA folded into a decoding copy without touching the policy, per-row mixed
adapters, fallbacks with reasons, the static cache's serving surgery, and the stated closeness of bf16/int8."""
import pytest
import torch

from plugtune.adapters import adapter_state, attach_adapter
from plugtune.adapters.mixed import mixed_adapters
from plugtune.inference import fast_decode
from plugtune.inference.generate import GenerationConfig, decode_step, generate_ids, prefill
from plugtune.models.causal_lm import cache_kwarg
from plugtune.models.tiny import build_model
from plugtune.serve.batch_cache import concat_rows, concat_static, select_rows, select_static


def lora_llama(seed=3, names=("default",)):
    model = build_model("llama", 400, seed=seed)
    for name in names:
        attach_adapter(model, "lora", {"r": 4}, name=name)
    torch.manual_seed(seed)
    with torch.no_grad():
        for name in names:
            for p in adapter_state(model, name).values():
                p.add_(torch.randn_like(p) * 0.3)
    return model


def prompts(seed=0, lengths=(5, 11, 8, 5)):
    g = torch.Generator().manual_seed(seed)
    out = [torch.randint(3, 400, (n,), generator=g).tolist() for n in lengths]
    out[-1] = out[0]  # a repeated prompt: prefilled once, then copied
    return out


@pytest.mark.parametrize("with_lora", [False, True])
def test_fast_fp32_gives_the_plain_tokens(with_lora):
    model = lora_llama() if with_lora else build_model("llama", 400, seed=3)
    ps = prompts()
    greedy = GenerationConfig(max_new_tokens=24)
    assert fast_decode.refusal(model) is None
    plain = generate_ids(model, ps, [2, 17], 0, greedy, decode="plain")
    assert generate_ids(model, ps, [2, 17], 0, greedy) == plain  # "auto" takes the fast path here
    assert generate_ids(model, ps, [2, 17], 0, greedy, decode="fp32", include_stop=True) == \
        generate_ids(model, ps, [2, 17], 0, greedy, decode="plain", include_stop=True)
    sampled = GenerationConfig(max_new_tokens=24, temperature=1.0, top_p=0.9, seed=7)
    assert generate_ids(model, ps, [2], 0, sampled, decode="fp32") == generate_ids(model, ps, [2], 0, sampled,
                                                                                      decode="plain")


def test_folding_lora_leaves_the_policy_alone_and_matches_its_logits():
    model = lora_llama().eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    ps = prompts()
    with torch.no_grad():
        logits, mask, cache = prefill(model, ps, 0)
        static = fast_decode.StaticCache.from_dynamic(cache, mask, 1)
        nxt = logits.argmax(-1)
        plain, _ = decode_step(model, nxt, mask, cache, cache_kwarg(model))
        copy = fast_decode.decoding_copy(model)
        fast = copy.step(nxt, static)
    torch.testing.assert_close(fast, plain, atol=1e-5, rtol=1e-5)
    assert isinstance(copy.layers[0][3][0], fast_decode._Dense)  # q_proj folded: W + sBA
    assert not torch.equal(copy.layers[0][3][0].weight, model.model.layers[0].self_attn.q_proj.weight)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # the policy is untouched


def test_the_decoding_copy_follows_weights_written_in_place():
    """An optimizer step (or a write through .data, which no version counter sees) changes the next rollout."""
    model = lora_llama()
    ps = prompts()
    cfg = GenerationConfig(max_new_tokens=12)
    first = generate_ids(model, ps, [], 0, cfg)
    with torch.no_grad():
        for p in adapter_state(model, "default").values():
            p.data.add_(torch.randn_like(p) * 0.5)
    again = generate_ids(model, ps, [], 0, cfg)
    assert again == generate_ids(model, ps, [], 0, cfg, decode="plain") and again != first


def test_per_row_mixed_adapters_on_the_fast_path():
    model = lora_llama(names=("a", "b"))
    ps = prompts(lengths=(6, 9, 4, 7, 6))
    names = ["a", None, "b", "a", "b"]
    cfg = GenerationConfig(max_new_tokens=16)
    with mixed_adapters(model, names):
        assert fast_decode.refusal(model) is None
        copy = fast_decode.decoding_copy(model)  # each row's factors gathered once for the plan
        assert isinstance(copy.layers[0][3][0], fast_decode._RowLora)
    assert generate_ids(model, ps, [2], 0, cfg, adapter_names=names) == \
        generate_ids(model, ps, [2], 0, cfg, adapter_names=names, decode="plain")


def test_models_the_fast_path_cannot_run_fall_back_or_are_refused_clearly():
    gpt2 = build_model("gpt2", 400)
    ps = prompts()
    cfg = GenerationConfig(max_new_tokens=6)
    assert "not a Llama-family model" in fast_decode.refusal(gpt2)
    assert generate_ids(gpt2, ps, [], 0, cfg) == generate_ids(gpt2, ps, [], 0, cfg, decode="plain")
    with pytest.raises(ValueError, match="decode='fp32' cannot run this model .*not a Llama-family"):
        generate_ids(gpt2, ps, [], 0, cfg, decode="fp32")
    with pytest.raises(ValueError, match="decode must be one of"):
        generate_ids(gpt2, ps, [], 0, cfg, decode="fast")
    prefix = build_model("llama", 400, seed=1)
    attach_adapter(prefix, "prefix_tuning", {"num_virtual_tokens": 3})
    assert "prefix" in fast_decode.refusal(prefix) or "outside the projections" in fast_decode.refusal(prefix)
    assert generate_ids(prefix, ps, [], 0, cfg) == generate_ids(prefix, ps, [], 0, cfg, decode="plain")


def test_static_cache_surgery_equals_the_dynamic_cache_surgery():
    model = build_model("llama", 400, seed=4).eval()
    with torch.no_grad():
        _, mask_a, cache_a = prefill(model, prompts(1, (4, 9)), 0)
        _, mask_b, cache_b = prefill(model, prompts(2, (12, 3, 6)), 0)
        static = concat_static(fast_decode.StaticCache.from_dynamic(cache_a, mask_a, 0),
                               fast_decode.StaticCache.from_dynamic(cache_b, mask_b, 0), spare=5)
        dynamic, mask = concat_rows(cache_a, mask_a, cache_b, mask_b)
        keep = [4, 1, 3]
        mask = select_rows(dynamic, mask, keep)
        select_static(static, keep)
    assert torch.equal(static.active_mask(), mask) and static.capacity - static.length >= 5
    for layer, k, v in zip(dynamic.layers, static.keys, static.values):
        assert torch.equal(k[:, :, :static.length], layer.keys) and torch.equal(v[:, :, :static.length], layer.values)


def test_rounded_weight_copies_stay_close_to_fp32():
    """bf16 and int8 change the numbers: their logits stay within a stated bound of fp32 (the agreement of
    their greedy tokens on the default model is measured by bench/decode_speed.py, not asserted here)."""
    model = lora_llama().eval()
    ps = prompts()
    with torch.no_grad():
        logits, mask, cache = prefill(model, ps, 0)
        nxt = logits.argmax(-1)
        ref = fast_decode.DecodingCopy(model).step(nxt, fast_decode.StaticCache.from_dynamic(cache, mask, 1))
        scale = ref.abs().max()
        for weights, bound in (("bf16", 0.02), ("int8", 0.05), ("int8-body", 0.05)):
            got = fast_decode.decoding_copy(model, weights).step(nxt, fast_decode.StaticCache.from_dynamic(cache, mask, 1))
            err = float((got - ref).abs().max() / scale)
            assert 0 < err < bound, (weights, err)
