"""One run of `plugtune compare` (a method on a data size with a seed, the base's evaluation, or the DPO
stage), in this process or in a worker process of its own: train, then evaluate item by item (each
held-out item's exact match and loss, each general-text item's loss), so the report can put intervals on
every figure and test differences on the same items (compare/stats.py).

A job is a plain JSON-able dict (compare/runner.py builds them), so a local subprocess
(`python -m plugtune.compare.jobs --worker JOB.json`) and a Ray task (compare/ray_executor.py) run the
same function on the same input.
"""
from __future__ import annotations

import copy
import json
import os
import random
import subprocess
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from plugtune.adapters import load_adapter
from plugtune.adapters.merge import fold_into_base
from plugtune.config import RunConfig
from plugtune.data import load_examples, tokenize_dataset
from plugtune.data.batching import batch_indices, collate
from plugtune.data.tokenize import IGNORE_INDEX
from plugtune.evaluation import exact_match, normalise_answer
from plugtune.inference.generate import GenerationConfig, generate
from plugtune.models.causal_lm import batch_hidden, lm_head
from plugtune.models.loading import LoadedModel, load_base
from plugtune.schema import from_dict
from plugtune.tasks.chat import general_chat
from plugtune.training.compute.logprobs import labelled_logps
from plugtune.training.engine.loop import count_parameters, peak_memory_mb
from plugtune.training.recipes.dpo import read_pairs
from plugtune.training.run import train


# ---------------------------------------------------------------- one job (in this process or a worker)


def heldout_examples(path: str, n: int, fmt: str = "auto", system_prompt: str | None = None):
    return load_examples(path, fmt, system_prompt)[:n]


def retention_examples(spec: dict) -> list:
    """General text for the forgetting measure: chatterbot-corpus conversations (question -> answer,
    loss on the answer) or the first n examples of any data file (a `text` file trains every token)."""
    if spec["source"] == "none" or spec["n"] == 0:
        return []
    if spec["source"] == "chatterbot":
        return general_chat(spec["n"])
    return load_examples(spec["source"])[: spec["n"]]


@torch.no_grad()
def item_losses(model, tokenizer, examples: list, max_length: int, batch_size: int) -> list[list[float]]:
    """[loss summed over the item's answer tokens, answer tokens] for each example, in order: the same
    next-token loss as evaluation.loss_and_perplexity (whose mean is sum of sums / sum of tokens), kept per
    item for the bootstrap. Items that tokenize to no supervised token count [0, 0]."""
    items, _ = tokenize_dataset(tokenizer, examples, max_length, "truncate", "responses")
    out = [[0.0, 0] for _ in examples]
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    for i in range(0, len(items), batch_size):
        chunk = items[i:i + batch_size]
        batch = {k: v.to(device) for k, v in collate(chunk, tokenizer.pad_token_id).items()}
        hidden = batch_hidden(model, batch)
        targets = batch["labels"][:, 1:]
        keep = targets != IGNORE_INDEX
        logps = labelled_logps(lm_head(model), hidden[:, :-1][keep], targets[keep]).double()
        counts = keep.sum(dim=1).tolist()
        sums = torch.split(-logps, counts)
        for it, total, n in zip(chunk, sums, counts):
            out[it.source] = [float(total.sum()), int(n)]
    model.train(was_training)
    return out


def pooled_loss(items: list[list[float]]) -> float:
    tokens = sum(n for _, n in items)
    return sum(s for s, _ in items) / max(tokens, 1)


def evaluate_model(model, tokenizer, job: dict, retention: list) -> dict:
    """Greedy exact match and answer loss on the held-out items, loss on the general-text items; the
    per-item outcomes (item_correct, item_loss, retention_items) with their aggregates."""
    ev = job["eval"]
    heldout = heldout_examples(job["heldout"], ev["n"], job["format"], job["system_prompt"])
    t0 = time.perf_counter()
    em = exact_match(model, tokenizer, heldout, GenerationConfig(max_new_tokens=ev["max_new_tokens"]),
                     batch_size=ev["batch_size"])
    # data-sweep runs (with_loss false) need only exact match: the held-out loss is a second pass over the items
    losses = item_losses(model, tokenizer, heldout, job["max_length"], ev["batch_size"]) \
        if job.get("with_loss", True) else None
    out = {"exact_match": em.accuracy, "correct": em.correct, "total": em.total,
           "heldout_loss": pooled_loss(losses) if losses is not None else None,
           "samples": em.samples[: ev["samples"]], "item_correct": [int(s["correct"]) for s in em.samples],
           "item_loss": losses}
    if retention:
        out["retention_items"] = item_losses(model, tokenizer, retention, job["retention"]["max_length"],
                                             ev["batch_size"])
        out["retention_loss"] = pooled_loss(out["retention_items"])
    out["eval_seconds"] = time.perf_counter() - t0
    return out


def perturb(answer: str, rng: random.Random) -> str:
    """The reference with one thing wrong: a digit changed (never to a leading zero), else two words
    swapped, else the text reversed or a character appended."""
    digits = [i for i, c in enumerate(answer) if c.isdigit()]
    if digits:
        i = rng.choice(digits)
        choices = [d for d in "0123456789" if d != answer[i] and not (d == "0" and i == 0 and len(answer) > 1)]
        return answer[:i] + rng.choice(choices) + answer[i + 1:]
    words = answer.split()
    if len(words) > 1 and len(set(words)) > 1:
        i = rng.choice([k for k in range(len(words) - 1) if words[k] != words[k + 1]])
        words[i], words[i + 1] = words[i + 1], words[i]
        return " ".join(words)
    return answer[::-1] if answer[::-1] != answer else answer + "."


def build_pairs(model, tokenizer, examples: list, rejected: str, gen_cfg, batch_size: int, seed: int = 0):
    """Preference pairs from task examples: chosen = the reference; rejected = the model's own wrong
    greedy answer (rejected=model) or, where it is right or empty, the perturbed reference."""
    answers = generate(model, tokenizer, [ex.prompt_messages() for ex in examples], gen_cfg, batch_size=batch_size)
    rng = random.Random(seed)
    rows, from_model = [], 0
    for ex, answer in zip(examples, answers):
        wrong = answer.strip() and normalise_answer(answer) != normalise_answer(ex.reference)
        use_model = rejected == "model" and wrong
        from_model += bool(use_model)
        rows.append({"prompt": ex.prompt_messages(), "chosen": ex.reference,
                     "rejected": answer if use_model else perturb(ex.reference, rng)})
    return rows, from_model


def _fresh_base(job: dict, base):
    if base is None:
        return load_base(job["model"], job["dtype"], job["device"])
    return LoadedModel(copy.deepcopy(base.model), base.tokenizer, base.path, base.name)


def _sft_model(job: dict, base):
    """The SFT row's model as the new base: its adapter folded into the weights, or its model directory."""
    artifact = Path(job["sft_artifact"])
    if not (artifact / "adapter_config.json").is_file():
        return load_base(str(artifact), job["dtype"], job["device"])
    loaded = _fresh_base(job, base)
    load_adapter(loaded.model, artifact)
    fold_into_base(loaded.model, "default")
    return loaded


def _dpo_tokens(pairs_file: str, tokenizer, run) -> int:
    """Completion tokens (chosen + rejected) the DPO stage trained on: the pair stream re-drawn."""
    items, _ = read_pairs(pairs_file, tokenizer, run, run.dpo.max_prompt_length or None)
    t, total = run.training, 0
    for i in range(t.max_steps * t.grad_accum):
        for j in batch_indices(len(items), i, t.batch_size, t.seed):
            total += sum(lab != IGNORE_INDEX for lab in items[j].chosen_labels[1:] + items[j].rejected_labels[1:])
    return total


def run_job(job: dict, base=None) -> dict:
    """Train and evaluate one run (kind sft or dpo), or evaluate the untrained base (kind base).
    `base` None: load it here (a worker process: its peak memory is this run's); else train a copy."""
    run = from_dict(RunConfig, job["run_config"], where="job")
    own_process = base is None
    if own_process:
        # What the loop imports on the way (the loss-curve plot) is not training memory: import it before the
        # after-load mark. Here, not at the top: pyplot is slow to import, and the Agg backend chosen before it
        # is a process-wide setting that only a worker process should make.
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot  # noqa: F401
    retention = retention_examples(job["retention"]) if job["with_retention"] else []
    if job["kind"] == "base":
        loaded = base if base is not None else _fresh_base(job, None)
        return {"params": count_parameters(loaded.model)[1],
                **evaluate_model(loaded.model, loaded.tokenizer, job, retention)}
    stage: dict[str, Any] = {}
    if job["kind"] == "dpo":
        loaded = _sft_model(job, base)
        device = next(loaded.model.parameters()).device
        after_load = peak_memory_mb(device)
        prompts = heldout_examples(job["train_file"], job["pairs"], job["format"], job["system_prompt"])
        t0 = time.perf_counter()
        rows, from_model = build_pairs(loaded.model, loaded.tokenizer, prompts, job["rejected"],
                                       GenerationConfig(max_new_tokens=job["eval"]["max_new_tokens"]),
                                       job["eval"]["batch_size"], run.training.seed)
        Path(run.data.train).parent.mkdir(parents=True, exist_ok=True)
        Path(run.data.train).write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
        stage = {"pairs": len(rows), "rejected_from_model": from_model, "pairs_seconds": time.perf_counter() - t0}
    else:
        loaded = _fresh_base(job, base)
        device = next(loaded.model.parameters()).device
        after_load = peak_memory_mb(device)
    report = train(run, loaded)
    memory = {"measured": own_process, "after_load_mb": after_load if own_process else None,
              "peak_mb": report.peak_memory_mb if own_process else None}
    result = {"train": asdict(report), "memory": memory,
              **stage, **evaluate_model(loaded.model, loaded.tokenizer, job, retention)}
    if job["kind"] == "dpo":
        result["supervised_tokens"] = _dpo_tokens(run.data.train, loaded.tokenizer, run)
    return result


def write_json_atomic(path: Path, data: Any) -> None:
    """Write to a temporary file beside it, then rename: a reader (a resumed compare) never sees half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    tmp.write_text(json.dumps(data, indent=1, ensure_ascii=False))
    os.replace(tmp, path)


def run_job_in_thread_budget(job: dict) -> dict:
    """A worker process's entry (subprocess or Ray task): the job's torch threads, then the run."""
    torch.set_num_threads(job["threads"])
    return run_job(job)


def same_code_env() -> dict[str, str]:
    """This process's environment with this plugtune first on PYTHONPATH: a worker process runs the same code
    as the process that started it, whatever is installed."""
    root = str(Path(__file__).resolve().parent.parent.parent)
    path = os.environ.get("PYTHONPATH")
    return {**os.environ, "PYTHONPATH": root + (os.pathsep + path if path else "")}


def run_in_subprocess(job: dict, job_dir: Path) -> dict:
    """The job in a fresh Python process (its peak memory is its own); its result read back."""
    job_dir.mkdir(parents=True, exist_ok=True)
    job_file, result_file = job_dir / "job.json", job_dir / "result.json"
    result_file.unlink(missing_ok=True)
    job_file.write_text(json.dumps({**job, "result": str(result_file)}, indent=1))
    proc = subprocess.run([sys.executable, "-m", "plugtune.compare.jobs", "--worker", str(job_file)],
                          env=same_code_env())
    if proc.returncode != 0 or not result_file.is_file():
        raise RuntimeError(f"the worker for '{job['name']}' failed (exit {proc.returncode}); its output is above; "
                           f"rerun it alone with: {sys.executable} -m plugtune.compare.jobs --worker {job_file}")
    return json.loads(result_file.read_text())


def _worker_main(job_file: str) -> None:
    job = json.loads(Path(job_file).read_text())
    write_json_atomic(Path(job["result"]), run_job_in_thread_budget(job))


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--worker":
        _worker_main(sys.argv[2])
    else:
        sys.exit("usage: python -m plugtune.compare.jobs --worker JOB.json   (plugtune compare CONFIG runs a comparison)")
