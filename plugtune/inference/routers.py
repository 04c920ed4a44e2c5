"""What a router scores a request with, one function per router kind (inference/router.py decides).

A request is its last user message. Trained kinds turn it into a unit vector and a classifier
(router.py) learns adapters + "base" from example prompts; the training-free kind reads the adapters.

    hidden          the base model's final hidden states (adapters switched off, so the features do
                    not depend on which adapters are loaded), mean over the message's tokens
    minilm          the packaged MiniLM sentence encoder (all-MiniLM-L6-v2: mean over tokens; a
                    separate 22.7M-parameter model, loaded once per process, offline)
    hidden+minilm   both, each half scaled by 1/sqrt(2), so the concatenation is a unit vector
    arrow           no training prompts (Ostapenko et al. 2024, "Towards Modular LLMs by Building and
                    Reusing a Library of LoRAs", Arrow routing; PEFT ships it per token): for each LoRA
                    layer l and adapter k, v_lk is the top right singular vector of dW_lk = s B A (what
                    input direction the update reacts to most); a request's score for k is
                        score_k = 1/L sum_l mean_t |<x_lt, v_lk>| / ||x_lt||
                    over the base model's inputs x_lt to layer l at the message's tokens t.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from plugtune.adapters.layers import adapter_layers, adapters_disabled
from plugtune.data.templates import render
from plugtune.data.tokenize import prompt_ids
from plugtune.models.causal_lm import hidden_states
from plugtune.models.encoder import resolve_encoder_dir

TRAINED_KINDS = ("hidden", "minilm", "hidden+minilm")
KINDS = (*TRAINED_KINDS, "arrow")
ENCODER = "minilm-l6"  # the sentence encoder of the minilm kinds (models/encoder.py locates it offline)


def messages_of(prompt) -> list[dict]:
    return [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)


def last_user_text(prompt) -> str:
    return next((m["content"] for m in reversed(messages_of(prompt)) if m["role"] == "user"), "")


def _rows_and_spans(tokenizer, prompts: list) -> tuple[list[list[int]], list[list[int]]]:
    """Token ids of each rendered chat prompt and the positions of its last user message (located by
    character offsets; the whole prompt when the offsets do not line up)."""
    rows, spans = [], []
    for p in prompts:
        messages = messages_of(p)
        ids = prompt_ids(tokenizer, messages)
        text = render(tokenizer, messages, add_generation_prompt=True)
        content = last_user_text(messages)
        start = text.rfind(content) if content else -1
        enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        if enc["input_ids"] == ids and start >= 0:
            inside = [i for i, (a, b) in enumerate(enc["offset_mapping"]) if b > start and a < start + len(content)]
        else:
            inside = []
        rows.append(ids)
        spans.append(inside or list(range(len(ids))))
    return rows, spans


def _base_batches(model: nn.Module, tokenizer, prompts: list, batch_size: int):
    """Yield (hidden (b, T, C), pool (b, T): 1/|span| on each row's message tokens), adapters off.
    Forward hooks registered by the caller see the same batches."""
    rows, spans = _rows_and_spans(tokenizer, prompts)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        with adapters_disabled(model), torch.no_grad():
            for i in range(0, len(rows), batch_size):
                chunk, chunk_spans = rows[i:i + batch_size], spans[i:i + batch_size]
                width = max(len(r) for r in chunk)
                ids = torch.zeros(len(chunk), width, dtype=torch.long)
                mask = torch.zeros_like(ids)
                pool = torch.zeros(len(chunk), width)
                for j, (r, sp) in enumerate(zip(chunk, chunk_spans)):
                    ids[j, :len(r)] = torch.tensor(r)
                    mask[j, :len(r)] = 1
                    pool[j, sp] = 1.0 / len(sp)
                pool = pool.to(device)
                yield pool, lambda: hidden_states(model, ids.to(device), mask.to(device)).float()
    finally:
        model.train(was_training)


def hidden_features(model: nn.Module, tokenizer, prompts: list, batch_size: int = 32) -> torch.Tensor:
    """(N, C) unit vectors: the base model's final hidden states averaged over each last user message."""
    out = []
    for pool, forward in _base_batches(model, tokenizer, prompts, batch_size):
        out.append(torch.einsum("bt,btc->bc", pool, forward()).cpu())  # (b, C)
    return nn.functional.normalize(torch.cat(out), dim=-1)


_ENCODERS: dict[str, tuple] = {}


def sentence_encoder(name: str = ENCODER):
    """(model, tokenizer) of a sentence encoder, loaded once per process, offline."""
    if name not in _ENCODERS:
        try:
            path = resolve_encoder_dir(name)
        except FileNotFoundError as exc:
            raise FileNotFoundError(f"the minilm router kinds embed requests with the MiniLM encoder: {exc}. "
                                    "Or use a router kind without it (router.kind=hidden or arrow)") from None
        from transformers import AutoModel, AutoTokenizer

        model = AutoModel.from_pretrained(str(path), dtype=torch.float32).eval()
        _ENCODERS[name] = (model, AutoTokenizer.from_pretrained(str(path)))
    return _ENCODERS[name]


@torch.no_grad()
def minilm_features(prompts: list, batch_size: int = 64) -> torch.Tensor:
    """(N, 384) unit vectors: sentence-transformers' all-MiniLM-L6-v2 embedding of each last user
    message (mean over its tokens, L2-normalised), on the CPU."""
    model, tok = sentence_encoder()
    texts = [last_user_text(p) for p in prompts]
    out = []
    for i in range(0, len(texts), batch_size):
        enc = tok(texts[i:i + batch_size], padding=True, truncation=True, max_length=256, return_tensors="pt")
        h = model(**enc).last_hidden_state  # (b, T, 384)
        mask = enc["attention_mask"].unsqueeze(-1).float()
        out.append((h * mask).sum(1) / mask.sum(1).clamp(min=1))
    return nn.functional.normalize(torch.cat(out), dim=-1)


def request_features(kind: str, model: nn.Module, tokenizer, prompts: list) -> torch.Tensor:
    """(N, C) unit vectors for a trained router kind."""
    if kind == "hidden":
        return hidden_features(model, tokenizer, prompts)
    if kind == "minilm":
        return minilm_features(prompts)
    if kind == "hidden+minilm":
        both = torch.cat([hidden_features(model, tokenizer, prompts), minilm_features(prompts)], dim=-1)
        return both / math.sqrt(2)
    raise ValueError(f"router kind '{kind}' has no request features (trained kinds: {', '.join(TRAINED_KINDS)})")


# Arrow ---------------------------------------------------------------------------------------------
def arrow_prototypes(model: nn.Module, adapters: list[str]) -> dict[str, torch.Tensor]:
    """{LoRA layer name: (K, in) top right singular vector of each adapter's s B A} over the layers
    every adapter adapts. From the thin QR of A^T (in, r): dW = s B R^T Q^T, so the SVD of the small
    (out, r) matrix s B R^T gives dW's right singular vectors as Q V."""
    layers = [(name, layer) for name, layer in adapter_layers(model) if hasattr(layer, "lora_A")]
    not_lora = [a for a in adapters if not any(a in layer.lora_A for _, layer in layers)]
    if not_lora:
        raise ValueError(f"arrow routing reads LoRA factors; adapters {not_lora} have none (another method?). "
                         "Use a trained router kind instead: router.kind=minilm (or hidden)")
    protos = {}
    for name, layer in layers:
        if not all(a in layer.lora_A for a in adapters):
            continue
        vectors = []
        for a in adapters:
            lora_a = layer.lora_A[a].weight.detach().float()  # (r, in)
            lora_b = layer.lora_B[a].weight.detach().float() * layer.scaling[a]  # (out, r)
            q, r = torch.linalg.qr(lora_a.T)  # (in, r), (r, r)
            _, _, vh = torch.linalg.svd(lora_b @ r.T, full_matrices=False)  # vh: (r, r)
            vectors.append(q @ vh[0])  # (in,) unit: the top right singular vector
        protos[name.replace(".base_layer", "")] = torch.stack(vectors).cpu()
    if not protos:
        raise ValueError(f"adapters {adapters} share no LoRA layer: arrow needs a layer adapted by all of them")
    return protos


def arrow_scores(model: nn.Module, tokenizer, prompts: list, prototypes: dict[str, torch.Tensor],
                 batch_size: int = 32) -> torch.Tensor:
    """(N, K) mean over layers and message tokens of |cos(x_lt, v_lk)| (see the module docstring)."""
    modules = {name.replace(".base_layer", ""): layer for name, layer in adapter_layers(model) if hasattr(layer, "lora_A")}
    missing = [n for n in prototypes if n not in modules]
    if missing:
        raise ValueError(f"this arrow router was built for LoRA layers the model does not have (e.g. {missing[0]})")
    state: dict = {}

    def hook(name):
        def record(_module, args):
            x = nn.functional.normalize(args[0].float(), dim=-1)  # (b, T, in)
            cos = (x @ prototypes[name].to(x.device).T).abs()  # (b, T, K)
            state["sum"] = state["sum"] + torch.einsum("bt,btk->bk", state["pool"], cos)
        return record

    handles = [modules[n].register_forward_pre_hook(hook(n)) for n in prototypes]
    out = []
    try:
        for pool, forward in _base_batches(model, tokenizer, prompts, batch_size):
            state["pool"], state["sum"] = pool, pool.new_zeros(pool.shape[0], len(next(iter(prototypes.values()))))
            forward()
            out.append((state["sum"] / len(prototypes)).cpu())
    finally:
        for h in handles:
            h.remove()
    return torch.cat(out)
