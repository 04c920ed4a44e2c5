"""The tokenizer as GGUF metadata: llama.cpp's `tokenizer.ggml.*` keys for a byte-level BPE vocabulary
(GPT-2 style: tokens, token types, merges, special-token ids), and the chat template.

llama.cpp re-implements each pre-tokenizer (the regex that splits text before BPE) and picks it by
the name in `tokenizer.ggml.pre`, so the name must describe the tokenizer plugtune really uses:
read from its tokenizer.json, never guessed from the model's name.
"""
from __future__ import annotations

import json

import gguf

# llama.cpp token types (llama_token_type): what the vocabulary loader does with each entry.
NORMAL, CONTROL, USER_DEFINED, UNUSED = (gguf.TokenType.NORMAL, gguf.TokenType.CONTROL,
                                         gguf.TokenType.USER_DEFINED, gguf.TokenType.UNUSED)


class UnsupportedTokenizerError(ValueError):
    """A tokenizer the GGUF writer cannot describe in llama.cpp's terms."""


def pre_tokenizer_name(pre: dict | None) -> str:
    """llama.cpp's pre-tokenizer name for a tokenizer.json `pre_tokenizer` section.

    ByteLevel with its GPT-2 regex -> "gpt-2" (llama.cpp's spelling; "gpt2" names the tokenizer model,
    not a pre-tokenizer, and llama.cpp refuses it here); SmolLM's single digits, then ByteLevel -> "smollm"."""
    def is_gpt2_byte_level(p: dict) -> bool:
        return p.get("type") == "ByteLevel" and p.get("use_regex", True)

    if pre and is_gpt2_byte_level(pre):
        return "gpt-2"
    if pre and pre.get("type") == "Sequence":
        parts = pre.get("pretokenizers", [])
        if (len(parts) == 2 and parts[0].get("type") == "Digits" and parts[0].get("individual_digits")
                and is_gpt2_byte_level(parts[1])):
            return "smollm"
    raise UnsupportedTokenizerError(
        f"GGUF export knows byte-level BPE tokenizers with the GPT-2 split (optionally single digits first); "
        f"this one pre-tokenizes with {json.dumps(pre)[:200]}. Convert it with llama.cpp's convert_hf_to_gguf.py")


def add_tokenizer(writer: gguf.GGUFWriter, tokenizer, vocab_size: int) -> None:
    """Write the vocabulary (padded to the model's `vocab_size` rows), merges, special ids and template."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise UnsupportedTokenizerError(f"GGUF export needs a fast (tokenizers) tokenizer, got "
                                        f"{type(tokenizer).__name__}")
    spec = json.loads(backend.to_str())
    model = spec.get("model", {})
    if model.get("type") != "BPE":
        raise UnsupportedTokenizerError(
            f"GGUF export writes byte-level BPE vocabularies; this tokenizer is {model.get('type')} "
            "(sentencepiece/unigram): convert it with llama.cpp's convert_hf_to_gguf.py")
    pre = pre_tokenizer_name(spec.get("pre_tokenizer"))
    vocab: dict[str, int] = dict(model["vocab"])
    added = {t["content"]: t for t in spec.get("added_tokens", [])}
    for content, t in added.items():
        vocab[content] = t["id"]
    if max(vocab.values()) >= vocab_size:
        raise UnsupportedTokenizerError(f"the tokenizer has ids up to {max(vocab.values())} but the model has only "
                                        f"{vocab_size} embedding rows; resize the embeddings before exporting")
    tokens = [f"[PAD{i}]" for i in range(vocab_size)]  # rows no token uses (llama.cpp's convention)
    types = [UNUSED] * vocab_size
    for token, i in vocab.items():
        tokens[i] = token
        t = added.get(token)
        types[i] = NORMAL if t is None else CONTROL if t.get("special") else USER_DEFINED
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]

    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    for key, add in (("bos_token_id", writer.add_bos_token_id), ("eos_token_id", writer.add_eos_token_id),
                     ("unk_token_id", writer.add_unk_token_id), ("pad_token_id", writer.add_pad_token_id)):
        value = getattr(tokenizer, key, None)
        if value is not None:
            add(int(value))
    # Whether encoding a text prepends BOS: asked of the tokenizer itself, so llama.cpp does the same.
    ids = tokenizer("a")["input_ids"]
    bos = tokenizer.bos_token_id
    writer.add_add_bos_token(bool(bos is not None and ids and ids[0] == bos))
    writer.add_add_eos_token(False)
    template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, str) and template:
        writer.add_chat_template(template)
