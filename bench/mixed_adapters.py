"""Mixed-adapter batches: greedy decoding with 1, 4 and 16 LoRA adapters in one batch, plugtune vs PEFT,
side by side with the base model and one merged adapter; plus multi-task training step time.

Workload (the issue's): 16 chat prompts of about 32 tokens (the whole templated prompt, default
system prompt included; user text from the skill test prompts shipped with plugtune, so the run needs
no other data), exactly 32 new tokens per prompt (no end token stops a row), one batch, KV cache,
greedy. 16 LoRA adapters (r 8, alpha 16, q/k/v/o) with random non-zero B (each adapted weight moved
by 10% of its norm) so they differ, saved with plugtune's save_adapter and loaded by PEFT from the
same files. Rows get adapters round-robin: with 1 adapter every row has the same one, with 16 each
row its own. "merged" folds adapter a0 into the plugtune copy's weights (its wrappers stay, idle).

tokens/s = prompts x new tokens / wall time of the whole generate call (prefill included), median
over --repeats after one warm-up of every case. Each repeat runs every case once, always in the same
order (base, plugtune mixed 1/4/16, PEFT mixed 1/4/16, merged; then again), and a case's ratio to
the base is taken within each repeat, so drift between repeats (other processes, thermal) cancels
out of the ratios; the table gives the median of the per-repeat ratios, and lists them. plugtune,
PEFT and the plain base are three copies of the base weights loaded separately.

Multi-task training: one AdamW step of 4 adapters on a mixed batch of 16 rows (4 per adapter,
~64-token rows of 4 skills) against 4 steps of 4 rows, one adapter active in each.

    python bench/mixed_adapters.py [--model smollm2-135m] [--threads 2] [--repeats 3] [--new-tokens 32]
                                   [--prompts 16] [--out bench/results/mixed_adapters.json]
    python bench/mixed_adapters.py --model /tmp/tiny-bench --threads 1 --repeats 1 --prompts 4 --new-tokens 4

Prints a table and writes JSON with every raw timing.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch

SKILLS = ("dates", "reverse", "prices", "units", "arith")  # prompt sources, shipped with plugtune
TRAIN_SKILLS = ("dates", "reverse", "prices", "units")  # one adapter per skill in the training part
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]


# Workload ------------------------------------------------------------------------------------
def chat_prompts(tokenizer, n: int, target: int) -> list[list[int]]:
    """n templated user prompts of at most `target` tokens (at least one word of content): the user
    text is the i-th skill test prompt followed by the next ones, cut at the last word that fits."""
    from plugtune.data import load_examples, prompt_ids
    from plugtune.tasks.skills.generate import skill_files

    texts = [[ex.prompt_messages()[-1]["content"] for ex in load_examples(skill_files(s)[1])] for s in SKILLS]
    stream = [texts[i % len(SKILLS)][i // len(SKILLS)] for i in range(n + 8)]
    prompts = []
    for i in range(n):
        words = " ".join(stream[i:i + 8]).split()
        ids = prompt_ids(tokenizer, [{"role": "user", "content": words[0]}])
        for k in range(2, len(words) + 1):
            longer = prompt_ids(tokenizer, [{"role": "user", "content": " ".join(words[:k])}])
            if len(longer) > target:
                break
            ids = longer
        prompts.append(ids)
    return prompts


def make_adapters(model, n: int, r: int, delta: float, seed: int, out_dir: Path) -> list[Path]:
    """Attach n LoRA adapters a0..a{n-1} to `model`, save each with save_adapter, and leave none
    active (rows pick theirs per batch). A keeps PEFT's init; B is random, scaled per layer so that
    ||s B A||_F = delta * ||W||_F: every adapter moves each adapted weight by the same relative
    amount, on any model (seeded)."""
    from plugtune.adapters.io import attach_adapter, save_adapter
    from plugtune.adapters.layers import adapter_layers, set_active_adapters

    dirs = []
    for k in range(n):
        torch.manual_seed(seed + k)
        name = f"a{k}"
        attach_adapter(model, "lora", {"r": r, "alpha": 2 * r, "target_modules": TARGETS}, name=name, trainable=False)
        with torch.no_grad():
            for _, layer in adapter_layers(model):
                if name in layer.configs:
                    b = layer.lora_B[name].weight
                    b.normal_()
                    b.mul_(delta * layer.weight_out_in().norm() / layer.delta_weight(name).norm())
        dirs.append(save_adapter(model, out_dir / name, name))
    set_active_adapters(model, [])
    model.eval()
    return dirs


def load_peft(model, dirs: list[Path]):
    """PEFT's model over `model` with the adapters in `dirs`, named as their directories. The
    model's own end token is cleared: transformers' generate falls back to it even when the
    GenerationConfig passed says eos_token_id=None, and would stop rows early."""
    from peft import PeftModel

    model.generation_config.eos_token_id = None
    peft_model = PeftModel.from_pretrained(model, str(dirs[0]), adapter_name=dirs[0].name)
    for d in dirs[1:]:
        peft_model.load_adapter(str(d), adapter_name=d.name)
    return peft_model.eval()


def left_pad(prompts: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, T) input ids and attention mask, left-padded as plugtune's generate_ids pads them."""
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, p in enumerate(prompts):
        ids[row, width - len(p):] = torch.tensor(p)
        mask[row, width - len(p):] = 1
    return ids, mask


def peft_generate(peft_model, prompts: list[list[int]], names: list[str], new_tokens: int, pad_id: int):
    """PEFT's mixed batch: generate(..., adapter_names=[one per row]), greedy, exactly new_tokens.
    No end token is set (see load_peft), so nothing stops a row early and nothing is suppressed, as
    with generate_ids(stop_ids=[]); min_new_tokens would instead mask the end token, changing the
    argmax wherever it would win."""
    from transformers import GenerationConfig

    ids, mask = left_pad(prompts, pad_id)
    gen = GenerationConfig(max_new_tokens=new_tokens, do_sample=False, use_cache=True, pad_token_id=pad_id,
                           eos_token_id=None, bos_token_id=None)
    with torch.no_grad():
        out = peft_model.generate(input_ids=ids, attention_mask=mask, generation_config=gen, adapter_names=names)
    return out[:, ids.shape[1]:].tolist()


# Memory --------------------------------------------------------------------------------------
def rss_mb(field: str = "VmRSS") -> float | None:
    """Current (VmRSS) or peak (VmHWM) resident memory of this process, from /proc (Linux)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def reset_peak_rss() -> bool:
    """Reset VmHWM to the current RSS (Linux >= 4.0), so a case's own peak can be read after it.
    This resets getrusage's ru_maxrss too: read the peak so far before calling it."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def cpu_model() -> str:
    """The CPU's name (platform.processor() is empty on most Linux systems)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def param_mb(tensors) -> float:
    return sum(t.numel() * t.element_size() for t in tensors) / 2**20


# Multi-task training -------------------------------------------------------------------------
def training_rows(tokenizer, rows: int, length: int) -> dict[str, list]:
    """`rows` tokenized examples per skill, each several turns of that skill joined until it reaches
    `length` tokens, then cut there (but never inside its first turn), loss on the assistant turns."""
    from plugtune.data import Example, Tokenized, load_examples, tokenize_example
    from plugtune.tasks.skills.generate import skill_files

    per_skill = {}
    for skill in TRAIN_SKILLS:
        source = iter(load_examples(skill_files(skill)[0]))
        items = []
        for _ in range(rows):
            messages = list(next(source).messages)
            tokens = tokenize_example(tokenizer, Example(messages=messages))
            first = len(tokens.input_ids)
            while len(tokens.input_ids) < length:
                messages += next(source).messages
                tokens = tokenize_example(tokenizer, Example(messages=messages))
            cut = max(length, first)
            items.append(Tokenized(tokens.input_ids[:cut], tokens.labels[:cut]))
        per_skill[skill] = items
    return per_skill


def lm_loss(model, batch: dict) -> torch.Tensor:
    """Mean token loss over the batch. (plugtune.training.recipes.multitask normalises each adapter by its
    own tokens instead; the work per step, which is what is timed here, is the same.)"""
    from plugtune.training.compute.next_token import CausalLMObjective

    objective = CausalLMObjective()
    loss_sum, _ = objective(model, batch)
    return loss_sum / max(1, objective.units(batch))


def mixed_step(model, opt, batch: dict, names: list[str]) -> float:
    """One optimizer step of every adapter at once: row i trains adapter names[i]."""
    from plugtune.adapters.mixed import mixed_adapters

    start = time.perf_counter()
    opt.zero_grad(set_to_none=True)
    with mixed_adapters(model, names):
        loss = lm_loss(model, batch)
    loss.backward()
    opt.step()
    return time.perf_counter() - start


def sequential_steps(model, opt, batches: dict[str, dict]) -> float:
    """The same rows as one step per adapter, each with only that adapter active."""
    from plugtune.adapters.layers import set_active_adapters

    start = time.perf_counter()
    for name, batch in batches.items():
        set_active_adapters(model, [name])
        opt.zero_grad(set_to_none=True)  # the other adapters get no gradient, so AdamW skips them
        lm_loss(model, batch).backward()
        opt.step()
    set_active_adapters(model, [])
    return time.perf_counter() - start


def bench_training(model, tokenizer, names: list[str], rows: int, length: int, steps: int) -> dict:
    """Median seconds of one mixed step (all adapters, rows x adapters rows) and of one step per
    adapter on its own rows, alternated after one warm-up of each; AdamW over every adapter."""
    from plugtune.adapters.layers import adapter_state, mark_trainable
    from plugtune.data import collate

    per_skill = training_rows(tokenizer, rows, length)
    items = dict(zip(names, per_skill.values()))
    pad = tokenizer.pad_token_id
    mixed_items = [items[n][i] for i in range(rows) for n in names]  # interleaved: a0 a1 a2 a3 a0 ...
    mixed_names = [n for _ in range(rows) for n in names]
    mixed_batch = collate(mixed_items, pad)
    single = {n: collate(items[n], pad) for n in names}
    mark_trainable(model, names)
    model.train()
    opt = torch.optim.AdamW([p for n in names for p in adapter_state(model, n).values()], lr=1e-4)
    mixed_step(model, opt, mixed_batch, mixed_names)  # warm-up
    sequential_steps(model, opt, single)
    mixed_s, seq_s = [], []
    for k in range(steps):  # alternate, so drift hits both alike
        if k % 2 == 0:
            mixed_s.append(mixed_step(model, opt, mixed_batch, mixed_names))
            seq_s.append(sequential_steps(model, opt, single))
        else:
            seq_s.append(sequential_steps(model, opt, single))
            mixed_s.append(mixed_step(model, opt, mixed_batch, mixed_names))
    model.eval()
    mark_trainable(model, [])
    mixed_med, seq_med = statistics.median(mixed_s), statistics.median(seq_s)
    lengths = [len(it.input_ids) for it in mixed_items]
    return {"adapters": names, "skills": list(per_skill)[:len(names)], "rows_per_adapter": rows, "row_tokens": length,
            "row_tokens_mean": sum(lengths) / len(lengths),
            "mixed_batch_shape": list(mixed_batch["input_ids"].shape),
            "supervised_tokens": int((mixed_batch["labels"][:, 1:] != -100).sum()),
            "mixed_step_s": mixed_s, "sequential_steps_s": seq_s,
            "mixed_step_s_median": mixed_med, "sequential_steps_s_median": seq_med,
            "sequential_over_mixed": seq_med / mixed_med}


# The run -------------------------------------------------------------------------------------
def time_cases(cases: dict, repeats: int) -> tuple[dict, dict, dict, float]:
    """Warm up every case once (its tokens are the ones compared), then `repeats` rounds of every
    case in the given order (the base first). Returns tokens, seconds and the peak RSS above the
    RSS before each call, per case, and the process peak RSS seen so far (MB)."""
    outputs = {case: run() for case, run in cases.items()}
    seconds, extra_peak = {c: [] for c in cases}, {c: [] for c in cases}
    peak = 0.0
    for _ in range(repeats):
        for case in cases:
            before = rss_mb()
            peak = max(peak, rss_mb("VmHWM") or 0.0)
            reset = reset_peak_rss()
            start = time.perf_counter()
            cases[case]()
            seconds[case].append(time.perf_counter() - start)
            if reset and before is not None:
                extra_peak[case].append(rss_mb("VmHWM") - before)
    return outputs, seconds, extra_peak, max(peak, rss_mb("VmHWM") or 0.0)


def agreement(a: list[list[int]], b: list[list[int]]) -> dict:
    """How many rows decode to identical tokens, and the fraction of equal tokens position by position."""
    same_rows = sum(x == y for x, y in zip(a, b))
    pairs = [(s, t) for x, y in zip(a, b) for s, t in zip(x, y)]
    return {"rows_identical": same_rows, "rows": len(a),
            "token_fraction_equal": sum(s == t for s, t in pairs) / max(1, len(pairs))}


def print_table(result: dict) -> None:
    st, agree = result["settings"], result["agreement"]
    lengths = st["prompt_lengths"]
    print(f"\n{st['model']}: {st['prompts']} prompts of {min(lengths)}-{max(lengths)} tokens, {st['new_tokens']} new "
          f"tokens each, greedy, {st['threads']} threads, median of {st['repeats']} (prefill included)")
    print(f"{'case':<20} {'tok/s':>8} {'x base':>7} {'s/run':>7} {'+RSS MB':>8}  notes (x base: median of the "
          "per-repeat ratios)")
    for r in result["rows"]:
        notes = []
        if "distinct_adapters" in r:
            notes.append(f"adapters in the batch: {r['distinct_adapters']}")
        key = f"peft vs plugtune mixed {r['case'].split()[-1]}"
        if r["case"].startswith("peft"):
            notes.append(f"same tokens as plugtune: {agree[key]['rows_identical']}/{agree[key]['rows']} rows")
        if r["case"] != "base":
            notes.append(f"{r['rows_differing_from_base']}/{st['prompts']} rows differ from base")
            notes.append("per repeat " + " ".join(f"{x:.2f}" for x in r["ratio_to_base_per_repeat"]))
        extra = f"{r['extra_peak_rss_mb']:.0f}" if r["extra_peak_rss_mb"] is not None else "-"
        print(f"{r['case']:<20} {r['tokens_per_s']:>8.1f} {r['ratio_to_base']:>6.2f}x {r['median_s']:>7.2f} "
              f"{extra:>8}  {'; '.join(notes)}")
    print("+RSS MB: peak resident memory during one call above the memory before it")
    top = next(r for r in result["rows"] if r["case"] == f"plugtune mixed {st['adapters']}")
    print(f"target (issue 17: 16 adapters at >= 0.90x base), plugtune mixed {st['adapters']}: "
          f"{top['ratio_to_base']:.2f}x ({'met' if top['ratio_to_base'] >= 0.9 else 'not met'})")
    mem = result["memory"]
    print(f"memory: base {mem['base_params_mb']:.1f} MB + {st['adapters']} adapters x "
          f"{mem['adapter_params_mb_each']:.2f} MB = pool {mem['pool_params_mb']:.1f} MB of parameters; peak RSS {mem['peak_rss_mb']:.0f} MB "
          "(three copies of the base: plain, plugtune, PEFT)")
    tr = result["training"]
    if tr:
        n = len(tr["adapters"])
        print(f"multi-task training, {n} adapters x {tr['rows_per_adapter']} rows of <= {tr['row_tokens']} tokens: "
              f"one mixed step {tr['mixed_step_s_median']:.3f} s, {n} single-adapter steps "
              f"{tr['sequential_steps_s_median']:.3f} s (sequential / mixed {tr['sequential_over_mixed']:.2f}x)")


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--prompts", type=int, default=16)
    ap.add_argument("--prompt-tokens", type=int, default=32, help="target length of each templated prompt")
    ap.add_argument("--adapters", type=int, default=16, help="largest adapter count (at most --prompts)")
    ap.add_argument("--r", type=int, default=8)
    ap.add_argument("--delta", type=float, default=0.1, help="||sBA|| / ||W|| of every adapted weight (random B)")
    ap.add_argument("--train-rows", type=int, default=4, help="rows per adapter in the training batch")
    ap.add_argument("--train-tokens", type=int, default=64, help="tokens per training row")
    ap.add_argument("--train-steps", type=int, default=3, help="timed steps of each training mode (0: skip)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "mixed_adapters.json"))
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)

    import peft
    import transformers
    from transformers.utils import logging as hf_logging

    from plugtune.adapters.layers import adapter_state, base_parameters, merge_adapters, set_active_adapters
    from plugtune.adapters.layers import unmerge_adapters
    from plugtune.inference.generate import GenerationConfig, generate_ids
    from plugtune.models.loading import load_base

    hf_logging.set_verbosity_error()
    load_avg_before, rss_start = os.getloadavg()[0], rss_mb()
    base = load_base(args.model, device="cpu")
    tok, pad = base.tokenizer, base.tokenizer.pad_token_id
    ours = load_base(args.model, device="cpu").model
    theirs = load_base(args.model, device="cpu").model
    for m in (base.model, ours, theirs):
        m.eval()

    n_adapters = min(args.adapters, args.prompts)
    tmp = tempfile.TemporaryDirectory()
    dirs = make_adapters(ours, n_adapters, args.r, args.delta, args.seed, Path(tmp.name))
    names = [d.name for d in dirs]
    with warnings.catch_warnings():  # PEFT asks transformers' deprecated is_gradient_checkpointing
        warnings.simplefilter("ignore", FutureWarning)
        peft_model = load_peft(theirs, dirs)
    prompts = chat_prompts(tok, args.prompts, args.prompt_tokens)
    cfg = GenerationConfig(max_new_tokens=args.new_tokens)
    counts = sorted({1, min(4, n_adapters), n_adapters})
    assign = {k: [names[i % k] for i in range(args.prompts)] for k in counts}  # round-robin over rows

    def merged():
        set_active_adapters(ours, [names[0]])
        merge_adapters(ours, [names[0]])
        try:
            return generate_ids(ours, prompts, [], pad, cfg)
        finally:
            unmerge_adapters(ours)
            set_active_adapters(ours, [])

    # stop_ids=[]: no token ends a row, so every case decodes exactly new_tokens per prompt.
    cases = {"base": lambda: generate_ids(base.model, prompts, [], pad, cfg)}
    for k in counts:
        cases[f"plugtune mixed {k}"] = lambda k=k: generate_ids(ours, prompts, [], pad, cfg, adapter_names=assign[k])
    for k in counts:
        cases[f"peft mixed {k}"] = lambda k=k: peft_generate(peft_model, prompts, assign[k], args.new_tokens, pad)
    cases["plugtune merged 1"] = merged  # a0 folded into the weights; every row gets it
    outputs, seconds, extra_peak, peak = time_cases(cases, args.repeats)

    n_tokens = args.prompts * args.new_tokens
    base_tps = n_tokens / statistics.median(seconds["base"])
    rows = []
    for case in cases:
        med = statistics.median(seconds[case])
        per_repeat = [b / s for s, b in zip(seconds[case], seconds["base"])]  # same repeat: drift cancels
        row = {"case": case, "tokens_per_s": n_tokens / med, "ratio_to_base": statistics.median(per_repeat),
               "ratio_to_base_per_repeat": per_repeat, "ratio_of_medians": n_tokens / med / base_tps,
               "median_s": med, "seconds": seconds[case],
               "extra_peak_rss_mb": max(extra_peak[case]) if extra_peak[case] else None,
               "new_tokens_per_row": sorted({len(o) for o in outputs[case]}),
               "rows_differing_from_base": sum(a != b for a, b in zip(outputs[case], outputs["base"]))}
        if " mixed " in case:
            row["distinct_adapters"] = len(set(assign[int(case.split()[-1])]))
        rows.append(row)
    agree = {f"peft vs plugtune mixed {k}": agreement(outputs[f"peft mixed {k}"], outputs[f"plugtune mixed {k}"])
             for k in counts}
    agree["plugtune merged 1 vs mixed 1"] = agreement(outputs["plugtune merged 1"], outputs["plugtune mixed 1"])
    tokens_agree = all(a["rows_identical"] == a["rows"] for k, a in agree.items() if k.startswith("peft"))

    base_mb = param_mb(base_parameters(ours).values())
    adapter_mb = [param_mb(adapter_state(ours, n).values()) for n in names]
    memory = {"base_params_mb": base_mb, "adapter_params_mb_each": adapter_mb[0],
              "adapters_params_mb_all": sum(adapter_mb), "pool_params_mb": base_mb + sum(adapter_mb),
              "rss_before_loading_mb": rss_start, "rss_after_generation_mb": rss_mb()}

    training = None
    if args.train_steps > 0:  # after generation: it changes adapters a0..a3
        training = bench_training(ours, tok, names[:4], args.train_rows, args.train_tokens, args.train_steps)
    # ru_maxrss (KiB on Linux) only covers the time since the last per-case reset: keep the larger.
    memory["peak_rss_mb"] = max(peak, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    tmp.cleanup()

    result = {
        "settings": {"model": args.model, "threads": args.threads, "repeats": args.repeats, "prompts": args.prompts,
                     "prompt_tokens_target": args.prompt_tokens, "prompt_lengths": [len(p) for p in prompts],
                     "new_tokens": args.new_tokens, "adapters": n_adapters, "adapter_counts": counts,
                     "lora": {"r": args.r, "alpha": 2 * args.r, "target_modules": TARGETS,
                              "delta_over_weight_norm": args.delta},
                     "seed": args.seed, "tokens_per_s": "prompts x new tokens / wall time of one generate call, "
                     "prefill included; median over repeats after one warm-up; x base: median of the ratios taken within "
                     "each repeat (cases in a fixed order, base first)"},
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__, "peft": peft.__version__,
                     "python": platform.python_version()},
        "machine": {"processor": platform.processor(), "cpu_model": cpu_model(), "machine": platform.machine(), "cpu_count": os.cpu_count(),
                    "load_avg_1m_before": load_avg_before, "load_avg_1m_after": os.getloadavg()[0]},
        "rows": rows, "tokens_agree": tokens_agree, "agreement": agree, "memory": memory, "training": training,
        "command": " ".join(["python bench/mixed_adapters.py", *(argv if argv is not None else sys.argv[1:])]),
    }
    print_table(result)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
