"""Tiny random models and a tiny byte-level BPE tokenizer, built offline in a second.

Used by the tests and the CLI end-to-end checks. The tokenizer carries SmolLM2's ChatML chat
template so masking is exercised on the same template as the default model.
"""
from __future__ import annotations

from pathlib import Path

import torch

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}"
    "{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

_CORPUS = [
    "the quick brown fox jumps over the lazy dog",
    "You are a helpful AI assistant named SmolLM, trained by Hugging Face",
    "system user assistant convert date iso answer question what is hello world",
    "0123456789 - : , . ? ! ( ) = + * / January February March April May June July",
]


def build_tokenizer(chat_template: str | None = CHATML_TEMPLATE, vocab_size: int = 400):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(_CORPUS * 4, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>", bos_token="<|endoftext|>"
    )
    if chat_template is not None:
        fast.chat_template = chat_template
    return fast


def build_model(arch: str = "llama", vocab_size: int = 400, hidden: int = 64, layers: int = 2, seed: int = 0):
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    if arch == "llama":
        cfg = LlamaConfig(
            vocab_size=vocab_size, hidden_size=hidden, intermediate_size=hidden * 2, num_hidden_layers=layers,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=True,
            bos_token_id=0, eos_token_id=2, pad_token_id=0,
        )
        return LlamaForCausalLM(cfg).eval()
    if arch == "gpt2":
        cfg = GPT2Config(
            vocab_size=vocab_size, n_embd=hidden, n_layer=layers, n_head=4, n_positions=256,
            bos_token_id=0, eos_token_id=2, pad_token_id=0,
        )
        return GPT2LMHeadModel(cfg).eval()
    raise ValueError(f"unknown tiny arch {arch!r} (llama | gpt2)")


def build_classifier(arch: str = "bert", vocab_size: int = 400, num_labels: int = 5, hidden: int = 64,
                     layers: int = 2, seed: int = 0):
    """A tiny random sequence classifier: BERT (head `classifier` on the pooled [CLS]) or Llama (head
    `score` on the last non-pad token)."""
    from transformers import BertConfig, BertForSequenceClassification, LlamaConfig, LlamaForSequenceClassification

    torch.manual_seed(seed)
    if arch == "bert":
        cfg = BertConfig(vocab_size=vocab_size, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=4,
                         intermediate_size=hidden * 2, max_position_embeddings=128, num_labels=num_labels,
                         pad_token_id=0)
        return BertForSequenceClassification(cfg).eval()
    if arch == "llama":
        cfg = LlamaConfig(vocab_size=vocab_size, hidden_size=hidden, intermediate_size=hidden * 2,
                          num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                          max_position_embeddings=128, num_labels=num_labels, pad_token_id=0)
        return LlamaForSequenceClassification(cfg).eval()
    raise ValueError(f"unknown tiny classifier arch {arch!r} (bert | llama)")


def save_tiny_model_dir(path: str | Path, arch: str = "llama", seed: int = 0) -> Path:
    """A complete local model directory (weights + tokenizer) that `load_base` accepts."""
    path = Path(path)
    tokenizer = build_tokenizer()
    model = build_model(arch, vocab_size=len(tokenizer), seed=seed)
    model.save_pretrained(path, safe_serialization=True)
    tokenizer.save_pretrained(path)
    return path
