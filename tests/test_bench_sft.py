"""bench/sft_vs_trl.py runs end to end on a tiny model (it must not rot): both engines train the same
conversations to the same losses, its token counts are the data's, and its FLOP formula is exact; no speed
is asserted."""
import json
from pathlib import Path

import pytest
import torch

from tests.conftest import load_bench


def chat_file(path: Path) -> Path:
    """Short conversations: the tiny tokenizer splits real chat into many tokens."""
    words = ["the quick brown fox", "jumps over the lazy dog", "hello world", "what is the date", "answer"]
    rows = []
    for i in range(16):
        turns = []
        for t in range(1 + i % 3):
            turns += [{"role": "user", "content": " ".join(words[(i + t + k) % 5] for k in range(1 + (i + t) % 3))},
                      {"role": "assistant", "content": " ".join(words[(i * 2 + k) % 5] for k in range(1 + i % 2))}]
        rows.append({"messages": turns})
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_sft_bench_on_tiny_model(tiny_model_dir, tmp_path):
    pytest.importorskip("trl")
    pytest.importorskip("datasets")
    out = tmp_path / "sft.json"
    data = chat_file(tmp_path / "chat.jsonl")
    bench = load_bench("sft_vs_trl")
    result = bench.main(["--model", str(tiny_model_dir), "--threads", "1", "--warmup", "1", "--steps", "1",
                         "--modes", "lora", "--layouts", "packed", "--peak-n", "128", "--peak-seconds", "0.1",
                         "--data", str(data), "--out", str(out)])
    assert json.loads(out.read_text()) == json.loads(json.dumps(result))
    assert [r["engine"] for r in result["runs"]] == ["trl", "plugtune/packed"]  # alternating, TRL first
    trl, ours = result["runs"]
    # The tokens of each step, counted from the conversations with transformers' own chat template and
    # tokenizer: real = the rendered conversation; supervised = each assistant turn's reply and <|im_end|>.
    from transformers import AutoTokenizer

    from plugtune.data.batching import batch_indices

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    count = lambda messages, **kw: len(tok(tok.apply_chat_template(messages, tokenize=False, **kw),
                                           add_special_tokens=False)["input_ids"])
    rows = [json.loads(line)["messages"] for line in data.read_text().splitlines()]
    real, supervised = [], []
    for step in range(2):
        chosen = [rows[j] for j in batch_indices(len(rows), step, bench.BATCH, bench.SEED)]
        real.append(sum(count(m) for m in chosen))
        supervised.append(sum(count(m[:k + 1]) - count(m[:k], add_generation_prompt=True) - 1  # not the "\n" after
                              for m in chosen for k in range(len(m)) if m[k]["role"] == "assistant"))
    assert trl["supervised_tokens"] == ours["supervised_tokens"] == supervised and trl["real_tokens"] == real
    # The same conversations in the same steps: with LoRA's B = 0 at the start the same first loss, and after
    # one update the same second one (it moved by ~6e-3; the engines differ by ~5e-7). The plugtune run packed.
    assert len(trl["losses"]) == 2 and ours["losses"] == pytest.approx(trl["losses"], abs=1e-5)
    assert abs(trl["losses"][1] - trl["losses"][0]) > 1e-3
    assert ours["batches"].startswith("packed: one row")
    summary = result["summary"]["lora"]
    assert summary["plugtune/packed"]["padding"] < summary["trl"]["padding"]
    assert 0 < summary["plugtune/packed"]["fraction_of_peak"] and result["matmul_peak_flops"][0] > 0
    assert result["settings"]["trl"]["assistant_only_loss"] is True


def test_bench_skips_without_data(tmp_path, capsys):
    assert load_bench("sft_vs_trl").main(["--data", str(tmp_path / "absent.jsonl")]) is None
    assert "missing" in capsys.readouterr().out


@pytest.mark.parametrize("mode", ["full", "lora"])
def test_flop_formula_matches_torch_flop_counter(tiny_model_dir, mode):
    """The bench's model FLOPs equal what torch counts for one packed step (eager attention so that its
    matmuls are counted; torch counts the full L x L scores, so pairs = sum of L^2 here)."""
    from torch.utils.flop_counter import FlopCounterMode

    from plugtune.adapters import attach_adapter
    from plugtune.data.packing import collate_packed
    from plugtune.data.tokenize import Tokenized
    from plugtune.models.tiny import build_model
    from plugtune.training.compute.next_token import CausalLMObjective

    bench = load_bench("sft_vs_trl")
    dims = bench.model_dims(str(tiny_model_dir))
    g = torch.Generator().manual_seed(0)
    lengths = [30, 12, 20]
    items = [Tokenized(ids, [-100] * 5 + ids[5:]) for ids in (torch.randint(3, 400, (n,), generator=g).tolist() for n in lengths)]
    batch = collate_packed(items, 0, 64)
    model = build_model("llama", dims["vocab"])
    model.config._attn_implementation = "eager"
    if mode == "full":
        for p in model.parameters():
            p.requires_grad_(True)
    else:
        attach_adapter(model, "lora", bench.LORA)
    with FlopCounterMode(display=False) as counter:
        CausalLMObjective()(model, batch)[0].backward()
    supervised = CausalLMObjective().units(batch)
    # The packed row also computes scores between examples (masked out): torch counts the row's W x W.
    pairs = sum(batch["input_ids"].shape[1] ** 2 for _ in range(batch["input_ids"].shape[0]))
    padding = batch["input_ids"].numel() - sum(lengths)  # padded positions run through the layers too
    assert counter.get_total_flops() == bench.step_flops(dims, mode, sum(lengths) + padding, supervised, pairs)


def test_sft_bench_cuda_settings_parse(tmp_path):
    """The CUDA modes (unmeasured here: no GPU) build run configs that plugtune's parser accepts, and qlora
    without CUDA is refused before any run starts."""
    import argparse

    from plugtune.config import load_run_config

    bench = load_bench("sft_vs_trl")
    for mode, expected in (("lora", {"model.dtype=auto", "model.device=cuda", "method=lora"}),
                           ("qlora", {"model.quantize=nf4", "method=lora", "model.device=cuda"}),
                           ("full", {"method=full", "model.device=cuda"})):
        settings = bench.plugtune_settings(argparse.Namespace(mode=mode, device="cuda"))
        assert expected <= set(settings), (mode, settings)
        assert "model.quantize=nf4" not in settings or mode == "qlora"
        cfg = load_run_config(None, [f"data.train={tmp_path / 'x.jsonl'}", "output.dir=" + str(tmp_path / mode),
                                     *[s for s in settings if s != "model.quantize=nf4"]])
        assert cfg.model.device == "cuda"
    assert "model.device=cpu" in bench.plugtune_settings(argparse.Namespace(mode="lora", device="cpu"))
    with pytest.raises(SystemExit):
        bench.main(["--modes", "qlora", "--device", "cpu"])
    assert bench.gpu_peak(argparse.Namespace(device="cpu")) == {}
