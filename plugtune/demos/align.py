"""The instruction-following demo: does the published recipe (SFT on verified demonstrations, then
preference tuning, with RL as an option) teach the default model to follow verifiable instructions
("use exactly 3 bullet points", "answer in lowercase", ...)?

    plugtune demo --align

One pipeline (training/pipeline.py, the shipped config `align_pipeline`):
1. sample: k answers per training prompt from the base, scored by the instruction checkers; the best
   passing answer, or a failing one repaired into compliance and checked again, is a demonstration;
2. sft: LoRA on those demonstrations;
3. resample: k answers per prompt from the SFT adapter; best vs worst by the checker are pairs;
4. dpo: continues the SFT adapter on those pairs, the SFT adapter (frozen copy) as reference;
5. grpo: from the SFT adapter too, the checker as reward, the SFT adapter as reference.

Then every policy (base, sft, dpo, grpo) answers the held-out prompts (whole topics never seen in
training) and the prompts of constraint types never trained on, greedily, in mixed batches. Reported:
IFEval's four numbers, per-type compliance, the gain over the base with a 95% paired-bootstrap
interval, KL to each stage's reference, forgetting (loss on general chat against the base), time.
"""
from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from plugtune.adapters.layers import adapters_disabled, adapters_only
from plugtune.adapters.mixed import mixed_adapters
from plugtune.config import resolve_config_path
from plugtune.data import Example, collate, tokenize_dataset
from plugtune.data.tokenize import IGNORE_INDEX
from plugtune.evaluation import loss_and_perplexity
from plugtune.inference.generate import GenerationConfig
from plugtune.inference.language_model import LanguageModel
from plugtune.models.causal_lm import hidden_states, lm_head
from plugtune.models.loading import load_base
from plugtune.tasks.chat import general_chat
from plugtune.tasks.instructions.prompts import load_records
from plugtune.tasks.instructions.scores import ifeval_scores, paired_bootstrap
from plugtune.training.pipeline import run_pipeline

POLICIES = ("sft", "dpo", "grpo")  # the pipeline's policy stages, evaluated against the base
REFERENCE = {"sft": None, "dpo": "sft", "grpo": "sft"}  # each stage's reference policy (None: the base)


@dataclass
class AlignDemoSettings:
    config: str = "align_pipeline"  # the shipped pipeline config (or a path)
    max_new_tokens: int = 48  # greedy answers to the held-out prompts
    batch_size: int = 64  # rows per mixed generation batch
    n_chat: int = 64  # general-chat conversations for the forgetting measure
    n_kl: int = 64  # held-out answers the KL to the reference is measured on (a diagnostic; a subset keeps it quick)
    threads: int = 0  # 0: the pipeline's training.threads


def _messages(record: dict) -> list[dict]:
    return [{"role": "user", "content": record["prompt"]}]


@torch.no_grad()
def kl_to_reference(model, tokenizer, prompts: list[list[dict]], answers: list[str], adapter: str,
                    reference: str | None) -> float:
    """Mean per-token KL(policy || reference), exact over the vocabulary, at the positions of the
    policy's own answers; the reference is another adapter on the same base, or the base (None)."""
    examples = [Example(messages=[*p, {"role": "assistant", "content": a}]) for p, a in zip(prompts, answers)]
    items, _ = tokenize_dataset(tokenizer, examples, 512)
    total, count = 0.0, 0
    for i in range(0, len(items), 16):
        batch = collate(items[i:i + 16], tokenizer.pad_token_id)
        keep = batch["labels"][:, 1:] != IGNORE_INDEX
        with mixed_adapters(model, [adapter] * keep.shape[0]):
            policy = lm_head(model)(hidden_states(model, batch["input_ids"], batch["attention_mask"])[:, :-1][keep])
        with adapters_only(model, reference) if reference else adapters_disabled(model):
            ref = lm_head(model)(hidden_states(model, batch["input_ids"], batch["attention_mask"])[:, :-1][keep])
        logp, logq = policy.float().log_softmax(-1), ref.float().log_softmax(-1)
        total += float((logp.exp() * (logp - logq)).sum())
        count += int(keep.sum())
    return total / max(count, 1)


def run_align_demo(model: str | None = None, out: str = "runs/align", settings: AlignDemoSettings | None = None) -> dict:
    s = settings or AlignDemoSettings()
    out_dir = Path(out)
    t_start = time.perf_counter()
    overrides = [f"output.dir={out_dir / 'pipeline'}"] + ([f"model.name={model}"] if model else [])
    if s.threads:
        overrides.append(f"training.threads={s.threads}")
    pipe = run_pipeline(resolve_config_path(s.config), overrides)
    stages = {r.name: r for r in pipe.stages}

    t0 = time.perf_counter()
    lm = LanguageModel(load_base(model or "smollm2-135m"))
    for name in POLICIES:
        lm.add_adapter(name, stages[name].artifact)
    splits = {"held_out": load_records("test"), "unseen_types": load_records("unseen")}
    greedy = GenerationConfig(max_new_tokens=s.max_new_tokens)
    answers: dict[str, dict[str, list[str]]] = {}
    for split, records in splits.items():  # one mixed batch stream: every policy's rows decode together
        prompts = [_messages(r) for r in records]
        names = [p for p in (None, *POLICIES) for _ in records]
        out_rows = lm.generate(prompts * (1 + len(POLICIES)), names, greedy, batch_size=s.batch_size)
        answers[split] = {p or "base": out_rows[k * len(records):(k + 1) * len(records)]
                          for k, p in enumerate((None, *POLICIES))}
    eval_seconds = time.perf_counter() - t0

    chat = general_chat(s.n_chat)
    chat_base = loss_and_perplexity(lm.model, lm.tokenizer, chat)["loss"]
    rows = {}
    for policy in ("base", *POLICIES):
        row = {split: ifeval_scores(splits[split], answers[split][policy]) for split in splits}
        chat_loss = chat_base if policy == "base" else loss_and_perplexity(
            lm.model, lm.tokenizer, chat, adapter_names=[policy] * len(chat))["loss"]
        row["forgetting"] = chat_loss - chat_base
        if policy != "base":
            held = splits["held_out"][: s.n_kl]
            row["kl_to_reference"] = kl_to_reference(lm.model, lm.tokenizer, [_messages(r) for r in held],
                                                     answers["held_out"][policy][: s.n_kl], policy, REFERENCE[policy])
            row["reference"] = REFERENCE[policy] or "base"
            row["gain"] = {split: paired_bootstrap(rows["base"][split]["passed_strict"], row[split]["passed_strict"])
                           for split in splits}
            row["seconds"] = stages[policy].seconds
        rows[policy] = row
    result = {"model": model or "smollm2-135m", "settings": asdict(s), "pipeline": asdict(pipe),
              "prompts": {split: len(r) for split, r in splits.items()}, "results": _compact(rows),
              "eval_seconds": round(eval_seconds, 1), "total_seconds": round(time.perf_counter() - t_start, 1),
              "samples": [{"prompt": r["prompt"], **{p: answers["held_out"][p][i] for p in ("base", *POLICIES)}}
                          for i, r in enumerate(splits["held_out"][:3])]}
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "align_report.json").write_text(json.dumps(result, indent=2))
    table = format_align_table(result)
    (out_dir / "align_report.md").write_text(table + "\n")
    print(table)
    return result


def _compact(rows: dict) -> dict:
    """The per-prompt pass lists stay out of the report; the scores and intervals stay in."""
    out = {}
    for policy, row in rows.items():
        out[policy] = {k: ({kk: vv for kk, vv in v.items() if not kk.startswith("passed_")} if isinstance(v, dict)
                           and "prompt_strict" in v else v) for k, v in row.items()}
    return out


def format_align_table(r: dict) -> str:
    res = r["results"]
    n = r["prompts"]
    lines = [f"== plugtune demo --align: {r['model']}; {n['held_out']} held-out prompts (topics never trained on), "
             f"{n['unseen_types']} prompts of constraint types never trained on; greedy ==", "",
             "| policy | prompt strict | prompt loose | instr. strict | instr. loose | gain (95% CI), points | "
             "unseen types: prompt strict | KL to ref | forgetting (nats/token) | stage time |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for policy, row in res.items():
        h, u = row["held_out"], row["unseen_types"]
        gain = row.get("gain", {}).get("held_out")
        gain_text = f"{gain['gain']:+.1f} [{gain['low']:+.1f}, {gain['high']:+.1f}]" if gain else ""
        kl = f"{row['kl_to_reference']:.3f} (to {row['reference']})" if "kl_to_reference" in row else ""
        secs = f"{row['seconds']:.0f} s" if "seconds" in row else ""
        lines.append(f"| {policy} | {h['prompt_strict']:.1%} | {h['prompt_loose']:.1%} | {h['instruction_strict']:.1%} | "
                     f"{h['instruction_loose']:.1%} | {gain_text} | {u['prompt_strict']:.1%} | {kl} | "
                     f"{row['forgetting']:+.3f} | {secs} |")
    types = sorted(res["base"]["held_out"]["by_type"])
    lines += ["", "| type (held out, strict) | " + " | ".join(res) + " |", "|---|" + "---|" * len(res)]
    for t in types:
        lines.append(f"| {t} | " + " | ".join(f"{res[p]['held_out']['by_type'][t]['strict']:.0%}" for p in res) + " |")
    utypes = sorted(res["base"]["unseen_types"]["by_type"])
    for t in utypes:
        lines.append(f"| {t} (never trained) | "
                     + " | ".join(f"{res[p]['unseen_types']['by_type'][t]['strict']:.0%}" for p in res) + " |")
    stage_times = ", ".join(f"{s['name']} {s['seconds']:.0f} s" for s in r["pipeline"]["stages"])
    lines += ["", f"pipeline: {stage_times}; evaluation {r['eval_seconds']:.0f} s; total {r['total_seconds']:.0f} s",
              "KL: mean per-token KL(policy || its reference) over the vocabulary at the policy's own held-out answers; "
              "forgetting: change in loss per token on general chat (chatterbot-corpus) against the base."]
    return "\n".join(lines)
