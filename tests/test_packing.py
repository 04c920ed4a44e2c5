"""Packing and length grouping change the layout, never the numbers: per-example losses and gradients
of packed rows equal the padded batch's (Llama with RoPE, GPT-2 with absolute positions), whole runs
give the same loss curve and weights, and packing is refused where it would not be exact."""
import json

import pytest
import torch

from plugtune.adapters import attach_adapter
from plugtune.config import ConfigError, load_run_config
from plugtune.data.batching import batch_indices, collate, grouped_batch_indices, grouped_epoch
from plugtune.data.packing import choose_layout, collate_packed, first_fit_decreasing, pack_rows, unsupported
from plugtune.data.tokenize import IGNORE_INDEX, Tokenized
from plugtune.models import varlen
from plugtune.models.tiny import build_model
from plugtune.training.compute.token_logps import token_logps
from plugtune.training.compute.next_token import CausalLMObjective

VOCAB = 400
MAX_LENGTH = 24


def uneven_items(n=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    items = []
    for i in range(n):
        length = 3 + (i * 5) % 13  # 3 .. 15 tokens
        ids = torch.randint(3, VOCAB, (length,), generator=g).tolist()
        prompt = i % 3  # i % 3 == 0: every token labelled, the first one included (train_on=all)
        items.append(Tokenized(ids, [IGNORE_INDEX] * prompt + ids[prompt:]))
    return items


def placements(items, max_length=MAX_LENGTH, flat=False):
    """(row, start, length) of each item in collate_packed's layout."""
    lengths = [len(it.input_ids) for it in items]
    where = {}
    for r, row in enumerate([list(range(len(items)))] if flat else pack_rows(lengths, max_length)):
        at = 0
        for i in row:
            where[i] = (r, at, lengths[i])
            at += lengths[i]
    return [where[i] for i in range(len(items))]


def test_pack_rows_fills_rows_within_max_length():
    assert pack_rows([5, 4, 3, 3, 1], 8) == [[0, 2], [1, 3, 4]]  # 16 tokens in 2 x 8 positions
    # Plain first-fit decreasing at max_length makes 2 rows of width 8 (16 positions); the narrowest
    # width that keeps 2 rows is 6: [6] and [2, 2], 12 positions.
    assert first_fit_decreasing([6, 2, 2], 8) == [[0, 1], [2]]
    assert pack_rows([6, 2, 2], 8) == [[0], [1, 2]]
    g = torch.Generator().manual_seed(0)
    for _ in range(50):
        lengths = torch.randint(1, 40, (int(torch.randint(1, 12, (1,), generator=g)),), generator=g).tolist()
        rows = pack_rows(lengths, 40)
        assert sorted(i for row in rows for i in row) == list(range(len(lengths)))
        width = max(sum(lengths[i] for i in row) for row in rows)
        plain = first_fit_decreasing(lengths, 40)
        assert width <= 40 and len(rows) * width <= len(plain) * max(sum(lengths[i] for i in r) for r in plain)
    with pytest.raises(ValueError, match="does not fit"):
        pack_rows([9], 8)


def test_collate_packed_layout():
    items = [Tokenized([11, 12, 13], [-100, 12, 13]), Tokenized([21, 22], [21, 22]), Tokenized([31, 32, 33, 34], [31, 32, 33, 34])]
    batch = collate_packed(items, pad_id=0, max_length=6)
    assert set(batch) == {"input_ids", "position_ids", "labels"}  # no attention_mask: the positions carry it
    # 9 tokens: two rows of width 5 (10 positions), not 6 + 3 in rows of max_length 6 (12 positions).
    assert batch["input_ids"].tolist() == [[31, 32, 33, 34, 0], [11, 12, 13, 21, 22]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 3, 0], [0, 1, 2, 0, 1]]
    # Each example's first token has no label: it would be predicted from the previous example.
    assert batch["labels"].tolist() == [[-100, 32, 33, 34, -100], [-100, 12, 13, -100, 22]]
    assert CausalLMObjective().units(batch) == CausalLMObjective().units(collate(items, 0)) == 6
    flat = collate_packed(items, pad_id=0, max_length=6, flat=True)  # one row, no padding, boundaries given
    assert flat["input_ids"].tolist() == [[11, 12, 13, 21, 22, 31, 32, 33, 34]]
    assert flat["position_ids"].tolist() == [[0, 1, 2, 0, 1, 0, 1, 2, 3]]
    assert flat["labels"].tolist() == [[-100, 12, 13, -100, 22, -100, 32, 33, 34]]
    assert set(flat) == set(batch) and varlen.boundaries(flat["position_ids"][0]).tolist() == [0, 3, 5, 9]


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
@pytest.mark.parametrize("flat, attention", [(False, "sdpa"), (False, "eager"), (True, "plugtune_varlen"), (True, "sdpa")])
def test_packed_equals_padded_per_example_losses_and_gradients(arch, flat, attention):
    """Rows under transformers' block-diagonal mask, and one row with per-example attention (or, less
    efficiently, under sdpa's block-diagonal mask): each example's log-probs and gradients are its own."""
    items = uneven_items(8)
    padded, packed = collate(items, 0), collate_packed(items, 0, MAX_LENGTH, flat=flat)
    assert packed["input_ids"].numel() < 0.8 * padded["input_ids"].numel()  # it does remove padding
    assert packed["input_ids"].shape[0] < len(items)  # rows hold several examples
    model = build_model(arch, VOCAB)  # eval mode: GPT-2 has dropout; gradients flow all the same
    varlen.switch(model, attention)

    lp_padded, lp_packed = token_logps(model, padded).per_token, token_logps(model, packed).per_token
    for i, (r, at, n) in enumerate(placements(items, flat=flat)):
        torch.testing.assert_close(lp_packed[r, at:at + n - 1], lp_padded[i, :n - 1], msg=f"example {i}")

    def grads(batch):
        model.zero_grad()
        loss, _ = CausalLMObjective()(model, batch)
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}

    loss_padded, g_padded = grads(padded)
    loss_packed, g_packed = grads(packed)
    torch.testing.assert_close(loss_packed, loss_padded)
    for name in g_padded:
        torch.testing.assert_close(g_packed[name], g_padded[name], rtol=1e-4, atol=1e-6, msg=name)

    # One example's gradient, taken inside a packed row next to others, equals its gradient alone:
    # nothing flows across the example boundary in either direction.
    i = next(i for i, (r, at, n) in enumerate(placements(items, flat=flat)) if at > 0)
    r, at, n = placements(items, flat=flat)[i]
    only_i = dict(packed, labels=torch.full_like(packed["labels"], IGNORE_INDEX))
    only_i["labels"][r, at + 1:at + n] = packed["labels"][r, at + 1:at + n]
    _, g_inside = grads(only_i)
    _, g_alone = grads(collate([items[i]], 0))
    for name in g_alone:
        torch.testing.assert_close(g_inside[name], g_alone[name], rtol=1e-4, atol=1e-6, msg=name)


def test_varlen_attention_is_sdpa_on_unpacked_inputs():
    """A model switched to plugtune_varlen computes what sdpa computes for padded batches and decoding."""
    model = build_model("llama", VOCAB)
    padded = collate(uneven_items(4), 0)
    before = model(input_ids=padded["input_ids"], attention_mask=padded["attention_mask"]).logits
    tokens = model.generate(padded["input_ids"][:1, :5], max_new_tokens=6, do_sample=False)
    varlen.switch(model, varlen.NAME)
    after = model(input_ids=padded["input_ids"], attention_mask=padded["attention_mask"]).logits
    assert torch.equal(after, before)
    assert torch.equal(model.generate(padded["input_ids"][:1, :5], max_new_tokens=6, do_sample=False), tokens)


def test_layout_choice_and_refusals(monkeypatch):
    model = build_model("llama", VOCAB)
    layout = choose_layout("auto", "auto", model)
    assert (layout.pack, layout.flat, layout.group) == (True, True, False)
    assert model.config._attn_implementation == "plugtune_varlen"  # stands in for sdpa
    mask_model = build_model("llama", VOCAB)
    layout = choose_layout("auto", "auto", mask_model, packed_attention="mask")
    assert (layout.pack, layout.flat) == (True, False) and mask_model.config._attn_implementation == "sdpa"
    eager = build_model("llama", VOCAB)
    varlen.switch(eager, "eager")
    layout = choose_layout("auto", "auto", eager)  # varlen replaces sdpa only: eager models get masked rows
    assert (layout.pack, layout.flat) == (True, False) and eager.config._attn_implementation == "eager"
    assert not choose_layout("auto", True, model).pack and choose_layout("auto", True, model).group  # asked for
    assert (choose_layout(False, "auto", model).pack, choose_layout(False, "auto", model).group) == (False, True)
    assert (choose_layout(False, False, model).pack, choose_layout(False, False, model).group) == (False, False)

    prompted = build_model("llama", VOCAB)
    attach_adapter(prompted, "prompt_tuning", {"num_virtual_tokens": 4})
    with pytest.raises(ValueError, match="data.packing=true, but prompt and prefix tuning put virtual tokens"):
        choose_layout(True, "auto", prompted)
    layout = choose_layout("auto", "auto", prompted)
    assert (layout.pack, layout.group) == (False, True) and "not packed: prompt and prefix tuning" in layout.note
    assert prompted.config._attn_implementation == "sdpa"  # the switch is undone when packing is not used

    # A transformers version that builds no block-diagonal mask from restarting positions: the probe
    # sees the second example attend to the first, so masked rows are refused (varlen needs no such mask).
    from transformers import masking_utils

    monkeypatch.setattr(masking_utils, "find_packed_sequence_indices", lambda position_ids: None)
    plain = build_model("llama", VOCAB)
    assert "crosses example boundaries" in unsupported(plain, flat=False)
    assert not choose_layout("auto", "auto", plain, packed_attention="mask").pack
    assert choose_layout("auto", "auto", plain).flat


def test_length_grouping_is_seeded_resumable_and_covers_the_epoch():
    g = torch.Generator().manual_seed(0)
    lengths = tuple((torch.randperm(103, generator=g) + 1).tolist())  # distinct lengths 1..103
    per_epoch = 103 // 4
    for epoch in range(2):
        got = [grouped_batch_indices(lengths, epoch * per_epoch + k, 4, 7) for k in range(per_epoch)]
        shuffled = [batch_indices(103, epoch * per_epoch + k, 4, 7) for k in range(per_epoch)]
        # The same items as the shuffled epoch (the same 3 dropped), each once, in batches of 4.
        assert sorted(sum(got, [])) == sorted(sum(shuffled, []))
        assert all(len(b) == 4 for b in got)
        # One run of 50 batches holds the whole epoch, so each batch is 4 neighbours in length order.
        ranks = {i: r for r, i in enumerate(sorted(sum(got, []), key=lambda i: -lengths[i]))}
        assert sorted(sorted(ranks[i] for i in b) for b in got) == [list(range(4 * k, 4 * k + 4)) for k in range(per_epoch)]
        padded = lambda batches: sum(len(b) * max(lengths[i] for i in b) for b in batches)
        assert padded(got) < 0.7 * padded(shuffled)
    grouped_epoch.cache_clear()  # resuming in a fresh process recomputes the same order
    assert grouped_batch_indices(lengths, per_epoch + 5, 4, 7) == got[5]
    assert grouped_batch_indices(lengths, 5, 4, 8) != grouped_batch_indices(lengths, 5, 4, 7)


def test_speed_config_keys_are_validated():
    cfg = load_run_config(None, ["data.train=x.jsonl"])
    assert (cfg.data.packing, cfg.data.group_by_length, cfg.training.gradient_checkpointing, cfg.training.threads) == \
        ("auto", "auto", False, 0)
    assert load_run_config(None, ["data.packing=false", "data.group_by_length=true"]).data.packing is False
    with pytest.raises(ConfigError, match="data.packing='sometimes' is not one of auto, true, false"):
        load_run_config(None, ["data.packing=sometimes"])
    with pytest.raises(ConfigError, match="choose one"):
        load_run_config(None, ["data.packing=true", "data.group_by_length=true"])
    with pytest.raises(ConfigError, match="objective=sft"):
        load_run_config(None, ["data.packing=true", "objective=reward"])
    with pytest.raises(ConfigError, match="training.threads must be >= 0"):
        load_run_config(None, ["training.threads=-1"])


@pytest.fixture
def chat_files(tmp_path):
    words = ["the quick brown fox", "jumps over the lazy dog", "hello world", "what is the date", "answer"]
    rows = []
    for i in range(20):
        turns = []
        for t in range(1 + i % 3):
            turns += [{"role": "user", "content": " ".join(words[(i + t + k) % 5] for k in range(1 + (i * 3 + t) % 4))},
                      {"role": "assistant", "content": " ".join(words[(i * 2 + k) % 5] for k in range(1 + (i + t) % 3))}]
        rows.append({"messages": turns})
    train, held = tmp_path / "train.jsonl", tmp_path / "eval.jsonl"
    train.write_text("".join(json.dumps(r) + "\n" for r in rows[:16]))
    held.write_text("".join(json.dumps(r) + "\n" for r in rows[16:]))
    return train, held


def run_sft(model_dir, files, out, *extra):
    from plugtune.training.run import train

    cfg = load_run_config(None, [f"model.name={model_dir}", f"data.train={files[0]}", f"data.eval={files[1]}",
                                 "data.max_length=96", "method=lora", "adapter.r=4", "adapter.dropout=0.0",
                                 "training.max_steps=3", "training.batch_size=4", "training.grad_accum=2",
                                 "training.lr=1e-2", "training.progress=false", f"output.dir={out}", *extra])
    report = train(cfg)
    log = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    from safetensors.torch import load_file

    return report, [r["loss"] for r in log if r["kind"] == "train"], load_file(out / "adapter" / "adapter_model.safetensors")


def test_packed_run_equals_padded_run(tiny_model_dir, chat_files, tmp_path, capsys):
    """Through config, data, loop and accumulation: the same loss curve, eval loss and adapter."""
    r0, loss0, w0 = run_sft(tiny_model_dir, chat_files, tmp_path / "padded", "data.packing=false",
                            "data.group_by_length=false")
    assert "batches: padded batches" in capsys.readouterr().out
    r1, loss1, w1 = run_sft(tiny_model_dir, chat_files, tmp_path / "packed")  # the default: auto
    assert "batches: packed: one row per micro-batch" in capsys.readouterr().out
    r2, loss2, w2 = run_sft(tiny_model_dir, chat_files, tmp_path / "rows", "data.packed_attention=mask")
    assert "batches: packed rows of at most max_length" in capsys.readouterr().out
    for report, loss, weights in ((r1, loss1, w1), (r2, loss2, w2)):
        assert loss == pytest.approx(loss0, rel=1e-5) and len(loss0) == 3
        assert report.eval_loss == pytest.approx(r0.eval_loss, rel=1e-5)
        for key in w0:
            torch.testing.assert_close(weights[key], w0[key], rtol=1e-4, atol=1e-6, msg=key)
    assert loss0[-1] < loss0[0]


def test_auto_layout_on_a_gpu_pads_and_groups(monkeypatch):
    """On CUDA, auto uses padded batches grouped by length (measured faster there); packing=true still packs."""
    from plugtune.data import packing

    monkeypatch.setattr(packing, "on_gpu", lambda model: True)
    model = build_model("llama", VOCAB)
    layout = choose_layout("auto", "auto", model)
    assert (layout.pack, layout.group) == (False, True) and "on a GPU" in layout.note
    assert model.config._attn_implementation == "sdpa"  # left as it was
    assert choose_layout(True, "auto", model).pack
