"""Evaluation: loss/perplexity on a dataset, exact-match accuracy of generated answers, a reward
model's pairwise accuracy on preference pairs (`plugtune eval --reward-model`), and instruction
following on verifiable-instruction prompts (`plugtune eval --instructions`: IFEval's four scores)."""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path

from torch import nn

from plugtune.data import Example, tokenize_dataset
from plugtune.data.batching import collate
from plugtune.data.preference import load_preferences
from plugtune.inference.generate import GenerationConfig, generate
from plugtune.inference.language_model import LanguageModel
from plugtune.inference.reward_model import load_reward_model, pairwise_accuracy, read_meta
from plugtune.tasks.instructions.scores import ifeval_scores, paired_bootstrap
from plugtune.training.compute.next_token import CausalLMObjective
from plugtune.training.engine.loop import evaluate_loss


@dataclass
class ExactMatchResult:
    accuracy: float
    correct: int
    total: int
    seconds: float
    samples: list[dict] = field(default_factory=list)  # prompt, reference, generated, correct


def normalise_answer(text: str) -> str:
    """Exact match ignores surrounding whitespace only: the answer format is part of the skill."""
    return text.strip()


def loss_and_perplexity(model: nn.Module, tokenizer, examples: list[Example], max_length: int = 512,
                        batch_size: int = 8, train_on: str = "responses",
                        adapter_names: list[str | None] | None = None) -> dict:
    """Mean loss per supervised token and perplexity; `adapter_names` gives each example its own
    adapter (None: the base), as a routed model would answer it."""
    if adapter_names is not None and len(adapter_names) != len(examples):
        raise ValueError(f"{len(adapter_names)} adapter names for {len(examples)} examples")
    items, stats = tokenize_dataset(tokenizer, examples, max_length, "truncate", train_on)
    batches = []
    for i in range(0, len(items), batch_size):
        batch = collate(items[i:i + batch_size], tokenizer.pad_token_id)
        if adapter_names is not None:
            batch["adapter_names"] = [adapter_names[it.source] for it in items[i:i + batch_size]]
        batches.append(batch)
    device = next(model.parameters()).device
    loss = evaluate_loss(model, batches, CausalLMObjective(), device)
    return {"loss": loss, "perplexity": math.exp(min(loss, 50)), "examples": stats.kept,
            "supervised_tokens": stats.supervised_tokens}


def exact_match(model: nn.Module, tokenizer, examples: list[Example], gen: GenerationConfig | None = None,
                batch_size: int = 16, adapter_names: list[str | None] | None = None) -> ExactMatchResult:
    """Generate an answer to each example's prompt and compare it with its last assistant message.
    `adapter_names` answers each example with its own adapter (None: the base), in mixed batches."""
    if adapter_names is not None and len(adapter_names) != len(examples):
        raise ValueError(f"{len(adapter_names)} adapter names for {len(examples)} examples")
    keep = [i for i, ex in enumerate(examples) if ex.reference is not None]
    usable = [examples[i] for i in keep]
    if not usable:
        raise ValueError("exact match needs examples with an assistant answer (the reference)")
    names = [adapter_names[i] for i in keep] if adapter_names is not None else None
    gen = gen or GenerationConfig(max_new_tokens=48)
    t0 = time.perf_counter()
    outputs = generate(model, tokenizer, [ex.prompt_messages() for ex in usable], gen, batch_size=batch_size,
                       adapter_names=names)
    samples = []
    for k, (ex, out) in enumerate(zip(usable, outputs)):
        ok = normalise_answer(out) == normalise_answer(ex.reference)
        sample = {"prompt": ex.prompt_messages()[-1]["content"], "reference": ex.reference, "generated": out,
                  "correct": ok}
        if names is not None:
            sample["adapter"] = names[k]
        samples.append(sample)
    correct = sum(s["correct"] for s in samples)
    return ExactMatchResult(accuracy=correct / len(samples), correct=correct, total=len(samples),
                            seconds=time.perf_counter() - t0, samples=samples)


def evaluate_reward_model(path: str | Path, data: str | Path, base: str | None = None, limit: int = 0,
                          max_length: int = 512, dtype: str = "auto", device: str = "auto", force: bool = False) -> dict:
    """`plugtune eval --reward-model DIR --data pairs.jsonl`: pairwise accuracy on a pairs file. `base`:
    the base model of an adapter reward model (default: the one recorded at training); a full reward
    model is its own base."""
    pairs = load_preferences(data)
    pairs = pairs[:limit] if limit else pairs
    model = base if read_meta(path)["adapter"] else None
    scorer = load_reward_model(path, model, dtype=dtype, device=device, force=force)
    return {"data": str(data), "reward_model": str(path), **pairwise_accuracy(scorer, pairs, max_length)}


def evaluate_instructions(lm: LanguageModel, records: list[dict], adapters: str | list[str | None] | None = None,
                          batch_size: int = 32, max_new_tokens: int = 64, baseline: dict | None = None) -> dict:
    """Greedy answers to verifiable-instruction records (prompts.py: "prompt" + "constraints"), scored
    as IFEval does: `ifeval_scores` (prompt/instruction x strict/loose, per type, per-prompt passes)
    plus "responses", "ids" and "seconds". `adapters` as in `LanguageModel.generate` (None: the active
    adapters; a name; one per record; "auto"). `baseline`: the result of another policy on the same
    records; adds "gain" and "gain_loose", the paired-bootstrap gain in points with its 95% interval."""
    if not records:
        raise ValueError("no instruction records to evaluate")
    ids = [r.get("id", i) for i, r in enumerate(records)]
    if baseline is not None and (baseline["n_prompts"] != len(records) or baseline.get("ids", ids) != ids):
        raise ValueError(f"the baseline was scored on other records ({baseline['n_prompts']} prompts, here "
                         f"{len(records)}): a paired gain needs the same prompts in the same order")
    t0 = time.perf_counter()
    prompts = [[{"role": "user", "content": r["prompt"]}] for r in records]
    responses = lm.generate(prompts, adapters, GenerationConfig(max_new_tokens=max_new_tokens), batch_size=batch_size)
    result = {**ifeval_scores(records, responses), "responses": responses, "ids": ids,
              "seconds": time.perf_counter() - t0}
    if baseline is not None:
        result["gain"] = paired_bootstrap(baseline["passed_strict"], result["passed_strict"])
        result["gain_loose"] = paired_bootstrap(baseline["passed_loose"], result["passed_loose"])
    return result


def format_instruction_scores(result: dict) -> str:
    """The four IFEval numbers, the gain over a baseline if any, and the per-type table."""
    lines = [f"prompts: {result['n_prompts']}",
             f"prompt-level strict {result['prompt_strict']:.1%}   loose {result['prompt_loose']:.1%}",
             f"instruction-level strict {result['instruction_strict']:.1%}   loose {result['instruction_loose']:.1%}"]
    if "gain" in result:
        g = result["gain"]
        lines.append(f"gain over the baseline (prompt strict): {g['gain']:+.1f} points, 95% CI "
                     f"[{g['low']:+.1f}, {g['high']:+.1f}] (paired bootstrap, n={g['n']})")
    width = max(len(t) for t in result["by_type"])
    lines += ["", f"{'type':<{width}}  strict   loose     n"]
    lines += [f"{t:<{width}}  {v['strict']:6.1%}  {v['loose']:6.1%}  {v['n']:4d}" for t, v in result["by_type"].items()]
    return "\n".join(lines)
