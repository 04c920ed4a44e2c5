"""The instruction-following demo: does alignment teach the default model to follow verifiable
instructions ("use exactly 3 bullet points", "answer in lowercase", ...)?

    plugtune demo --align

1. strict compliance of the base model on held-out prompts (tasks/instructions/checkers.py checkers, greedy);
2. on-policy pairs: k sampled answers per training prompt, the checker picks chosen and rejected;
3. three aligned adapters on the same base, each through the one training loop:
   DPO on those pairs; GRPO with the checker as reward; PPO with a reward model trained on the pairs;
4. held-out compliance of all three in one mixed batch (each row its own adapter), the KL of each
   to the reference (the base) on its own answers, and forgetting: the change in loss on general chat
   (chatterbot-corpus conversations) against the base.
"""
from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from plugtune.adapters.layers import adapters_disabled
from plugtune.adapters.mixed import mixed_adapters
from plugtune.config import load_run_config
from plugtune.data import Example, collate, tokenize_dataset
from plugtune.data.tokenize import IGNORE_INDEX
from plugtune.evaluation import loss_and_perplexity
from plugtune.inference.generate import GenerationConfig
from plugtune.inference.language_model import LanguageModel
from plugtune.models.causal_lm import hidden_states, lm_head
from plugtune.models.loading import load_base
from plugtune.tasks.chat import general_chat
from plugtune.tasks.instructions.checkers import compliance_reward, strict_accuracy
from plugtune.tasks.instructions.prompts import load_records
from plugtune.training.run import train

METHODS = ("dpo", "grpo", "ppo")


@dataclass
class AlignDemoSettings:
    n_eval: int = 64  # held-out prompts scored for strict compliance
    n_sample_prompts: int = 64  # training prompts sampled for on-policy pairs
    samples: int = 4  # answers sampled per prompt (the checker picks chosen and rejected among them)
    min_gap: float = 0.1  # a pair needs this much more (shaped) reward for chosen than for rejected
    max_new_tokens: int = 48
    temperature: float = 1.0
    dpo_steps: int = 16
    dpo_lr: float = 1e-3
    rpo_alpha: float = 1.0  # DPO + the chosen answer's NLL (RPO): learns the compliant formats faster
    reward_steps: int = 12
    grpo_steps: int = 12
    ppo_steps: int = 12
    n_chat: int = 64  # general-chat conversations for the forgetting measure


def _messages(record: dict) -> list[dict]:
    return [{"role": "user", "content": record["prompt"]}]


def on_policy_pairs(lm: LanguageModel, records: list[dict], s: AlignDemoSettings) -> list[dict]:
    """k sampled answers per prompt; chosen = the best by the checker's shaped reward, rejected = the
    worst, kept when the checker prefers chosen by at least `min_gap` (compliant beats non-compliant
    by 0.5 or more; among non-compliant answers the graded credit decides)."""
    prompts = [_messages(r) for r in records for _ in range(s.samples)]
    gen = GenerationConfig(max_new_tokens=s.max_new_tokens, temperature=s.temperature, top_p=0.95, seed=0)
    answers = lm.generate(prompts, None, gen, batch_size=64)
    rewards = compliance_reward([r for r in records for _ in range(s.samples)], answers)
    pairs = []
    for i, record in enumerate(records):
        group = list(zip(rewards[i * s.samples:(i + 1) * s.samples], answers[i * s.samples:(i + 1) * s.samples]))
        best, worst = max(group, key=lambda x: x[0]), min(group, key=lambda x: x[0])
        if best[0] >= worst[0] + s.min_gap and best[1] != worst[1]:
            pairs.append({"prompt": _messages(record), "chosen": [{"role": "assistant", "content": best[1]}],
                          "rejected": [{"role": "assistant", "content": worst[1]}]})
    return pairs


@torch.no_grad()
def kl_to_reference(model, tokenizer, prompts: list[list[dict]], answers: list[str], adapter: str) -> float:
    """Mean per-token KL(policy || reference), exact over the vocabulary, at the positions of the
    policy's own answers (the reference: the base, adapters off)."""
    examples = [Example(messages=[*p, {"role": "assistant", "content": a}]) for p, a in zip(prompts, answers)]
    items, _ = tokenize_dataset(tokenizer, examples, 512)
    total, count = 0.0, 0
    for i in range(0, len(items), 16):
        batch = collate(items[i:i + 16], tokenizer.pad_token_id)
        keep = batch["labels"][:, 1:] != IGNORE_INDEX
        with mixed_adapters(model, [adapter] * keep.shape[0]):
            policy = lm_head(model)(hidden_states(model, batch["input_ids"], batch["attention_mask"])[:, :-1][keep])
        with adapters_disabled(model):
            ref = lm_head(model)(hidden_states(model, batch["input_ids"], batch["attention_mask"])[:, :-1][keep])
        logp, logq = policy.float().log_softmax(-1), ref.float().log_softmax(-1)
        total += float((logp.exp() * (logp - logq)).sum())
        count += int(keep.sum())
    return total / max(count, 1)


def _train(config: str, overrides: list[str], base: str | None) -> tuple[str, float]:
    cfg = load_run_config(config, overrides + ([f"model.name={base}"] if base else []))
    t0 = time.perf_counter()
    report = train(cfg)
    return report.artifact, time.perf_counter() - t0


def run_align_demo(model: str | None = None, out: str = "runs/align", settings: AlignDemoSettings | None = None) -> dict:
    s = settings or AlignDemoSettings()
    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    t_start, times = time.perf_counter(), {}
    lm = LanguageModel(load_base(model or "smollm2-135m"))
    held_out = load_records("test")[: s.n_eval]
    train_records = load_records("train")
    eval_prompts = [_messages(r) for r in held_out]
    greedy = GenerationConfig(max_new_tokens=s.max_new_tokens)

    t0 = time.perf_counter()
    base_answers = lm.generate(eval_prompts, None, greedy, batch_size=64)
    before = strict_accuracy(held_out, base_answers)
    times["base_eval"] = time.perf_counter() - t0
    print(f"[align] base model: {before:.1%} strict compliance on {len(held_out)} held-out prompts")

    t0 = time.perf_counter()
    pairs = on_policy_pairs(lm, train_records[: s.n_sample_prompts], s)
    pairs_file = out_dir / "on_policy_pairs.jsonl"
    pairs_file.write_text("".join(json.dumps(p) + "\n" for p in pairs))
    times["sampling"] = time.perf_counter() - t0
    print(f"[align] {len(pairs)} on-policy pairs from {s.n_sample_prompts} prompts x {s.samples} samples")
    if len(pairs) < 4:
        raise RuntimeError(f"only {len(pairs)} on-policy pairs: the checker could not tell the samples apart")

    base = model
    common = ["training.progress=false", "output.resume=never", f"rollout.max_new_tokens={s.max_new_tokens}"]
    artifacts = {}
    artifacts["dpo"], times["dpo"] = _train("dpo", common + [
        f"data.train={pairs_file}", "data.eval=", f"output.dir={out_dir / 'dpo'}", f"training.max_steps={s.dpo_steps}",
        "adapter.r=16", "adapter.alpha=32", f"training.lr={s.dpo_lr}", "training.warmup_steps=2",
        "training.eval_every=0", "dpo.precompute_ref=true", f"dpo.rpo_alpha={s.rpo_alpha}"], base)
    reward_dir, times["reward_model"] = _train("reward", common + [
        f"data.train={pairs_file}", "data.eval=", f"output.dir={out_dir / 'reward'}",
        f"training.max_steps={s.reward_steps}", "training.eval_every=0", "training.warmup_steps=2",
        "training.lr=5e-4"], base)
    artifacts["grpo"], times["grpo"] = _train("grpo", common + [
        f"output.dir={out_dir / 'grpo'}", f"training.max_steps={s.grpo_steps}"], base)
    artifacts["ppo"], times["ppo"] = _train("ppo", common + [
        f"output.dir={out_dir / 'ppo'}", f"training.max_steps={s.ppo_steps}", f"rollout.reward_model={reward_dir}"],
        base)

    t0 = time.perf_counter()
    for name in METHODS:
        lm.add_adapter(name, artifacts[name])
    names = [m for m in METHODS for _ in held_out]
    answers = lm.generate(eval_prompts * len(METHODS), names, greedy, batch_size=64)  # one mixed batch per 64 rows
    by_method = {m: answers[k * len(held_out):(k + 1) * len(held_out)] for k, m in enumerate(METHODS)}
    times["aligned_eval"] = time.perf_counter() - t0

    chat = general_chat(s.n_chat)
    chat_before = loss_and_perplexity(lm.model, lm.tokenizer, chat)["loss"]
    rows = {"base": {"compliance": before, "kl_to_base": 0.0, "chat_loss": chat_before, "chat_loss_change": 0.0}}
    for m in METHODS:
        chat_loss = loss_and_perplexity(lm.model, lm.tokenizer, chat, adapter_names=[m] * len(chat))["loss"]
        rows[m] = {"compliance": strict_accuracy(held_out, by_method[m]),
                   "kl_to_base": kl_to_reference(lm.model, lm.tokenizer, eval_prompts, by_method[m], m),
                   "chat_loss": chat_loss, "chat_loss_change": chat_loss - chat_before}
    result = {"model": model or "smollm2-135m", "settings": asdict(s), "held_out_prompts": len(held_out),
              "on_policy_pairs": len(pairs), "results": rows, "seconds": times,
              "total_seconds": time.perf_counter() - t_start,
              "samples": [{"prompt": r["prompt"], "base": base_answers[i], **{m: by_method[m][i] for m in METHODS}}
                          for i, r in enumerate(held_out[:3])]}
    (out_dir / "align_report.json").write_text(json.dumps(result, indent=2))
    print(format_align_table(result))
    return result


def format_align_table(r: dict) -> str:
    lines = [f"\n== plugtune demo --align: {r['model']}, {r['held_out_prompts']} held-out verifiable-instruction "
             f"prompts (strict, greedy) ==",
             f"{'':<6} {'compliance':>11} {'change':>8} {'KL to base':>11} {'chat loss':>10} {'forgetting':>11}"]
    base = r["results"]["base"]["compliance"]
    for name, row in r["results"].items():
        lines.append(f"{name:<6} {row['compliance']:>11.1%} {100 * (row['compliance'] - base):>+7.1f}p "
                     f"{row['kl_to_base']:>11.4f} {row['chat_loss']:>10.3f} {row['chat_loss_change']:>+11.3f}")
    t = r["seconds"]
    lines.append(f"{r['on_policy_pairs']} on-policy pairs; time: " + ", ".join(f"{k} {v:.0f} s" for k, v in t.items())
                 + f"; total {r['total_seconds']:.0f} s")
    lines.append("KL: mean per-token KL(policy || base) over the vocabulary at the policy's own held-out answers; "
                 "forgetting: change in loss per token on general chat (chatterbot-corpus) against the base.")
    return "\n".join(lines)
