"""The chunked LM head equals the unchunked one and never keeps (N, V) logits for the backward;
gradient checkpointing gives the same gradients (LoRA on a frozen base, and full fine-tuning) and
really recomputes; training.threads is applied."""
import pytest
import torch
import torch.nn.functional as F

from plugtune.adapters import attach_adapter
from plugtune.data.batching import collate
from plugtune.data.tokenize import IGNORE_INDEX, Tokenized
from plugtune.models.causal_lm import lm_head
from plugtune.models.tiny import build_model
from plugtune.training.compute.logprobs import labelled_logps
from plugtune.training.compute.token_logps import token_logps
from plugtune.training.compute.next_token import CausalLMObjective
from tests.references import full_logits_loss_sum
from plugtune.training.engine.speed import enable_gradient_checkpointing, set_threads

VOCAB = 400


def batch(n=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    items = []
    for i in range(n):
        ids = torch.randint(3, VOCAB, (8 + 3 * i,), generator=g).tolist()
        items.append(Tokenized(ids, [IGNORE_INDEX] * (2 + i) + ids[2 + i:]))
    return collate(items, 0)


def loss_and_grads(model, b, objective):
    """Summed loss and parameter gradients; `objective` is an Objective or a plain loss function."""
    model.zero_grad()
    loss = objective(model, b)
    loss = loss[0] if isinstance(loss, tuple) else loss
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_chunked_head_equals_unchunked_loss_and_gradients():
    model = build_model("llama", VOCAB)  # full fine-tuning: the tied head/embedding gets gradients too
    b = batch()
    n = CausalLMObjective().units(b)
    assert n > 3 * 7  # several chunks of 7
    loss_full, g_full = loss_and_grads(model, b, full_logits_loss_sum)
    loss_one, g_one = loss_and_grads(model, b, CausalLMObjective(chunk=10_000))
    loss_chunked, g_chunked = loss_and_grads(model, b, CausalLMObjective(chunk=7))
    torch.testing.assert_close(loss_one, loss_full)
    torch.testing.assert_close(loss_chunked, loss_full)
    assert g_full.keys() == g_chunked.keys() and "model.embed_tokens.weight" in g_full
    for name in g_full:
        torch.testing.assert_close(g_chunked[name], g_full[name], rtol=1e-4, atol=1e-6, msg=name)
        torch.testing.assert_close(g_one[name], g_full[name], rtol=1e-4, atol=1e-6, msg=name)


def test_token_logps_chunked_equals_reference_with_temperature():
    model = build_model("llama", VOCAB)
    b = batch()
    logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits[:, :-1].float() / 0.7
    targets = b["labels"][:, 1:]
    ref = logits.log_softmax(-1).gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1) * (targets != IGNORE_INDEX)
    for chunk in (5, 10_000):
        torch.testing.assert_close(token_logps(model, b, temperature=0.7, chunk=chunk).per_token, ref)


def test_chunked_head_keeps_no_full_logits_for_the_backward():
    """Saved-tensor hooks see what autograd keeps outside checkpointed regions: unchunked, the (N, V)
    log-softmax; chunked, nothing vocabulary-sized beyond one chunk (chunks are recomputed)."""
    model = build_model("llama", VOCAB)
    b = batch()
    hidden = model.model(input_ids=b["input_ids"], attention_mask=b["attention_mask"])[0][:, :-1]
    keep = b["labels"][:, 1:] != IGNORE_INDEX
    rows, targets = hidden[keep], b["labels"][:, 1:][keep]  # (N, C), (N,)

    def largest_saved(chunk):
        sizes = []

        def pack(t):
            sizes.append(t.numel())
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            logps = labelled_logps(lm_head(model), rows, targets, chunk)
        logps.sum().backward(retain_graph=True)
        return max(sizes), logps.detach()

    big, ref = largest_saved(10_000)
    small, got = largest_saved(8)
    assert big >= rows.shape[0] * VOCAB  # unchunked keeps (N, V)
    assert small < 8 * VOCAB  # chunked keeps the head weight (V, C) and (N, C) inputs, no (n, V) logits
    torch.testing.assert_close(got, ref)
    torch.testing.assert_close(ref, -F.cross_entropy(lm_head(model)(rows), targets, reduction="none"))


def count_layer_calls(model):
    calls = []
    model.model.layers[0].input_layernorm.register_forward_hook(lambda *a: calls.append(1))
    return calls


@pytest.mark.parametrize("method", ["lora", "full"])
def test_gradient_checkpointing_gives_the_same_gradients(method):
    def make(checkpointing):
        model = build_model("llama", VOCAB)
        if method == "lora":
            torch.manual_seed(1)
            attach_adapter(model, "lora", {"r": 4, "dropout": 0.0})
            with torch.no_grad():  # B = 0 at init would give A no gradient
                for name, p in model.named_parameters():
                    if "lora_B" in name:
                        p.normal_(0, 0.1)
        else:
            for p in model.parameters():
                p.requires_grad_(True)
        if checkpointing:
            enable_gradient_checkpointing(model)
        return model.train()

    b = batch()
    plain, ckpt = make(False), make(True)
    calls_plain, calls_ckpt = count_layer_calls(plain), count_layer_calls(ckpt)
    loss_plain, g_plain = loss_and_grads(plain, b, CausalLMObjective())
    loss_ckpt, g_ckpt = loss_and_grads(ckpt, b, CausalLMObjective())
    assert (len(calls_plain), len(calls_ckpt)) == (1, 2)  # the layer really ran again in the backward
    torch.testing.assert_close(loss_ckpt, loss_plain)
    trainable = {n for n, p in plain.named_parameters() if p.requires_grad}
    assert set(g_plain) == set(g_ckpt) == trainable
    if method == "lora":
        assert all("lora_" in n for n in trainable) and all(g_plain[n].abs().sum() > 0 for n in trainable)
    for name in g_plain:
        torch.testing.assert_close(g_ckpt[name], g_plain[name], rtol=1e-5, atol=1e-7, msg=name)


def test_threads_setting():
    before = torch.get_num_threads()
    try:
        set_threads(1)
        assert torch.get_num_threads() == 1
        set_threads(0)  # 0 leaves it as is
        assert torch.get_num_threads() == 1
        with pytest.raises(ValueError):
            set_threads(-2)
    finally:
        torch.set_num_threads(before)


def test_run_applies_threads_and_checkpointing(tiny_model_dir, tmp_path):
    import json

    from plugtune.config import load_run_config
    from plugtune.training.run import train

    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps({"messages": [{"role": "user", "content": f"what is {i}"},
                                                     {"role": "assistant", "content": "hello world " * (1 + i % 3)}]}) + "\n"
                            for i in range(8)))
    losses = {}
    before = torch.get_num_threads()
    try:
        for ckpt in (False, True):
            out = tmp_path / f"run-{ckpt}"
            train(load_run_config(None, [f"model.name={tiny_model_dir}", f"data.train={data}", "method=lora",
                                         "adapter.dropout=0.0", "training.max_steps=2", "training.batch_size=4",
                                         "training.lr=1e-2", "training.progress=false", "training.threads=1",
                                         f"training.gradient_checkpointing={str(ckpt).lower()}", f"output.dir={out}"]))
            assert torch.get_num_threads() == 1
            losses[ckpt] = [json.loads(l)["loss"] for l in (out / "metrics.jsonl").read_text().splitlines()]
    finally:
        torch.set_num_threads(before)
    assert losses[True] == pytest.approx(losses[False], rel=1e-5) and losses[True][1] != losses[True][0]
