"""`plugtune adapters check --for vllm`: adapters vLLM would refuse are named, with what to change."""
import argparse
import json

import pytest

import plugtune
from plugtune.adapters import attach_adapter, save_adapter
from plugtune.serve.cli import add_check_parser
from plugtune.adapters.vllm_check import check_adapter, check_for_vllm, needed_max_rank


@pytest.fixture(scope="module")
def saved(tiny_model_dir, tmp_path_factory):
    """name -> directory of adapters saved by plugtune on the tiny model."""
    root = tmp_path_factory.mktemp("vllm")
    specs = {"lora8": ("lora", {"r": 8}), "lora64": ("lora", {"r": 64}), "dora": ("lora", {"r": 8, "use_dora": True}),
             "ia3": ("ia3", {})}
    lm = plugtune.load(str(tiny_model_dir))
    for name, (method, cfg) in specs.items():
        attach_adapter(lm.model, method, cfg, name=name, trainable=False)
        save_adapter(lm.model, root / name, name, base_name="HuggingFaceTB/SmolLM2-135M-Instruct")
    return root


def edited(src, dst, **changes):
    """A copy of adapter `src` with adapter_config.json fields changed."""
    dst.mkdir()
    for f in src.iterdir():
        (dst / f.name).write_bytes(f.read_bytes())
    cfg = json.loads((dst / "adapter_config.json").read_text())
    cfg.update(changes)
    (dst / "adapter_config.json").write_text(json.dumps(cfg))
    return dst


def test_plain_lora_passes_with_the_command_to_serve_it(saved):
    check = check_adapter(saved / "lora8")
    assert check.ok and check.rank == 8 and not check.warnings
    checks, report = check_for_vllm(saved / "lora8")
    assert f"vllm serve HuggingFaceTB/SmolLM2-135M-Instruct --enable-lora --lora-modules lora8={saved / 'lora8'}" \
        in report


def test_refusals_name_the_fix(saved, tmp_path):
    dora = check_adapter(saved / "dora")
    assert not dora.ok and "DoRA" in dora.errors[0] and "plugtune merge" in dora.errors[0]
    ia3 = check_adapter(saved / "ia3")
    assert not ia3.ok and "LoRA adapters only; this one is IA3" in ia3.errors[0]
    mts = check_adapter(edited(saved / "lora8", tmp_path / "mts", modules_to_save=["lm_head"]))
    assert mts.errors == [e for e in mts.errors if "modules_to_save" in e] and len(mts.errors) == 1
    pattern = check_adapter(edited(saved / "lora8", tmp_path / "pat", rank_pattern={"q_proj": 32}))
    assert pattern.rank == 32 and any("rank_pattern" in e for e in pattern.errors)
    bias = check_adapter(edited(saved / "lora8", tmp_path / "bias", bias="all"))
    assert any("bias 'none'" in e for e in bias.errors)
    huge = check_adapter(edited(saved / "lora8", tmp_path / "huge", r=1024))
    assert any("retrain with r <= 512" in e for e in huge.errors)


def test_rank_against_max_lora_rank(saved):
    default = check_adapter(saved / "lora64")
    assert default.ok and "--max-lora-rank 64" in default.warnings[0]  # above vLLM's default of 16
    too_small = check_adapter(saved / "lora64", max_lora_rank=32)
    assert not too_small.ok and "start vLLM with --max-lora-rank 64" in too_small.errors[0]
    assert check_adapter(saved / "lora64", max_lora_rank=64).ok
    assert [needed_max_rank(r) for r in (1, 2, 8, 9, 300, 321)] == [1, 8, 8, 16, 320, 512]
    with pytest.raises(ValueError, match="not one vLLM accepts"):
        check_for_vllm(saved / "lora64", max_lora_rank=24)


def test_a_directory_of_adapters_and_the_cli(saved, capsys):
    checks, report = check_for_vllm(saved)
    assert {c.path.name: c.ok for c in checks} == {"dora": False, "ia3": False, "lora64": True, "lora8": True}
    assert "--max-lora-rank 64 --max-loras 2 --lora-modules" in report and "2/4 adapter(s)" in report
    parser = argparse.ArgumentParser()
    add_check_parser(parser.add_subparsers())
    args = parser.parse_args(["check", "--for", "vllm", str(saved)])
    with pytest.raises(SystemExit) as exit_:
        args.func(args)
    assert exit_.value.code == 1 and "FAIL" in capsys.readouterr().out
    args = parser.parse_args(["check", "--for", "vllm", str(saved / "lora8")])
    args.func(args)  # passes: no exit
    assert "ok   " in capsys.readouterr().out
