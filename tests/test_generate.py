"""Generation: the KV-cache loop with left padding equals a no-cache greedy reference."""
import torch

from plugtune.adapters import adapter_state, attach_adapter
from plugtune.data.tokenize import prompt_ids
from plugtune.inference.generate import GenerationConfig, generate, generate_ids, sample_next
from plugtune.models.tiny import build_model


def greedy_reference(model, prompt, n, stop):
    """Re-run the whole sequence every step (no cache, no padding)."""
    ids = list(prompt)
    out = []
    with torch.no_grad():
        for _ in range(n):
            nxt = int(model(torch.tensor([ids])).logits[0, -1].argmax())
            if nxt in stop:
                break
            out.append(nxt)
            ids.append(nxt)
    return out


def test_cached_batched_greedy_equals_reference():
    model = build_model("llama", 400, seed=3)
    attach_adapter(model, "lora", {"r": 4})
    with torch.no_grad():
        for p in adapter_state(model, "default").values():
            p.add_(torch.randn_like(p) * 0.3)
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(3, 400, (n,), generator=g).tolist() for n in (5, 11, 8)]
    out = generate_ids(model, prompts, stop_ids=[2], pad_id=0, cfg=GenerationConfig(max_new_tokens=8))
    for prompt, got in zip(prompts, out):
        assert got == greedy_reference(model, prompt, 8, [2])


def test_sampling_is_seeded_and_respects_top_k():
    logits = torch.tensor([[0.0, 5.0, 4.9, -1.0]])
    cfg = GenerationConfig(temperature=1.0, top_k=2, seed=0)
    draws = {int(sample_next(logits, cfg, torch.Generator().manual_seed(i))) for i in range(50)}
    assert draws == {1, 2}
    top_p = GenerationConfig(temperature=1.0, top_p=0.3)
    assert {int(sample_next(logits, top_p, torch.Generator().manual_seed(i))) for i in range(20)} == {1}


def test_generate_text_stops_at_end_of_turn(tokenizer):
    model = build_model("llama", len(tokenizer))
    end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    embeddings = model.model.embed_tokens.weight.detach().clone()
    with torch.no_grad():  # make <|im_end|> the most likely token after the prompt, in the output layer only
        model.lm_head.weight = torch.nn.Parameter(model.lm_head.weight.detach().clone())  # untie
        model.config.tie_word_embeddings = False
        model.lm_head.weight[end] += 100 * model.model.norm.weight.sign()
    assert model.lm_head.weight is not model.model.embed_tokens.weight
    assert torch.equal(model.model.embed_tokens.weight, embeddings)
    prompt = prompt_ids(tokenizer, [{"role": "user", "content": "hi"}])
    (free,) = generate_ids(model, [prompt], stop_ids=[0], pad_id=0, cfg=GenerationConfig(max_new_tokens=5))
    assert free[0] == end and len(free) == 5  # <|im_end|> first; with nothing to stop at, five tokens
    # Decoding skips special tokens, so "" alone would not show that generation stopped: count the
    # forward passes too. Stopping at once is the prompt's pass only; not stopping would be five.
    calls = []
    model.register_forward_hook(lambda *_: calls.append(1))
    assert generate(model, tokenizer, ["hi"], GenerationConfig(max_new_tokens=5)) == [""]
    assert len(calls) == 1


def test_repeated_prompts_prefill_once_and_decode_as_if_each_were_alone():
    """GRPO's G samples of a prompt: one prefill per distinct prompt, its cache copied to each row; greedy
    rows equal the no-cache reference, and seeded sampling draws exactly what unshared prefill draws,
    also with prompt and prefix tuning (whose virtual inputs enter at the prefill)."""
    from plugtune.inference.generate import _decode

    g = torch.Generator().manual_seed(0)
    a, b = (torch.randint(3, 400, (n,), generator=g).tolist() for n in (6, 9))
    prompts = [a, b, a, a, b]
    for method, cfg in (("lora", {"r": 4}), ("prompt_tuning", {"num_virtual_tokens": 3}),
                        ("prefix_tuning", {"num_virtual_tokens": 3})):
        model = build_model("llama", 400, seed=3)
        attach_adapter(model, method, cfg)
        with torch.no_grad():
            for p in adapter_state(model, "default").values():
                p.add_(torch.randn_like(p) * 0.3)
        calls = []
        handle = model.register_forward_pre_hook(lambda m, args, kwargs: calls.append(
            (kwargs.get("input_ids") if kwargs.get("input_ids") is not None else kwargs["inputs_embeds"]).shape[0]),
            with_kwargs=True)
        greedy = generate_ids(model, prompts, stop_ids=[2], pad_id=0, cfg=GenerationConfig(max_new_tokens=6))
        assert calls[0] == 2 and set(calls[1:]) <= {5}, (method, calls)  # prefill: the 2 distinct prompts only
        handle.remove()
        assert greedy[0] == greedy[2] == greedy[3] and greedy[1] == greedy[4]
        if method == "lora":
            assert greedy[0] == greedy_reference(model, a, 6, [2]) and greedy[1] == greedy_reference(model, b, 6, [2])
        sampling = GenerationConfig(max_new_tokens=6, temperature=1.0, seed=7)
        shared = generate_ids(model, prompts, stop_ids=[2], pad_id=0, cfg=sampling)
        alone = _decode(model, prompts, [2], 0, sampling, include_stop=False, share_prompts=False)
        assert shared == alone, method
        assert len({tuple(x) for x in shared}) > 2  # the samples of one prompt differ


def test_sampling_draws_each_token_with_its_probability():
    """Inverse-CDF sampling: frequencies over many rows match softmax(logits / T); masked tokens never appear."""
    probs = torch.tensor([0.1, 0.2, 0.3, 0.4, 0.0])
    logits = probs.clamp(min=1e-30).log().expand(40_000, 5) * 2.0  # temperature 2 undoes the doubling
    logits = logits.masked_fill(probs == 0, float("-inf"))
    draws = sample_next(logits, GenerationConfig(temperature=2.0), torch.Generator().manual_seed(0))
    freq = torch.bincount(draws, minlength=5).float() / draws.numel()
    assert torch.allclose(freq, probs, atol=0.01), freq
    assert int(freq[4] * draws.numel()) == 0
    again = sample_next(logits, GenerationConfig(temperature=2.0), torch.Generator().manual_seed(0))
    assert torch.equal(draws, again)  # seeded
