"""plugtune CLI: train | generate | chat | eval | demo | merge | adapters | serve | compare.

Every command is a thin shell over a plain Python function, so notebooks get the same behaviour.
Errors from bad input (config, data, model paths, adapters) print one clear line and exit 2.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def _add_model_args(p: argparse.ArgumentParser, pool: bool = True) -> None:
    p.add_argument("--model", default="smollm2-135m", help="built-in name or local model directory")
    if pool:
        p.add_argument("--adapter", action="append", default=[], metavar="[NAME=]DIR",
                       help="an adapter directory (plugtune or PEFT format), optionally named; repeat for a pool")
        p.add_argument("--use", default=None, metavar="NAME[,NAME]|auto|base",
                       help="which adapter answers: a name, several stacked (a,b), 'auto' (the router) or 'base'; "
                            "default: the only adapter given")
        p.add_argument("--router", default=None, help="router directory (for --use auto; default: DIR/router "
                                                      "beside the adapters when present)")
    else:
        p.add_argument("--adapter", default=None, help="adapter directory (plugtune or PEFT format)")
    p.add_argument("--force", action="store_true", help="load an adapter even if it was made for another base")
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default="auto")
    p.add_argument("--quantize", default="none", metavar="none|int8|int4|nf4",
                   help="store the base's linear weights in 8 or 4 bits (int8/int4: CPU or CUDA; nf4: CUDA + "
                        "bitsandbytes); adapters stay full precision")


def parse_adapter_args(values: list[str]) -> dict[str, str]:
    """['dates=runs/a/adapter', 'runs/b'] -> {'dates': 'runs/a/adapter', 'default': 'runs/b'}."""
    out: dict[str, str] = {}
    for value in values:
        name, sep, path = value.partition("=")
        name, path = (name, path) if sep else ("default", value)
        if not name or not path:
            raise ValueError(f"--adapter {value!r}: expected NAME=DIR or DIR")
        if name in out:
            raise ValueError(f"--adapter: the name '{name}' is given twice; give each adapter its own NAME=DIR")
        out[name] = path
    return out


def _load_pool(args):
    """The base with every --adapter, the router if any, and what --use says (None: per-row 'auto')."""
    from pathlib import Path

    from plugtune.api import load

    adapters = parse_adapter_args(args.adapter)
    router = args.router
    if router is None and args.use == "auto":  # a multi-task run writes its router beside the adapters
        candidates = {Path(p).parent / "router" for p in adapters.values()}
        router = next((str(c) for c in candidates if (c / "router.json").is_file()), None)
        if router is None:
            raise ValueError("--use auto needs a router: pass --router DIR (multi-task runs write one to "
                             "OUTPUT/adapters/router)")
    use = None if args.use in (None, "auto", "base") else args.use.split(",")
    lm = load(args.model, adapters, args.dtype, args.device, args.force, use=use, router=router,
              quantize=args.quantize)
    if args.use == "base":
        lm.use(None)
    return lm, ("auto" if args.use == "auto" else None)


def _add_gen_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=None)


def _gen_config(args):
    from plugtune.inference.generate import GenerationConfig

    return GenerationConfig(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                            top_p=args.top_p, seed=args.seed)


def cmd_train(args) -> None:
    from plugtune.config import load_run_config
    from plugtune.training.pipeline import is_pipeline, run_pipeline
    from plugtune.training.run import train

    if is_pipeline(args.config):  # a YAML with `stages:`
        report = run_pipeline(args.config, args.overrides)
        print((Path(report.out_dir) / "pipeline_summary.md").read_text())
        return
    cfg = load_run_config(args.config, args.overrides)
    report = train(cfg)
    print(json.dumps({k: v for k, v in vars(report).items()}, indent=2))


def cmd_sample(args) -> None:
    from dataclasses import asdict

    from plugtune.adapters import load_adapter
    from plugtune.inference.rejection_sampling import SampleConfig, sample_and_verify
    from plugtune.models.loading import load_base
    from plugtune.training.engine.speed import set_threads

    cfg = SampleConfig(prompts=args.prompts, k=args.k, max_new_tokens=args.max_new_tokens,
                       temperature=args.temperature, top_p=args.top_p, top_k=args.top_k, seed=args.seed,
                       verifier=args.verifier, pass_score=args.pass_score, min_margin=args.min_margin,
                       pairs=not args.no_pairs, repair=args.repair, limit=args.limit, batch_size=args.batch_size)
    cfg.check()  # before the model loads
    set_threads(args.threads)
    loaded = load_base(args.model, args.dtype, args.device)
    if args.adapter:
        load_adapter(loaded.model, args.adapter, "policy")
    report = sample_and_verify(loaded.model, loaded.tokenizer, cfg, args.out, adapter="policy" if args.adapter else None)
    print(json.dumps({**asdict(report), "pass_rate": round(report.pass_rate, 4)}, indent=2))


def cmd_generate(args) -> None:
    prompts = list(args.prompt or [])
    if args.prompts_file:
        from plugtune.data.readers import text_lines

        prompts += [line.rstrip("\r\n") for _, line in text_lines(args.prompts_file) if line.strip()]
    if not prompts:
        raise ValueError("give at least one --prompt or a --prompts-file")
    lm, per_row = _load_pool(args)
    names = lm.resolve(prompts, per_row)
    outputs = lm.generate(prompts, names, _gen_config(args), chat=not args.raw)
    for k, (prompt, out) in enumerate(zip(prompts, outputs)):
        if args.json:
            record = {"prompt": prompt, "output": out, "adapter": names[k] if names else ",".join(lm.active) or None}
            print(json.dumps(record, ensure_ascii=False))
        else:
            print(out)


def cmd_chat(args) -> None:
    lm, per_row = _load_pool(args)
    history: list[dict] = [{"role": "system", "content": args.system}] if args.system else []
    print("plugtune chat — empty line or /exit quits, /reset clears the conversation")
    for line in sys.stdin if not sys.stdin.isatty() else iter(lambda: input("you> "), None):
        text = line.strip()
        if not text or text == "/exit":
            break
        if text == "/reset":
            history = history[:1] if args.system else []
            continue
        history.append({"role": "user", "content": text})
        names = lm.resolve([history], per_row)
        reply = lm.generate([history], names, _gen_config(args))[0]
        history.append({"role": "assistant", "content": reply})
        who = f" [{names[0] or 'base'}]" if names else ""
        print(f"assistant{who}> {reply}", flush=True)


def cmd_eval_instructions(args) -> None:
    """`plugtune eval --instructions [test|unseen|FILE]`: greedy answers scored as IFEval does."""
    from plugtune.evaluation import evaluate_instructions, format_instruction_scores
    from plugtune.tasks.instructions.prompts import load_records

    records = load_records(args.instructions)
    records = records[: args.limit] if args.limit else records
    lm, per_row = _load_pool(args)
    result = evaluate_instructions(lm, records, per_row, max_new_tokens=args.max_new_tokens)
    adapter = "auto" if per_row else ",".join(lm.active) or "base"
    print(f"instructions: {args.instructions}; model {args.model}; adapter {adapter}; greedy, "
          f"{args.max_new_tokens} new tokens")
    print(format_instruction_scores(result))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps({"instructions": str(args.instructions), "model": args.model,
                                              "adapter": adapter, **result}, indent=2, ensure_ascii=False))


def cmd_eval(args) -> None:
    if args.instructions:
        cmd_eval_instructions(args)
        return
    if not args.data:
        raise ValueError("give --data FILE (or --instructions [test|unseen|FILE.jsonl])")
    if args.reward_model:  # the data are preference pairs; report the reward model's pairwise accuracy
        from plugtune.evaluation import evaluate_reward_model

        print(json.dumps(evaluate_reward_model(args.reward_model, args.data, args.model, args.limit, args.max_length,
                                               args.dtype, args.device, args.force), indent=2))
        return
    from plugtune.data import load_examples
    from plugtune.evaluation import exact_match, loss_and_perplexity

    examples = load_examples(args.data, args.format)
    if args.limit:
        examples = examples[: args.limit]
    lm, per_row = _load_pool(args)
    names = lm.resolve([ex.prompt_messages() for ex in examples], per_row)
    result = {"data": args.data, "adapter": "auto" if names else ",".join(lm.active) or "base",
              **loss_and_perplexity(lm.model, lm.tokenizer, examples, args.max_length, adapter_names=names)}
    if names:
        result["routed"] = {str(k): names.count(k) for k in dict.fromkeys(names)}
    if args.exact_match:
        em = exact_match(lm.model, lm.tokenizer, examples, _gen_config(args), adapter_names=names)
        result.update(exact_match=em.accuracy, correct=em.correct, total=em.total, generate_seconds=round(em.seconds, 2))
        if args.show:
            for s in em.samples[: args.show]:
                print(json.dumps(s, ensure_ascii=False))
    print(json.dumps(result, indent=2))


def cmd_demo(args) -> None:
    if args.align:
        from plugtune.demos.align import run_align_demo

        run_align_demo(model=args.model, out=args.out if args.out != "runs/demo" else "runs/align")
        return
    if args.skills:
        from plugtune.demos.skills import run_skills_demo

        run_skills_demo([s.strip() for s in args.skills.split(",") if s.strip()], model=args.model,
                        out=args.out if args.out != "runs/demo" else "runs/skills", steps=args.steps,
                        n_test=args.n_test if args.n_test != 100 else 50, overrides=args.overrides)
        return
    from plugtune.demos.skill import run_demo

    run_demo(skill=args.skill, model=args.model, out=args.out, steps=args.steps, n_test=args.n_test,
             overrides=args.overrides)


def cmd_merge(args) -> None:
    from plugtune.adapters.merge import merge_and_save
    from plugtune.api import load

    lm = load(args.model, args.adapter, "float32", "cpu", args.force, quantize=args.quantize)  # quantized: refused
    out = merge_and_save(lm.model, lm.tokenizer, args.out)
    print(f"merged model written to {out} (loads with transformers.AutoModelForCausalLM.from_pretrained)")


def cmd_export(args) -> None:
    from plugtune.export import export_gguf

    r = export_gguf(args.out, model=args.model, adapter=args.adapter, quant=args.quant, adapter_only=args.adapter_only,
                    ollama=args.ollama, overwrite=args.overwrite, force=args.force)
    what = "LoRA adapter (load with llama.cpp --lora on the base's GGUF)" if r.kind == "lora" else "model"
    print(f"{what} written to {r.path} ({r.quant}, {r.path.stat().st_size / 2**20:.1f} MiB, {r.seconds:.1f} s)")
    if r.modelfile is not None:
        print(f"Ollama Modelfile written to {r.modelfile} (ollama create NAME -f {r.modelfile})")


def cmd_adapters_info(args) -> None:
    import json as _json

    from plugtune.adapters.report import method_costs, format_costs
    from plugtune.api import load

    lm = load(args.model, None, "float32", args.device)
    rows = method_costs(lm.model, batch=args.batch, seq_len=args.seq_len, repeats=args.repeats)
    print(format_costs(rows, f"adapter methods on {args.model} (forward of {args.batch}x{args.seq_len} tokens, "
                             f"median of {args.repeats})"))
    if args.json:
        with open(args.json, "w") as f:
            _json.dump([vars(r) for r in rows], f, indent=2)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="plugtune", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="train from a YAML config (full fine-tuning or an adapter), or run a pipeline "
                                     "of stages (a YAML with `stages:`)")
    p.add_argument("config", help="YAML file, or the name of a shipped config (demo_lora, lora_sft, full_finetune)")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. training.lr=1e-4 adapter.r=16")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("sample", help="rejection sampling: k answers per prompt from a model (or adapter), scored by "
                                      "a verifier; writes SFT data (best passing) and preference pairs (best vs worst)")
    p.add_argument("--model", default="smollm2-135m", help="built-in name or local model directory")
    p.add_argument("--adapter", default="", help="sample from this adapter (a directory); default: the base")
    p.add_argument("--prompts", required=True, help="prompt records: JSONL with 'prompt' (+ the verifier's fields)")
    p.add_argument("--out", required=True, help="directory for sft.jsonl, pairs.jsonl, samples.jsonl, summary.json")
    p.add_argument("--k", type=int, default=4, help="answers per prompt")
    p.add_argument("--verifier", default="instructions",
                   help="instructions | package.module:function | reward_model:DIR")
    p.add_argument("--pass-score", type=float, default=1.0, help="an answer passes when its score is at least this")
    p.add_argument("--min-margin", type=float, default=0.1, help="a pair needs best - worst >= this")
    p.add_argument("--repair", action="store_true", help="instruction prompts: repair failing answers into "
                   "compliant SFT examples (kept only if the checker passes them)")
    p.add_argument("--no-pairs", action="store_true", help="write no preference pairs (allows --k 1)")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--top-p", type=float, default=0.95)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--limit", type=int, default=0, help="first N prompts only")
    p.add_argument("--batch-size", type=int, default=16, help="prompts per generation batch (each with its k samples)")
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--dtype", default="auto")
    p.add_argument("--device", default="auto")
    p.set_defaults(func=cmd_sample)

    p = sub.add_parser("generate", help="generate replies to prompts")
    _add_model_args(p)
    _add_gen_args(p)
    p.add_argument("--prompt", action="append", help="a user message (repeatable)")
    p.add_argument("--prompts-file", help="one user message per line")
    p.add_argument("--raw", action="store_true", help="plain continuation, no chat template")
    p.add_argument("--json", action="store_true", help="print one JSON object per prompt")
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("chat", help="interactive multi-turn chat (reads stdin)")
    _add_model_args(p)
    _add_gen_args(p)
    p.add_argument("--system", default=None, help="system prompt")
    p.set_defaults(func=cmd_chat)

    p = sub.add_parser("eval", help="loss/perplexity on a dataset, optionally exact-match accuracy; or instruction "
                                    "following (--instructions)")
    _add_model_args(p)
    _add_gen_args(p)
    p.add_argument("--data", default=None, help="JSONL/JSON file (or plugtune:skills/<skill>_test.jsonl)")
    p.add_argument("--instructions", nargs="?", const="test", default=None, metavar="test|unseen|FILE.jsonl",
                   help="instead of --data: greedy answers to verifiable-instruction prompts (the shipped held-out "
                        "'test' split, the 'unseen' constraint types, or a JSONL of records), scored as IFEval does: "
                        "prompt/instruction-level strict and loose accuracy and per constraint type")
    p.add_argument("--out", default=None, help="--instructions: write the result (scores, answers) to this JSON file")
    p.add_argument("--format", default="auto")
    p.add_argument("--limit", type=int, default=0)
    p.add_argument("--max-length", type=int, default=512)
    p.add_argument("--exact-match", action="store_true", help="also generate answers and score exact match")
    p.add_argument("--show", type=int, default=0, help="print N sample generations")
    p.add_argument("--reward-model", default=None, metavar="DIR",
                   help="a reward model (OUTPUT/reward_model): --data holds preference pairs; reports pairwise "
                        "accuracy, mean margin and count (--model: the base of an adapter reward model)")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("demo", help="before/after table: teach the default model a skill with LoRA")
    p.add_argument("--skill", default="dates")
    p.add_argument("--align", action="store_true", help="instruction following: base vs DPO, GRPO and PPO adapters "
                                                         "on verifiable-instruction prompts")
    p.add_argument("--skills", default=None, help="two or more skills, e.g. dates,prices: train one adapter per skill "
                                                  "together, serve them in mixed batches, route automatically")
    p.add_argument("--model", default=None, help="override the demo's model (default smollm2-135m)")
    p.add_argument("--out", default="runs/demo")
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--n-test", type=int, default=100)
    p.add_argument("overrides", nargs="*", help="dotted overrides of the demo config")
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("merge", help="fold an adapter (LoRA, DoRA, IA3) into the base and save a plain model")
    _add_model_args(p, pool=False)
    p.add_argument("--out", required=True, help="output model directory")
    p.set_defaults(func=cmd_merge)

    p = sub.add_parser("export", help="write a model (an adapter merged in) or a LoRA adapter as GGUF for llama.cpp "
                                      "and Ollama")
    p.add_argument("--format", default="gguf", choices=["gguf"])
    p.add_argument("--out", required=True, help="the .gguf file to write")
    p.add_argument("--model", default="smollm2-135m", help="built-in name or local model directory (the base)")
    p.add_argument("--adapter", default=None, help="adapter directory, merged into the model (or, with "
                                                   "--adapter-only, written alone)")
    p.add_argument("--quant", default=None, choices=["f32", "f16", "q8_0", "q4_0"],
                   help="tensor type (default f16; f32 with --adapter-only, which takes f32 or f16)")
    p.add_argument("--adapter-only", action="store_true", help="write the LoRA adapter alone as a GGUF LoRA file "
                                                              "(llama.cpp --lora on the base's GGUF)")
    p.add_argument("--ollama", action="store_true", help="also write OUT's stem + .Modelfile for `ollama create`")
    p.add_argument("--overwrite", action="store_true", help="replace existing output files")
    p.add_argument("--force", action="store_true", help="load an adapter even if it was made for another base")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("adapters", help="adapter tools: info (costs of every method), combine (arithmetic), "
                                         "check (vLLM compatibility)")
    adapters_sub = p.add_subparsers(dest="adapters_command", required=True)
    p = adapters_sub.add_parser("info", help="trainable parameters, %% of the base, latency unmerged vs merged")
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--device", default="auto")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=64)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--json", default=None, help="also write the rows to this JSON file")
    p.set_defaults(func=cmd_adapters_info)
    from plugtune.adapters.arithmetic import add_combine_parser
    from plugtune.serve.cli import add_check_parser, add_serve_parser

    add_combine_parser(adapters_sub)
    add_check_parser(adapters_sub)
    add_serve_parser(sub)
    from plugtune.compare.runner import add_compare_parser

    add_compare_parser(sub)
    from plugtune.ui.cli import add_ui_parser  # plugtune ui (issue 18)

    add_ui_parser(sub)

    return parser


def main(argv: list[str] | None = None) -> int:
    """Run one command. Bad input (config, data, model or adapter files) prints one line and returns 2;
    PLUGTUNE_DEBUG=1 re-raises it with its traceback."""
    import os

    from plugtune.adapters.io import AdapterFileError, AdapterMismatchError
    from plugtune.config import ConfigError
    from plugtune.data.formats import DataError
    from plugtune.training.engine.loop import NonFiniteLossError

    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except (ConfigError, DataError, AdapterMismatchError, AdapterFileError, NonFiniteLossError, OSError, ValueError,
            KeyError) as exc:  # OSError: a missing file, a directory given for a file, no permission, a full disk
        if os.environ.get("PLUGTUNE_DEBUG"):
            raise
        message = exc.args[0] if isinstance(exc, KeyError) and exc.args else exc
        print(f"plugtune {args.command}: error: {' '.join(str(message).split())}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
