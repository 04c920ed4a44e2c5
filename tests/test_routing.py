"""Router kinds (inference/routers.py, inference/router.py) on the tiny model: each fits and routes held-out
wordings, abstains on general chat, refuses adapters it was not built for; empty requests go to the base."""
import json

import pytest
import torch

from plugtune.adapters import attach_adapter
from plugtune.adapters.layers import adapter_layers, adapters_disabled
from plugtune.data import load_examples
from plugtune.inference.language_model import LanguageModel
from plugtune.inference.router import (KINDS, TRAINED_KINDS, Router, RouterMismatchError, fit_router, load_router)
from plugtune.inference.routers import _rows_and_spans, arrow_prototypes, arrow_scores
from plugtune.models.causal_lm import hidden_states
from plugtune.models.loading import LoadedModel
from plugtune.models.tiny import build_model
from plugtune.tasks.skills.confusable import chat_prompts, confusable_prompts


def prompts(skill: str, split: str, n: int, start: int = 0) -> list:
    return [ex.prompt_messages() for ex in load_examples(f"plugtune:skills/{skill}_{split}.jsonl")[start:start + n]]


@pytest.fixture(scope="module")
def tiny(tokenizer):
    model = build_model("llama", len(tokenizer)).eval()
    for name in ("dates", "units"):
        attach_adapter(model, "lora", {"r": 2, "target_modules": ["q_proj", "v_proj"]}, name=name, trainable=False)
    return model, tokenizer


@pytest.mark.parametrize("kind", ["minilm", "hidden+minilm"])
def test_trained_kind_routes_held_out_wordings_and_abstains_on_chat(tiny, kind):
    model, tok = tiny
    router = fit_router(model, tok, {"dates": prompts("dates", "train", 48), "units": prompts("units", "train", 48)},
                        kind=kind)  # shipped negatives (chat "fit" part, confusable train) and chat calibration
    # Test prompts use templates no training prompt has; chat and confusable prompts are parts never fitted on.
    assert router.route(model, tok, prompts("dates", "test", 24)) == ["dates"] * 24
    assert router.route(model, tok, prompts("units", "test", 24)) == ["units"] * 24
    chat = router.route(model, tok, chat_prompts("measure", 60))
    confusable = router.route(model, tok, confusable_prompts("test")[:60])
    assert chat.count(None) >= 57 and confusable.count(None) >= 54, (chat, confusable)
    assert router.threshold >= 0.5 and router.calibration["chat_routed"] <= 0.01


def test_hidden_kind_separates_skills_on_the_tiny_base(tiny):
    # The tiny base is random: its hidden states separate two skills' training wordings (unseen inputs),
    # not unseen wordings; that it fails those is what bench/routing.py shows on the real base too.
    model, tok = tiny
    router = fit_router(model, tok, {"dates": prompts("dates", "train", 64), "units": prompts("units", "train", 64)},
                        kind="hidden", shipped=False)
    assert router.threshold == 0.5 and router.tensors["weight"].shape[0] == 2  # no negatives: no "base" class
    assert router.route(model, tok, prompts("dates", "train", 16, start=100)) == ["dates"] * 16
    assert router.route(model, tok, prompts("units", "train", 16, start=100)) == ["units"] * 16


def test_arrow_scores_by_each_adapters_top_right_singular_vector(tokenizer):
    model = build_model("llama", len(tokenizer)).eval()
    for name in ("dates", "units"):
        attach_adapter(model, "lora", {"r": 2, "target_modules": ["q_proj", "v_proj"]}, name=name, trainable=False)
    dates = prompts("dates", "train", 24)
    g = torch.Generator().manual_seed(0)
    # Each adapter, in each layer, gets a dW = s B A with known singular vectors: A's first row v (unit), B's
    # columns orthonormal with singular values 3 and 0.5, so v is dW's top right singular vector.
    for name, layer in adapter_layers(model):
        for adapter in ("dates", "units"):
            v = torch.randn(layer.in_features, generator=g)
            v = v / v.norm()
            second = torch.randn(v.shape, generator=g)
            second = second - (second @ v) * v
            layer.lora_A[adapter].weight.data = torch.stack([v, second / second.norm()])
            left = torch.linalg.qr(torch.randn(layer.out_features, 2, generator=g))[0]
            layer.lora_B[adapter].weight.data = left * torch.tensor([3.0, 0.5])  # singular values 3 and 0.5 (x scaling)
    protos = arrow_prototypes(model, ["dates", "units"])
    for name, layer in adapter_layers(model):
        key = name.replace(".base_layer", "")
        for k, adapter in enumerate(("dates", "units")):
            v_ref = torch.linalg.svd(layer.delta_weight(adapter).detach())[2][0]  # full SVD of s B A
            assert abs(float(protos[key][k] @ v_ref)) == pytest.approx(1.0, abs=1e-5)
            assert abs(float(protos[key][k] @ layer.lora_A[adapter].weight[0])) == pytest.approx(1.0, abs=1e-5)
    scores = arrow_scores(model, tokenizer, dates[:1], protos)  # (1, 2): checked against a direct computation
    rows, spans = _rows_and_spans(tokenizer, dates[:1])
    expected = torch.zeros(2)
    captured = {}
    layers = {n.replace(".base_layer", ""): m for n, m in adapter_layers(model)}
    handles = [layers[n].register_forward_pre_hook(lambda mod, args, n=n: captured.__setitem__(n, args[0][0]))
               for n in protos]
    with adapters_disabled(model), torch.no_grad():
        hidden_states(model, torch.tensor(rows), None)
    for h in handles:
        h.remove()
    for n, x in captured.items():
        x = x[spans[0]]
        expected += ((x / x.norm(dim=-1, keepdim=True)) @ protos[n].T).abs().mean(0) / len(protos)
    torch.testing.assert_close(scores[0], expected, rtol=1e-4, atol=1e-6)
    router = fit_router(model, tokenizer, {"dates": [], "units": []}, kind="arrow", shipped=False)
    assert router.threshold == 0.0  # no calibration chat: the best adapter always wins
    texts = prompts("dates", "test", 8) + prompts("units", "test", 8)
    scores = router.scores(model, tokenizer, texts)
    assert router.route(model, tokenizer, texts) == [("dates", "units")[int(k)] for k in scores.argmax(-1)]
    assert (scores[:, 0] != scores[:, 1]).all()
    # Swapping the two adapters' factors swaps every score, and so every routing decision.
    for _, layer in adapter_layers(model):
        for table in (layer.lora_A, layer.lora_B):
            table["dates"].weight.data, table["units"].weight.data = table["units"].weight.data, table["dates"].weight.data
    swapped = fit_router(model, tokenizer, {"dates": [], "units": []}, kind="arrow", shipped=False)
    torch.testing.assert_close(swapped.scores(model, tokenizer, texts), scores.flip(-1))


def test_arrow_refuses_adapters_without_lora_factors(tokenizer):
    model = build_model("llama", len(tokenizer))
    attach_adapter(model, "ia3", {}, name="scales", trainable=False)
    with pytest.raises(ValueError, match=r"arrow routing reads LoRA factors; adapters \['scales'\]"):
        fit_router(model, tokenizer, {"scales": []}, kind="arrow", shipped=False)
    with pytest.raises(ValueError, match="unknown router kind 'knn'"):
        fit_router(model, tokenizer, {"scales": ["x"]}, kind="knn")
    assert set(TRAINED_KINDS) < set(KINDS) and "arrow" in KINDS


def test_calibrated_threshold_sends_at_most_the_chosen_share_of_chat_to_an_adapter(tiny):
    model, tok = tiny
    chat = chat_prompts("calibrate", 80)
    router = fit_router(model, tok, {"dates": prompts("dates", "train", 32), "units": prompts("units", "train", 32)},
                        kind="hidden", calibration=chat, shipped=False, false_route_rate=0.0)
    best = router.scores(model, tok, chat).max(-1).values
    assert router.threshold == pytest.approx(max(0.5, float(best.max())))
    assert router.route(model, tok, chat) == [None] * len(chat)
    assert router.calibration["chat_prompts"] == 80 and router.calibration["chat_routed"] == 0.0


def test_empty_prompt_goes_to_the_base(tiny, tmp_path):
    model, tok = tiny
    router = fit_router(model, tok, {"dates": prompts("dates", "train", 16), "units": prompts("units", "train", 16)},
                        kind="hidden", shipped=False)
    router.threshold = -1.0  # would route anything that is scored at all
    assert router.route(model, tok, ["", "   ", [{"role": "user", "content": ""}], prompts("dates", "test", 1)[0]])[:3] \
        == [None, None, None]
    assert router.route(model, tok, []) == []


def test_saved_router_round_trips_and_refuses_other_adapters(tiny, tmp_path):
    model, tok = tiny
    router = fit_router(model, tok, {"dates": prompts("dates", "train", 16), "units": prompts("units", "train", 16)},
                        kind="minilm", shipped=False, calibration=chat_prompts("calibrate", 30))
    router.save(tmp_path / "router")
    meta = json.loads((tmp_path / "router" / "router.json").read_text())
    assert meta["kind"] == "minilm" and meta["adapters"] == ["dates", "units"] and meta["base_fingerprint"]
    again = load_router(tmp_path / "router", model, known=["dates", "units", "extra"])
    texts = prompts("dates", "test", 4) + prompts("units", "test", 4) + chat_prompts("measure", 4)
    torch.testing.assert_close(again.scores(model, tok, texts), router.scores(model, tok, texts))
    assert again.route(model, tok, texts) == router.route(model, tok, texts) and again.threshold == router.threshold
    with pytest.raises(RouterMismatchError, match=r"built for adapters \[dates, units\], but the loaded adapters "
                                                  r"are \[prices, reverse\].*multi-task run"):
        load_router(tmp_path / "router", model, known=["prices", "reverse"])
    other = build_model("llama", len(tok), seed=1)
    with pytest.raises(RouterMismatchError, match="built on another base model"):
        load_router(tmp_path / "router", other)
    with pytest.raises(FileNotFoundError, match="not a router directory.*multi-task run"):
        load_router(tmp_path, model)


def test_auto_without_a_router_says_how_to_make_one(tiny):
    model, tok = tiny
    lm = LanguageModel(LoadedModel(model, tok, None, "tiny"))
    with pytest.raises(ValueError, match=r"adapters='auto' needs a router.*multi-task run.*fit_router"):
        lm.resolve(["Convert 3 km to m."], "auto")
    lm.router = Router("hidden", ["dates"], {}, 0.5)
    assert lm.resolve(["", "  "], "auto") == [None, None]  # empty requests never reach the scorer
