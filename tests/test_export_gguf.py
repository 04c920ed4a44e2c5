"""GGUF export: round trips through plugtune's own GGUF reader and transformers' GGUF loader, the LoRA
GGUF applied by hand, and every refusal (architecture, existing output, full disk, adapters llama.cpp
cannot load). Tiny Llama (2 layers, hidden 64); the default model behind `slow`.

Bounds, measured on the tiny random Llama with a merged random LoRA (max |logit difference| / max |logit|,
four seeds): f32 0 (bit-identical), f16 1.0e-3 to 3.3e-3, q8_0 0.035 to 0.069 (greedy argmax kept at
91-100% of positions); asserted at 5e-3 and 0.1. (The default model's figures are in bench/gguf_roundtrip.py.)
"""
from __future__ import annotations

import errno
from pathlib import Path

import gguf
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from plugtune.adapters.io import attach_adapter, save_adapter
from plugtune.adapters.merge import fold_into_base
from plugtune.cli import main
from plugtune.export import export_gguf
from plugtune.export.gguf_writer import write_gguf_file
from plugtune.export.lora_gguf import UnsupportedAdapterError
from plugtune.export.modelfile import modelfile_text
from plugtune.export.tensor_names import UnsupportedArchitectureError, permute_qk, unpermute_qk
from plugtune.models.default_model import convert_gguf
from plugtune.models.loading import load_base
from plugtune.models.tiny import build_model, build_tokenizer

TEXT = ["the quick brown fox jumps over the lazy dog", "what is 12 + 30 ? answer : 42"]
BOUNDS = {"f32": 0.0, "f16": 5e-3, "q8_0": 0.1}  # max |Δ logit| / max |logit|


def _save_model(path: Path, arch: str = "llama") -> Path:
    tok = build_tokenizer()
    model = build_model(arch, vocab_size=len(tok))
    model.save_pretrained(path, safe_serialization=True)
    tok.save_pretrained(path)
    return path


def _make_adapter(model_dir: Path, out: Path, method: str = "lora", cfg: dict | None = None, seed: int = 1) -> Path:
    """An adapter with non-zero weights everywhere (a fresh LoRA's B is zero: it would prove nothing)."""
    base = load_base(str(model_dir), "float32", "cpu")
    if cfg is None:
        cfg = {"r": 4, "alpha": 8, "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj", "down_proj"]}
    attach_adapter(base.model, method, cfg)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in base.model.named_parameters():
            if ".default." in name or name.endswith(".default"):
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    save_adapter(base.model, out, base_name=str(model_dir))
    return out


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return _save_model(tmp_path_factory.mktemp("base") / "tiny-llama")


@pytest.fixture(scope="module")
def lora_dir(model_dir, tmp_path_factory):
    return _make_adapter(model_dir, tmp_path_factory.mktemp("lora") / "adapter")


@pytest.fixture(scope="module")
def merged(model_dir, lora_dir):
    """The reference: plugtune's own merge of the adapter into the base."""
    lm = load_base(str(model_dir), "float32", "cpu")
    from plugtune.adapters.io import load_adapter

    load_adapter(lm.model, lora_dir)
    fold_into_base(lm.model)
    return lm.model.eval(), lm.tokenizer


def _logits(model, tokenizer) -> torch.Tensor:
    batch = tokenizer(TEXT, return_tensors="pt", padding=True)
    with torch.no_grad():
        return model(**batch).logits


@pytest.mark.parametrize("quant", ["f32", "f16", "q8_0"])
def test_merged_export_loads_in_transformers_with_the_merged_logits(quant, model_dir, lora_dir, merged, tmp_path):
    out = export_gguf(tmp_path / "m.gguf", model=str(model_dir), adapter=lora_dir, quant=quant).path
    model, tok = merged
    want = _logits(model, tok)
    got_model = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file=out.name, dtype=torch.float32).eval()
    got = _logits(got_model, tok)
    if quant == "f32":
        torch.testing.assert_close(got, want, rtol=0, atol=0)  # the same fp32 weights, bit for bit
    else:
        rel = ((got - want).abs().max() / want.abs().max()).item()
        assert 0 < rel <= BOUNDS[quant], rel
        assert (got.argmax(-1) == want.argmax(-1)).float().mean() >= 0.85


def test_merged_f32_export_loads_through_plugtunes_reader(model_dir, lora_dir, merged, tmp_path):
    out = export_gguf(tmp_path / "m.gguf", model=str(model_dir), adapter=lora_dir, quant="f32").path
    convert_gguf(out, tmp_path / "read", name="tiny-export")
    back = load_base(str(tmp_path / "read"), "float32", "cpu")
    model, tok = merged
    torch.testing.assert_close(_logits(back.model, tok), _logits(model, tok), rtol=0, atol=0)
    # The tokenizer travelled too: the same ids for the same text, and the same chat template.
    assert back.tokenizer(TEXT)["input_ids"] == tok(TEXT)["input_ids"]
    assert back.tokenizer.chat_template == tok.chat_template
    chat = [{"role": "user", "content": "what is 2 + 2 ?"}]
    assert back.tokenizer.apply_chat_template(chat, tokenize=False) == tok.apply_chat_template(chat, tokenize=False)


def test_gguf_metadata_and_q_k_permutation(model_dir, tmp_path):
    out = export_gguf(tmp_path / "m.gguf", model=str(model_dir), quant="f32").path
    reader = gguf.GGUFReader(out)
    fields = {k: f.contents() for k, f in reader.fields.items() if k not in ("tokenizer.ggml.merges",)}
    assert fields["general.architecture"] == "llama" and fields["general.type"] == "model"
    assert fields["llama.attention.head_count"] == 4 and fields["llama.attention.head_count_kv"] == 2
    assert fields["tokenizer.ggml.model"] == "gpt2" and fields["tokenizer.ggml.pre"] == "gpt-2"
    tok = build_tokenizer()
    assert fields["tokenizer.ggml.eos_token_id"] == tok.eos_token_id
    assert fields["tokenizer.ggml.tokens"][tok.convert_tokens_to_ids("<|im_end|>")] == "<|im_end|>"
    tensors = {t.name: torch.from_numpy(t.data.copy()) for t in reader.tensors}
    assert "output.weight" not in tensors  # tied head: llama.cpp reuses token_embd
    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    q = base.model.layers[1].self_attn.q_proj.weight.detach()
    k = base.model.layers[1].self_attn.k_proj.weight.detach()
    assert not torch.equal(tensors["blk.1.attn_q.weight"], q)  # permuted...
    torch.testing.assert_close(tensors["blk.1.attn_q.weight"], permute_qk(q, 4), rtol=0, atol=0)
    torch.testing.assert_close(tensors["blk.1.attn_k.weight"], permute_qk(k, 2), rtol=0, atol=0)
    torch.testing.assert_close(unpermute_qk(permute_qk(k, 2), 2), k, rtol=0, atol=0)


def test_permutation_matches_llamacpp_rope_pairs():
    """Hugging Face rotates dims (i, i + d/2) of a head together; llama.cpp rotates (2i, 2i + 1). After
    the permutation row 2i holds HF's row i and row 2i + 1 holds HF's row i + d/2."""
    d, heads = 8, 2
    w = torch.arange(heads * d, dtype=torch.float32).unsqueeze(1)  # row r holds r
    p = permute_qk(w, heads).squeeze(1).tolist()
    assert p[:d] == [0, 4, 1, 5, 2, 6, 3, 7] and p[d:] == [8, 12, 9, 13, 10, 14, 11, 15]


def _lora_gguf_merged_weights(base_gguf: Path, lora_gguf: Path, n_head: int, n_kv: int) -> dict[str, torch.Tensor]:
    """W + (alpha / r) B A for every LoRA pair, computed from the two GGUF files alone, un-permuted."""
    base = {t.name: torch.from_numpy(t.data.copy()) for t in gguf.GGUFReader(base_gguf).tensors}
    reader = gguf.GGUFReader(lora_gguf)
    alpha = reader.fields["adapter.lora.alpha"].contents()
    lora = {t.name: torch.from_numpy(t.data.copy()) for t in reader.tensors}
    out = {}
    for name in [n[: -len(".lora_a")] for n in lora if n.endswith(".lora_a")]:
        a, b = lora[name + ".lora_a"], lora[name + ".lora_b"]
        w = base[name] + (alpha / b.shape[1]) * (b @ a)
        heads = n_head if ".attn_q." in name else n_kv if ".attn_k." in name else None
        out[name] = unpermute_qk(w, heads) if heads else w
    return out


def test_lora_gguf_applied_by_hand_gives_the_merged_weights(model_dir, lora_dir, merged, tmp_path):
    base_gguf = export_gguf(tmp_path / "base.gguf", model=str(model_dir), quant="f32").path
    lora_gguf = export_gguf(tmp_path / "lora.gguf", model=str(model_dir), adapter=lora_dir, adapter_only=True).path
    reader = gguf.GGUFReader(lora_gguf)
    assert reader.fields["general.type"].contents() == "adapter"
    assert reader.fields["adapter.type"].contents() == "lora"
    assert reader.fields["adapter.lora.alpha"].contents() == 8.0
    names = sorted(t.name for t in reader.tensors)
    assert "blk.0.attn_q.weight.lora_a" in names and "blk.1.ffn_down.weight.lora_b" in names and len(names) == 20
    model, _ = merged
    state = model.state_dict()
    hf = {"attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
          "attn_output": "self_attn.o_proj", "ffn_down": "mlp.down_proj"}
    got = _lora_gguf_merged_weights(base_gguf, lora_gguf, 4, 2)
    assert len(got) == 10
    for name, w in got.items():
        _, layer, kind, _ = name.split(".")
        torch.testing.assert_close(w, state[f"model.layers.{layer}.{hf[kind]}.weight"], rtol=1e-5, atol=1e-6)


def test_rslora_alpha_written_as_llamacpp_alpha(model_dir, tmp_path):
    adapter = _make_adapter(model_dir, tmp_path / "rs", cfg={"r": 4, "alpha": 8, "use_rslora": True,
                                                             "target_modules": ["q_proj"]})
    out = export_gguf(tmp_path / "rs.gguf", model=str(model_dir), adapter=adapter, adapter_only=True).path
    alpha = gguf.GGUFReader(out).fields["adapter.lora.alpha"].contents()
    assert alpha / 4 == pytest.approx(8 / 4 ** 0.5)  # llama.cpp's alpha / r == rsLoRA's alpha / sqrt(r)


def test_ollama_modelfile(model_dir, tmp_path):
    r = export_gguf(tmp_path / "m.gguf", model=str(model_dir), quant="q8_0", ollama=True)
    text = r.modelfile.read_text()
    assert r.modelfile == tmp_path / "m.Modelfile"
    assert text.startswith("FROM ./m.gguf\n")
    assert 'PARAMETER stop "<|im_end|>"' in text
    # The tiny template inserts SmolLM's system prompt when none is given; the Go template does too.
    assert ("<|im_start|>system\n{{ if .System }}{{ .System }}{{ else }}You are a helpful AI assistant named "
            "SmolLM, trained by Hugging Face{{ end }}<|im_end|>\n") in text
    assert ('{{ range .Messages }}{{ if ne .Role "system" }}<|im_start|>{{ .Role }}\n{{ .Content }}<|im_end|>\n'
            "{{ end }}{{ end }}<|im_start|>assistant\n\"\"\"") in text


def test_ollama_refuses_a_template_that_is_not_chatml():
    tok = build_tokenizer(chat_template="{% for m in messages %}### {{ m['content'] }}\n{% endfor %}")
    with pytest.raises(ValueError, match="ChatML"):
        modelfile_text("m.gguf", tok)


# ---- refusals -----------------------------------------------------------------------------------

def test_refuses_an_architecture_without_a_tensor_map(tmp_path, capsys):
    gpt2 = _save_model(tmp_path / "gpt2", arch="gpt2")
    with pytest.raises(UnsupportedArchitectureError, match="no tensor map for the architecture GPT2LMHeadModel"):
        export_gguf(tmp_path / "g.gguf", model=str(gpt2))
    assert main(["export", "--model", str(gpt2), "--out", str(tmp_path / "g.gguf")]) == 2
    assert "LlamaForCausalLM" in capsys.readouterr().err
    assert not (tmp_path / "g.gguf").exists()


def test_existing_output_refused_unless_overwrite(model_dir, tmp_path, capsys):
    out = tmp_path / "m.gguf"
    out.write_bytes(b"keep me")
    assert main(["export", "--model", str(model_dir), "--out", str(out), "--quant", "f32"]) == 2
    assert "already exists; pass --overwrite" in capsys.readouterr().err
    assert out.read_bytes() == b"keep me"
    assert main(["export", "--model", str(model_dir), "--out", str(out), "--quant", "f32", "--overwrite"]) == 0
    assert gguf.GGUFReader(out).fields["general.architecture"].contents() == "llama"


def _disk_full_after_header(writer: gguf.GGUFWriter, path: Path) -> None:
    """Our own write step, failing as a full disk would: the header is on disk, then ENOSPC."""
    writer.write_header_to_file(path)
    writer.write_kv_data_to_file()
    writer.close()
    assert path.stat().st_size > 0
    raise OSError(errno.ENOSPC, "No space left on device")


@pytest.mark.parametrize("adapter_only", [False, True])
def test_disk_full_leaves_no_partial_file_under_the_final_name(model_dir, lora_dir, tmp_path, adapter_only):
    out, kept = tmp_path / "new.gguf", tmp_path / "old.gguf"
    kept.write_bytes(b"the previous export")
    for target, overwrite in ((out, False), (kept, True)):
        with pytest.raises(OSError, match="disk is full") as info:
            export_gguf(target, model=str(model_dir), adapter=lora_dir, adapter_only=adapter_only, quant="f32",
                        overwrite=overwrite, write=_disk_full_after_header)
        assert info.value.errno == errno.ENOSPC
    assert not out.exists()
    assert kept.read_bytes() == b"the previous export"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["old.gguf"]  # no temporary file left behind either
    export_gguf(out, model=str(model_dir), quant="f32", write=write_gguf_file)  # the real one works
    assert out.is_file()


def test_adapter_only_refuses_non_lora_methods(model_dir, tmp_path):
    ia3 = _make_adapter(model_dir, tmp_path / "ia3", method="ia3", cfg={})
    with pytest.raises(UnsupportedAdapterError, match="ia3.*merge it into the base instead"):
        export_gguf(tmp_path / "x.gguf", model=str(model_dir), adapter=ia3, adapter_only=True)
    dora = _make_adapter(model_dir, tmp_path / "dora", cfg={"r": 4, "use_dora": True, "target_modules": ["q_proj"]})
    with pytest.raises(UnsupportedAdapterError, match="DoRA.*merge it"):
        export_gguf(tmp_path / "x.gguf", model=str(model_dir), adapter=dora, adapter_only=True)
    # Merged, both are fine: the merged export carries them.
    assert export_gguf(tmp_path / "ia3.gguf", model=str(model_dir), adapter=ia3, quant="f32").kind == "model"
    assert not (tmp_path / "x.gguf").exists()


def test_prompt_tuning_cannot_be_exported_at_all(model_dir, tmp_path):
    pt = _make_adapter(model_dir, tmp_path / "pt", method="prompt_tuning", cfg={"num_virtual_tokens": 4})
    with pytest.raises(ValueError, match="cannot be folded into the base"):
        export_gguf(tmp_path / "x.gguf", model=str(model_dir), adapter=pt)
    with pytest.raises(UnsupportedAdapterError, match="cannot be folded into the base weights either"):
        export_gguf(tmp_path / "x.gguf", model=str(model_dir), adapter=pt, adapter_only=True)


@pytest.mark.parametrize("target, what", [("embed_tokens", "embedding table"), ("lm_head", "output head")])
def test_adapter_only_refuses_lora_on_embeddings_and_lm_head(model_dir, tmp_path, target, what, capsys):
    adapter = _make_adapter(model_dir, tmp_path / target, cfg={"r": 4, "target_modules": ["q_proj", target]})
    with pytest.raises(UnsupportedAdapterError, match=f"LoRA on the {what}"):
        export_gguf(tmp_path / "x.gguf", model=str(model_dir), adapter=adapter, adapter_only=True)
    assert main(["export", "--model", str(model_dir), "--adapter", str(adapter), "--adapter-only",
                 "--out", str(tmp_path / "x.gguf")]) == 2
    assert "merge it instead" in capsys.readouterr().err
    assert not (tmp_path / "x.gguf").exists()


def test_merged_export_of_lora_on_the_embedding_unties_the_head(model_dir, tmp_path):
    """LoRA on embed_tokens changes the input side only: the merge unties the head, and the GGUF then
    carries output.weight (llama.cpp would otherwise reuse the changed token_embd as the head)."""
    adapter = _make_adapter(model_dir, tmp_path / "emb", cfg={"r": 4, "target_modules": ["q_proj", "embed_tokens"]})
    out = export_gguf(tmp_path / "m.gguf", model=str(model_dir), adapter=adapter, quant="f32").path
    assert "output.weight" in {t.name for t in gguf.GGUFReader(out).tensors}
    lm = load_base(str(model_dir), "float32", "cpu")
    from plugtune.adapters.io import load_adapter

    load_adapter(lm.model, adapter)
    fold_into_base(lm.model)
    got = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file=out.name, dtype=torch.float32).eval()
    torch.testing.assert_close(_logits(got, lm.tokenizer), _logits(lm.model.eval(), lm.tokenizer), rtol=0, atol=0)


def test_cli_writes_model_modelfile_and_lora(model_dir, lora_dir, tmp_path, capsys):
    assert main(["export", "--format", "gguf", "--model", str(model_dir), "--adapter", str(lora_dir),
                 "--out", str(tmp_path / "m.gguf"), "--quant", "q4_0", "--ollama"]) == 0
    assert main(["export", "--model", str(model_dir), "--adapter", str(lora_dir), "--adapter-only",
                 "--out", str(tmp_path / "lora.gguf")]) == 0
    printed = capsys.readouterr().out
    assert "model written to" in printed and "Modelfile written to" in printed and "--lora" in printed
    assert sorted(p.name for p in tmp_path.iterdir()) == ["lora.gguf", "m.Modelfile", "m.gguf"]
    types = {t.name: t.tensor_type.name for t in gguf.GGUFReader(tmp_path / "m.gguf").tensors}
    assert types["blk.0.attn_q.weight"] == "Q4_0" and types["token_embd.weight"] == "Q8_0"
    assert types["blk.0.attn_norm.weight"] == "F32"
    assert main(["export", "--model", str(model_dir), "--adapter", str(lora_dir), "--adapter-only", "--quant",
                 "q4_0", "--out", str(tmp_path / "l2.gguf")]) == 2
    assert "f32 or f16" in capsys.readouterr().err


@pytest.mark.slow
def test_default_model_round_trip(tmp_path):
    """SmolLM2-135M with a LoRA: the f32 GGUF gives the merged model's logits in transformers, and the
    LoRA GGUF on the base GGUF gives the merged weights."""
    from plugtune.models.loading import resolve_model_dir

    base_dir = resolve_model_dir("smollm2-135m")
    adapter = _make_adapter(base_dir, tmp_path / "lora", cfg={"r": 8, "alpha": 16,
                                                              "target_modules": ["q_proj", "k_proj", "v_proj"]})
    merged_gguf = export_gguf(tmp_path / "merged.gguf", adapter=adapter, quant="f32").path
    lm = load_base("smollm2-135m", "float32", "cpu")
    from plugtune.adapters.io import load_adapter

    load_adapter(lm.model, adapter)
    fold_into_base(lm.model)
    want = _logits(lm.model.eval(), lm.tokenizer)
    got_model = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file=merged_gguf.name, dtype=torch.float32)
    torch.testing.assert_close(_logits(got_model.eval(), lm.tokenizer), want, rtol=0, atol=0)
    del got_model
    tok = AutoTokenizer.from_pretrained(tmp_path, gguf_file=merged_gguf.name)
    assert tok(TEXT)["input_ids"] == lm.tokenizer(TEXT)["input_ids"]

    base_gguf = export_gguf(tmp_path / "base.gguf", quant="f32").path
    lora_gguf = export_gguf(tmp_path / "lora.gguf", adapter=adapter, adapter_only=True).path
    state = lm.model.state_dict()
    got = _lora_gguf_merged_weights(base_gguf, lora_gguf, 9, 3)
    assert len(got) == 90
    for name, w in got.items():
        _, layer, kind, _ = name.split(".")
        proj = {"attn_q": "q_proj", "attn_k": "k_proj", "attn_v": "v_proj"}[kind]
        torch.testing.assert_close(w, state[f"model.layers.{layer}.self_attn.{proj}.weight"], rtol=1e-5, atol=1e-6)
