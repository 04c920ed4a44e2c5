"""The DPO family's objective on a tiny model: the one (prefix-sharing) forward equals plain forwards,
the loss equals the loss functions on log-probs from full logits, the reference is the base with
adapters off (or a frozen copy), cached reference log-probs, learning on a toy preference, exact
resume, and one training run side by side with TRL's DPOTrainer."""
import json
import os
import random
from pathlib import Path

import pytest
import torch
from torch.testing import assert_close

from plugtune.adapters import adapter_state, adapters_disabled, attach_adapter
from plugtune.config import DPOConfig, load_run_config
from plugtune.data.preference import TokenizedPair, collate_pairs, load_preferences
from plugtune.models.tiny import CHATML_TEMPLATE, build_model, build_tokenizer, save_tiny_model_dir
from plugtune.training.recipes import dpo
from plugtune.training.compute.token_logps import token_logps
from plugtune.training.engine.loop import evaluate, fit
from plugtune.training.engine.types import IndexedBatches
from plugtune.training.compute.losses import PREFERENCE_LOSSES, PreferenceLogps, dpo_loss
from plugtune.training.compute.prompt_trees import completion_logps, pack_pairs, tree_hidden, plan

VOCAB = 400
FILLER = ["the quick", "brown fox", "lazy dog", "over the", "jumps", "hello world", "what is", "answer"]


def toy_pairs(path: Path, n: int, seed: int) -> Path:
    """Chosen replies end with a 'good' word, rejected ones with a 'bad' word; the rest is shared filler."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        filler = rng.choice(FILLER)
        rows.append({"prompt": f"{rng.choice(FILLER)} {i}?", "chosen": f"{filler} {rng.choice(['yes', 'good', 'fine'])}",
                     "rejected": f"{filler} {rng.choice(['no', 'bad', 'poor'])}"})
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture
def toy_files(tmp_path):
    return toy_pairs(tmp_path / "train.jsonl", 64, 0), toy_pairs(tmp_path / "test.jsonl", 32, 1)


def run_config(model_dir, train, out, *extra, evalf=None):
    return load_run_config(None, [
        "objective=dpo", f"model.name={model_dir}", f"data.train={train}", f"output.dir={out}",
        *([f"data.eval={evalf}"] if evalf else []), "training.batch_size=8", "training.max_steps=20",
        "training.schedule=constant", "training.lr=1e-2", "training.progress=false", "output.resume=never",
        "adapter.r=8", "adapter.alpha=16", *extra])


def edge_pairs():
    """Hand-made pairs: different prompt lengths, a shared first completion token, a rejected reply that
    is a prefix of the chosen one, and padding."""
    p = [-100]
    return [TokenizedPair([5, 6, 7, 8, 9], p * 3 + [8, 9], [5, 6, 7, 10], p * 3 + [10], 3),
            TokenizedPair([11, 12, 13, 14, 15, 16], p * 2 + [13, 14, 15, 16], [11, 12, 13, 14], p * 2 + [13, 14], 2),
            TokenizedPair([20, 21, 22], p * 2 + [22], [20, 21, 23, 24, 25, 26, 27], p * 2 + [23, 24, 25, 26, 27], 2)]


def lora_model(arch="llama", impl="sdpa", seed=0):
    model = build_model(arch, VOCAB, seed=seed)
    model.config._attn_implementation = impl
    torch.manual_seed(1)
    attach_adapter(model, "lora", {"r": 4, "alpha": 8})
    with torch.no_grad():  # a non-zero adapter, so the policy differs from the reference
        for name, p in adapter_state(model, "default").items():
            if "lora_B" in name:
                p.normal_(0, 0.2)
    return model


@pytest.mark.parametrize("arch,impl", [("llama", "sdpa"), ("llama", "eager"), ("gpt2", "sdpa")])
def test_prefix_sharing_forward_equals_the_padded_forward_values_and_gradients(arch, impl):
    batch = collate_pairs(edge_pairs(), pad_id=0)
    packed = pack_pairs(batch["input_ids"], batch["attention_mask"], capacity=8)
    # trees of 5+4-3, 6+4-4 and 3+7-2 tokens (each common prefix once), first-fit into rows of 8
    assert packed.input_ids.shape == (3, 8) and batch["input_ids"].shape == (6, 7)
    assert len(set(packed.index[batch["attention_mask"].bool()].tolist())) == 6 + 6 + 8
    assert pack_pairs(batch["input_ids"], batch["attention_mask"], capacity=64).input_ids.shape == (1, 20)
    results = []
    for layout in (packed, None):
        model = lora_model(arch, impl)
        per_token, mask = completion_logps(model, tree_hidden(model, batch, layout), batch["labels"])
        per_token.sum().backward()
        results.append((per_token, {n: p.grad for n, p in adapter_state(model, "default").items()}))
    assert_close(results[0][0], results[1][0], rtol=1e-5, atol=1e-5)
    for name in results[0][1]:
        assert_close(results[0][1][name], results[1][1][name], rtol=1e-4, atol=1e-6, msg=name)
    assert mask.sum().item() == sum(sum(t != -100 for t in lab[1:]) for it in edge_pairs()
                                    for lab in (it.chosen_labels, it.rejected_labels))


def test_lm_head_only_at_completion_tokens_equals_full_logits():
    model = lora_model()
    batch = collate_pairs(edge_pairs(), pad_id=0)
    logps, lengths = dpo.sequence_logps(model, batch, plan(model, batch))
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
    targets = batch["labels"][:, 1:]
    keep = targets != -100
    full = logits.log_softmax(-1).gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1) * keep
    assert_close(logps, full.sum(-1), rtol=1e-5, atol=1e-5)
    assert lengths.tolist() == keep.sum(-1).tolist()
    assert_close(logps, token_logps(model, batch).sums, rtol=1e-5, atol=1e-5)  # the padded path agrees too


def separate_logps(model, batch):
    """Reference values: each row alone through the model's full logits."""
    out = []
    for row in range(batch["input_ids"].shape[0]):
        n = int(batch["attention_mask"][row].sum())
        ids, labels = batch["input_ids"][row:row + 1, :n], batch["labels"][row, 1:n]
        logits = model(input_ids=ids).logits[0, :-1]
        keep = labels != -100
        out.append(logits.log_softmax(-1)[keep].gather(-1, labels[keep].unsqueeze(-1)).sum())
    return torch.stack(out)


@pytest.mark.parametrize("loss", list(PREFERENCE_LOSSES))
def test_objective_equals_the_loss_on_separately_computed_logps(loss):
    model = lora_model()
    batch = collate_pairs(edge_pairs(), pad_id=0)
    cfg = DPOConfig(loss=loss, beta=0.5 if loss != "simpo" else 2.0, label_smoothing=0.2 if loss == "cdpo" else 0.0)
    objective = dpo.PreferenceObjective(cfg)
    if not objective.loss.needs_reference:  # reference-free: a reference would fail loudly if it were run
        objective.reference_logps = lambda *a: pytest.fail("the reference ran for a reference-free loss")
    total, metrics = objective(model, batch)
    with torch.no_grad():
        policy = separate_logps(model, batch)
        with adapters_disabled(model):
            ref = separate_logps(model, batch)
    b = 3
    lengths = (batch["labels"][:, 1:] != -100).sum(-1)
    x = PreferenceLogps(policy[:b], policy[b:], lengths[:b], lengths[b:], ref[:b], ref[b:],
                        chosen_nll=-policy[:b] / lengths[:b])
    losses, expected = dpo.build_loss(cfg)(x)
    assert objective.units(batch) == 3
    assert_close(total, losses.sum(), rtol=1e-5, atol=1e-5)
    for key, value in expected.items():
        assert_close(metrics[key], value, rtol=1e-5, atol=1e-5, msg=key)
    if loss == "sigmoid":
        assert_close(total, dpo_loss(policy[:b], policy[b:], ref[:b], ref[b:], beta=0.5)[0].sum(), rtol=1e-5, atol=1e-5)
    if objective.loss.needs_reference:  # k1 per token on the chosen completions, averaged over pairs
        assert_close(metrics["kl"], ((policy[:b] - ref[:b]) / lengths[:b]).mean(), rtol=1e-5, atol=1e-6)
        assert metrics["kl"].abs() > 1e-3
    else:
        assert "kl" not in metrics
    assert total.requires_grad and all(not v.requires_grad for v in metrics.values())


def test_rpo_adds_the_chosen_nll_per_token():
    """RPO (Pang et al. 2024): DPO plus alpha x the chosen answer's mean token NLL, from separate forwards."""
    model = lora_model()
    batch = collate_pairs(edge_pairs(), pad_id=0)
    plain, _ = dpo.PreferenceObjective(DPOConfig(beta=0.5))(model, batch)
    total, metrics = dpo.PreferenceObjective(DPOConfig(beta=0.5, rpo_alpha=0.7))(model, batch)
    with torch.no_grad():
        policy = separate_logps(model, batch)
    lengths = (batch["labels"][:, 1:] != -100).sum(-1)
    nll = -policy[:3] / lengths[:3]
    assert_close(total, plain + 0.7 * nll.sum(), rtol=1e-5, atol=1e-5)
    assert_close(metrics["nll/chosen"], nll.mean(), rtol=1e-5, atol=1e-6)


def test_virtual_token_adapters_fall_back_to_the_padded_forward():
    model = build_model("llama", VOCAB)
    torch.manual_seed(0)
    attach_adapter(model, "prompt_tuning", {"num_virtual_tokens": 3})
    batch = collate_pairs(edge_pairs(), pad_id=0)
    assert plan(model, batch) is None  # a soft prompt per sequence: no prefix sharing
    total, _ = dpo.PreferenceObjective(DPOConfig(beta=0.5))(model, batch)
    with torch.no_grad():
        policy = separate_logps(model, batch)
        with adapters_disabled(model):
            ref = separate_logps(model, batch)
    assert_close(total, dpo_loss(policy[:3], policy[3:], ref[:3], ref[3:], beta=0.5)[0].sum(), rtol=1e-5, atol=1e-5)
    assert abs(total.item() - 3 * 0.693147) > 1e-4  # the soft prompt moved the policy off the reference


def test_cdpo_without_smoothing_takes_the_conservative_default():
    assert dpo.build_loss(DPOConfig(loss="cdpo")).label_smoothing == 0.1
    assert dpo.build_loss(DPOConfig(loss="cdpo", label_smoothing=0.3)).label_smoothing == 0.3
    assert dpo.build_loss(DPOConfig(loss="simpo", beta=2.5, simpo_gamma=0.7)) == PREFERENCE_LOSSES["simpo"](2.5, 0.7)


def test_full_finetuning_reference_is_a_frozen_copy_that_stays_put(tmp_path, tiny_model_dir, toy_files):
    cfg = run_config(tiny_model_dir, toy_files[0], tmp_path / "run", "method=full", "adapter={}",
                     "training.max_steps=3", "training.lr=1e-3")
    setup = dpo.prepare(cfg, None)
    model, reference = setup.loaded.model, setup.objective.reference
    assert reference is not None and reference is not model and not reference.training
    assert not any(p.requires_grad for p in reference.parameters())
    assert not {id(p) for p in reference.parameters()} & {id(p) for p in model.parameters()}
    before = {n: p.detach().clone() for n, p in reference.named_parameters()}
    start = {n: p.detach().clone() for n, p in model.named_parameters()}
    fit(model, setup.source, cfg.training, tmp_path / "run", setup.objective, resume="never")
    for name, p in reference.named_parameters():
        assert torch.equal(p, before[name]), name
    assert any(not torch.equal(p, start[n]) for n, p in model.named_parameters())
    with pytest.raises(ValueError, match="needs a reference policy"):  # no adapter to disable, no copy
        dpo.PreferenceObjective(cfg.dpo)(model, setup.source.batches(0, model)[0])


@pytest.mark.parametrize("method", ["lora", "full"])
def test_precomputed_reference_gives_the_same_losses_as_on_the_fly(tmp_path, tiny_model_dir, toy_files, method):
    extra = ["method=full", "adapter={}"] if method == "full" else []
    live = dpo.prepare(run_config(tiny_model_dir, *toy_files[:1], tmp_path / "a", *extra, evalf=toy_files[1]), None)
    cached = dpo.prepare(run_config(tiny_model_dir, *toy_files[:1], tmp_path / "b", *extra, "dpo.precompute_ref=true",
                                    evalf=toy_files[1]), None)
    assert cached.objective.reference is None  # the full-fine-tuning copy is freed once the cache exists
    model = live.loaded.model
    with torch.no_grad():  # move the policy away from the reference, identically in both
        for p_live, p_cached in zip(model.parameters(), cached.loaded.model.parameters()):
            if p_live.requires_grad:
                p_live.add_(torch.randn_like(p_live) * 0.05)
                p_cached.copy_(p_live)
    for step in (0, 5):
        with_cache = cached.source.batches(step, model)[0]
        without = live.source.batches(step, model)[0]
        assert with_cache["ref_logps"].shape == (16,) and "ref_logps" not in without
        assert torch.equal(with_cache["input_ids"], without["input_ids"])
        loss_live, m_live = live.objective(model, without)
        loss_cached, m_cached = cached.objective(cached.loaded.model, with_cache)
        assert_close(loss_cached, loss_live, rtol=1e-5, atol=1e-5)
        assert_close(m_cached["kl"], m_live["kl"], rtol=1e-4, atol=1e-6)
    assert all("ref_logps" in b for b in cached.eval_batches)


def test_dpo_learns_the_toy_preference(tmp_path, tiny_model_dir, toy_files):
    cfg = run_config(tiny_model_dir, toy_files[0], tmp_path / "run", evalf=toy_files[1])
    setup = dpo.prepare(cfg, None)
    model = setup.loaded.model
    before = evaluate(model, setup.eval_batches, setup.objective, torch.device("cpu"))
    assert before["eval_rewards/margins"] == 0 and before["eval_rewards/accuracies"] == 0  # policy == reference
    result = fit(model, setup.source, cfg.training, tmp_path / "run", setup.objective, setup.eval_batches,
                 resume="never")
    after = result.eval_metrics  # held-out pairs (other prompts, other filler)
    assert after["eval_rewards/accuracies"] >= 0.9
    assert after["eval_rewards/margins"] > 0.1
    assert after["eval_loss"] < before["eval_loss"] - 0.05
    gap = lambda m: m["eval_logps/chosen"] - m["eval_logps/rejected"]
    assert gap(after) > gap(before) + 1.0  # = margins / beta, measured without the reference
    assert after["eval_kl"] > 0


@pytest.mark.parametrize("precompute", [False, True])
def test_resume_mid_run_is_exact(tmp_path, tiny_model_dir, toy_files, precompute):
    extra = ["training.max_steps=6", "training.save_every=3", "training.batch_size=4", "training.grad_accum=2",
             "training.lr=5e-3", "adapter.dropout=0.1", f"dpo.precompute_ref={str(precompute).lower()}"]

    def run(out, crash_at=None, resume="auto"):
        cfg = run_config(tiny_model_dir, toy_files[0], out, *extra)
        setup = dpo.prepare(cfg, None)
        make = setup.source.make_batch

        def make_batch(i):
            if crash_at is not None and i >= crash_at:
                raise KeyboardInterrupt("simulated crash")
            return make(i)

        source = IndexedBatches(make_batch, setup.source.n_examples, 4, 2)
        return setup.loaded.model, fit(setup.loaded.model, source, cfg.training, out, setup.objective, resume=resume)

    full_model, full = run(tmp_path / "full", resume="never")
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path / "crash", crash_at=4 * 2 + 1)  # dies during step 5, after the step-3 checkpoint
    resumed_model, resumed = run(tmp_path / "crash")
    losses = lambda r: [h["loss"] for h in r.history if h["kind"] == "train"]
    assert len(losses(resumed)) == 6
    assert losses(resumed) == pytest.approx(losses(full), rel=1e-6)
    for (n, p1), (_, p2) in zip(full_model.named_parameters(), resumed_model.named_parameters()):
        torch.testing.assert_close(p1, p2, msg=n)


def test_unpaired_data_is_refused_before_the_model_loads(tmp_path):
    cfg = run_config("no-such-model-dir", "tests/data/preference/unpaired.jsonl", tmp_path)
    with pytest.raises(Exception, match="unpaired"):
        dpo.prepare(cfg, type("Loaded", (), {"tokenizer": build_tokenizer()})())


# ---- the shipped preference pairs ------------------------------------------------------------------

SKILLS = Path(__file__).resolve().parents[1] / "plugtune" / "tasks" / "skills"


def date_pairs(split: str, n: int) -> list[dict]:
    """How dates_pairs_{split}.jsonl was made: the first n prompts of the dates skill's split; chosen is
    the correct ISO date, rejected the same date with day and month swapped (YYYY-DD-MM), or the year
    before when day == month."""
    rows = []
    for line in (SKILLS / f"dates_{split}.jsonl").read_text().splitlines()[:n]:
        messages = json.loads(line)["messages"]
        answer = messages[1]["content"]
        y, m, d = answer.split("-")
        rejected = f"{y}-{d}-{m}" if d != m else f"{int(y) - 1:04d}-{m}-{d}"
        rows.append({"prompt": messages[0]["content"], "chosen": answer, "rejected": rejected})
    return rows


@pytest.mark.parametrize("split,n", [("train", 512), ("test", 64)])
def test_shipped_date_pairs_are_the_generator_output(split, n):
    shipped = SKILLS / f"dates_pairs_{split}.jsonl"
    assert shipped.read_text() == "".join(json.dumps(r) + "\n" for r in date_pairs(split, n))
    assert len(load_preferences(shipped)) == n


# ---- parity with TRL's DPOTrainer --------------------------------------------------------------------

# ChatML without the newline after <|im_end|>: TRL's completion is everything after the prompt (it would
# include that newline), ours stops at <|im_end|>; without it both score exactly the same tokens.
NO_NEWLINE_TEMPLATE = CHATML_TEMPLATE.replace("<|im_end|>\n", "<|im_end|>").replace("'<|im_end|>' + '\n'", "'<|im_end|>'")


def test_training_steps_match_trl_dpo_trainer_with_peft_lora(tmp_path):
    """Same tiny model, LoRA (TRL's own initialisation, copied), pairs, AdamW, clip 1.0, constant lr, fp32:
    every step's loss, gradient norm, rewards and log-probs agree."""
    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
    pytest.importorskip("trl")
    datasets = pytest.importorskip("datasets")
    from peft import LoraConfig
    from trl import DPOConfig as TRLConfig
    from trl import DPOTrainer

    from plugtune.adapters import load_adapter
    from plugtune.models.loading import load_base

    tok = build_tokenizer(NO_NEWLINE_TEMPLATE)
    base_dir = save_tiny_model_dir(tmp_path / "base")
    tok.save_pretrained(base_dir)
    rows = [{"prompt": [{"role": "user", "content": f"what is {w}"}],
             "chosen": [{"role": "assistant", "content": f"the {w} fox"}],
             "rejected": [{"role": "assistant", "content": f"hello {w} world"}]}
            for w in ("quick", "lazy dog", "brown", "date")]
    rendered = tok.apply_chat_template(rows[0]["prompt"] + rows[0]["chosen"], tokenize=False)
    assert rendered.endswith("the quick fox<|im_end|>") and "<|im_end|>\n" not in rendered
    steps, lr = 3, 1e-2
    args = TRLConfig(output_dir=str(tmp_path / "trl"), per_device_train_batch_size=4, max_steps=steps, learning_rate=lr,
                     lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0, max_grad_norm=1.0, bf16=False,
                     fp16=False, gradient_checkpointing=False, use_cpu=True, logging_steps=1, save_strategy="no",
                     report_to=[], max_length=256, beta=0.1, loss_type=["sigmoid"], disable_tqdm=True, seed=0)
    lora = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
                      task_type="CAUSAL_LM")
    trl_base = load_base(str(base_dir), "float32", "cpu").model
    trainer = DPOTrainer(model=trl_base, args=args, train_dataset=datasets.Dataset.from_list(rows),
                         processing_class=tok, peft_config=lora)
    trainer.model.save_pretrained(tmp_path / "init")  # TRL's initial adapter, loaded into plugtune below
    trainer.train()
    theirs = [h for h in trainer.state.log_history if "loss" in h and "rewards/chosen" in h]

    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = load_run_config(None, ["objective=dpo", f"model.name={base_dir}", f"data.train={pairs}",
                                 f"output.dir={tmp_path / 'ours'}", "training.batch_size=4", f"training.max_steps={steps}",
                                 f"training.lr={lr}", "training.schedule=constant", "training.max_grad_norm=1.0",
                                 "training.progress=false", "output.resume=never", "dpo.beta=0.1"])
    loaded = load_base(str(base_dir), "float32", "cpu")
    loaded.tokenizer = tok
    setup = dpo.prepare(cfg, loaded)
    model = setup.loaded.model
    from plugtune.adapters.layers import remove_adapter

    remove_adapter(model, "default")
    load_adapter(model, tmp_path / "init", "default", trainable=True)
    ours = [h for h in fit(model, setup.source, cfg.training, tmp_path / "ours", setup.objective,
                           resume="never").history if h["kind"] == "train"]
    assert len(theirs) == len(ours) == steps
    assert abs(theirs[0]["loss"] - 0.693147) < 1e-5  # LoRA B starts at 0: the policy is the reference
    for step, (t, o) in enumerate(zip(theirs, ours), start=1):
        for key in ("loss", "grad_norm", "rewards/chosen", "rewards/rejected", "rewards/margins", "logps/chosen",
                    "logps/rejected", "rewards/accuracies"):
            assert o[key] == pytest.approx(t[key], rel=2e-4, abs=2e-5), (step, key)
    assert abs(ours[-1]["rewards/margins"]) > 1e-3  # the later steps are not the trivial first one
