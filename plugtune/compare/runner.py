"""`plugtune compare`: the same base, the same data, one budget, several ways to customise it.

    plugtune compare quick [--seeds N] [--executor local|ray [--address HOST:PORT]] [budget.max_steps=8]

The usual summary says it in words (full fine-tuning: high cost, large data, full control; adapters:
low, small, modular; instruction tuning: medium, medium, behaviour). This measures it on a task:
for every method (full fine-tuning, LoRA, DoRA, IA3, Houlsby/Pfeiffer, prompt tuning, ... and an
optional SFT -> DPO row) it trains with `train()` and records trainable parameters, peak memory, wall
time and throughput, checkpoint size, held-out loss and exact match, retention (loss on general text
before and after), and, for the methods chosen for the data sweep, quality against the number of
distinct training examples. Every run is a (method, data size, seed) job (compare/jobs.py) handed to an
executor (compare/executors.py: local, or Ray tasks); compare/results.py turns the per-item outcomes
into intervals and tests, compare/guide.py into the "which do I pick" guide, and compare/report.py
writes report.md, report.json and the plots.

Peak memory. A process's RSS high-water mark (ru_maxrss) never goes down, so the runs of one process
cannot be told apart. With `isolate: true` (the default) each main run trains and evaluates in its own
process (`python -m plugtune.compare.jobs --worker JOB`): its peak is its own, and the increase over the
high-water mark right after loading the base isolates what training adds (gradients, optimizer state,
activations). With the local executor the data-sweep runs stay in this process and report no memory;
Ray runs every run in a worker process of its own. On CUDA the same two marks
come from torch.cuda.max_memory_allocated.
"""
from __future__ import annotations

import copy
import json
import os
import shlex
import shutil
import time
from dataclasses import asdict, replace
from pathlib import Path

import torch

from plugtune.compare.config import (CompareConfig, MethodSpec, check_budget_fits, dpo_run_config, family_of,
                                     load_compare_config, method_run_config, slug)
from plugtune.compare.executors import EXECUTORS, Run, execute, make_executor
from plugtune.compare.guide import pick_guide
from plugtune.compare.jobs import heldout_examples
from plugtune.compare.report import machine_info, print_summary, write_report
from plugtune.compare.results import analyse, dpo_row, method_row, sweep_point, train_records
from plugtune.config import RunConfig
from plugtune.data.formats import read_records
from plugtune.models.loading import LoadedModel, load_base
from plugtune.schema import ConfigError, from_dict, to_dict
from plugtune.training.run import train


# ---------------------------------------------------------------- jobs and runs


def _job(cfg: CompareConfig, kind: str, name: str, run, base_run, threads: int, with_retention: bool) -> dict:
    d = base_run.data
    return {"kind": kind, "name": name, "run_config": to_dict(run), "model": base_run.model.name,
            "dtype": base_run.model.dtype, "device": base_run.model.device, "heldout": cfg.eval.data or d.eval,
            "format": d.format, "system_prompt": d.system_prompt, "max_length": d.max_length, "eval": asdict(cfg.eval),
            "retention": asdict(cfg.retention), "with_retention": with_retention, "threads": threads}


def _subset_file(train_file: str, n: int, out: Path) -> tuple[str, int]:
    """The first n records of the training file, as JSONL; (path, records). n >= all: the file itself."""
    records = read_records(train_file)
    if n >= len(records):
        return train_file, len(records)
    path = out / "data" / f"train_first{n}.jsonl"
    path.parent.mkdir(parents=True, exist_ok=True)
    text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for _, r in records[:n])
    if not path.is_file() or path.read_text() != text:  # unchanged: a resumed compare's jobs stay the same
        path.write_text(text)
    return str(path), n


def _tidy(run_dir: Path, keep: bool, artifact: str | None = None) -> None:
    if keep:
        return
    shutil.rmtree(run_dir / "checkpoints", ignore_errors=True)
    if artifact:
        shutil.rmtree(artifact, ignore_errors=True)


def _seed_dir(path: Path, seed: int) -> Path:
    return path if seed == 0 else path.with_name(f"{path.name}-s{seed}")


class _Plan:
    """The runs of one comparison: keys, jobs and directories, built before anything runs."""

    def __init__(self, cfg: CompareConfig, base_run: RunConfig, out: Path, threads: int, gpus: float,
                 steps_of: dict[str, int], sizes: list[int], n_train: int):
        self.cfg, self.base_run, self.out, self.threads, self.gpus = cfg, base_run, out, threads, gpus
        self.steps_of, self.sizes, self.n_train = steps_of, sizes, n_train

    def _run(self, key: str, job: dict, run_dir: Path, isolate: bool) -> Run:
        return Run(key, job, run_dir, isolate, cpus=float(self.threads), gpus=self.gpus)

    def job(self, kind: str, name: str, run, with_retention: bool = True) -> dict:
        return _job(self.cfg, kind, name, run, self.base_run, self.threads, with_retention)

    def base(self) -> Run:
        return self._run("base", self.job("base", "base", self.base_run), self.out / "runs" / "_base", False)

    def main(self, spec: MethodSpec, seed: int) -> Run:
        run_dir = _seed_dir(self.out / "runs" / slug(spec.name), seed)
        run = method_run_config(self.cfg, spec, self.steps_of[spec.name], run_dir, seed_offset=seed)
        return self._run(f"main/{slug(spec.name)}/seed{seed}", self.job("sft", spec.name, run), run_dir,
                         self.cfg.isolate)

    def sweep(self, spec: MethodSpec, n: int, seed: int) -> Run | None:
        """A data-sweep run, or None where the point is the main run itself (all examples, same steps)."""
        steps = self.cfg.data_sweep.max_steps or self.steps_of[spec.name]
        if n == self.n_train and steps == self.steps_of[spec.name]:
            return None
        train_file, _ = _subset_file(self.base_run.data.train, n, self.out)
        run_dir = _seed_dir(self.out / "sweep" / f"{slug(spec.name)}-n{n}", seed)
        run = method_run_config(self.cfg, spec, steps, run_dir, train_file, seed_offset=seed)
        job = {**self.job("sft", spec.name, run, with_retention=False), "with_loss": False}
        return self._run(f"sweep/{slug(spec.name)}/n{n}/seed{seed}", job, run_dir, False)

    def dpo(self, sft_result: dict, seed: int) -> Run:
        d = self.cfg.sft_then_dpo
        run_dir = _seed_dir(self.out / "runs" / slug(d.name), seed)
        artifact = sft_result["train"]["artifact"]
        sft_model = None if (Path(artifact) / "adapter_config.json").is_file() else artifact
        run = dpo_run_config(self.cfg, run_dir / "pairs.jsonl", run_dir, sft_model, seed_offset=seed)
        job = {**self.job("dpo", d.name, run), "sft_artifact": artifact, "train_file": self.base_run.data.train,
               "pairs": d.pairs, "rejected": d.rejected}
        return self._run(f"dpo/{slug(d.name)}/seed{seed}", job, run_dir, self.cfg.isolate)


# ---------------------------------------------------------------- the comparison


def run_compare(cfg: CompareConfig, command: str = "", plan_only: bool = False, executor: str = "local",
                address: str | None = None, cpus_per_run: int = 0, max_retries: int = 2) -> dict:
    """Train and evaluate every method (x seeds), the SFT -> DPO row and the data sweep on `executor`;
    write the report. Runs finished by an earlier call with the same settings are kept."""
    base_run = from_dict(RunConfig, cfg.base, where="base")
    n_train = len(read_records(base_run.data.train))
    n_heldout = len(heldout_examples(cfg.eval.data or base_run.data.eval, 10**9, base_run.data.format,
                                     base_run.data.system_prompt))
    check_budget_fits(cfg, n_train, n_heldout)
    if executor not in EXECUTORS:
        raise ConfigError(f"--executor {executor!r} is not one of {', '.join(EXECUTORS)}")
    sizes = sorted({min(n_train, n_train if s == "all" else s) for s in cfg.data_sweep.sizes})
    plan = _plan_lines(cfg, sizes, n_train, executor)
    print("[compare] plan:\n" + "\n".join(f"  {line}" for line in plan))
    if plan_only:
        return {"plan": plan}
    out = Path(cfg.out).resolve()  # absolute: a Ray worker's working directory is not this one
    out.mkdir(parents=True, exist_ok=True)
    t_start, machine = time.perf_counter(), machine_info()
    threads = cpus_per_run or torch.get_num_threads()
    gpus = 1.0 if str(base_run.model.device).startswith("cuda") or (
        base_run.model.device == "auto" and torch.cuda.is_available()) else 0.0

    def load() -> object:
        return load_base(base_run.model.name, base_run.model.dtype, base_run.model.device)

    ex = make_executor(executor, load, address, max_retries)
    try:
        steps_of, per_step_of = _steps(cfg, load, out)
        p = _Plan(cfg, base_run, out, threads, gpus, steps_of, sizes, n_train)
        runs = [p.base()] + [p.main(spec, s) for s in range(cfg.seeds) for spec in cfg.methods]
        sweep_runs = {(name, n, s): p.sweep(_spec(cfg, name), n, s)
                      for name in cfg.data_sweep.methods for n in sizes for s in range(cfg.seeds)}
        results = execute(ex, runs + [r for r in sweep_runs.values() if r is not None])
        dpo_runs = []
        if cfg.sft_then_dpo.after:
            sft = _spec(cfg, cfg.sft_then_dpo.after)
            dpo_runs = [p.dpo(results[p.main(sft, s).key], s) for s in range(cfg.seeds)]
            results.update(execute(ex, dpo_runs))
    finally:
        ex.close()

    base = {"model": base_run.model.name, **results["base"]}
    base.setdefault("retention_loss", None)
    per_seed = []
    for s in range(cfg.seeds):
        for spec in cfg.methods:
            r = p.main(spec, s)
            res = results[r.key]
            per_seed.append(method_row(spec.name, family_of(spec), spec.method, _run_of(r), res, base["params"],
                                       r.run_dir, seed=s))
            _tidy(r.run_dir, cfg.keep_checkpoints)
        for r in dpo_runs[s:s + 1]:
            sft_row = next(x for x in per_seed if x["name"] == cfg.sft_then_dpo.after and x["seed"] == s)
            per_seed.append(dpo_row(cfg.sft_then_dpo, sft_row, _run_of(r), results[r.key], base["params"],
                                    r.run_dir, seed=s))
            _tidy(r.run_dir, cfg.keep_checkpoints)
    sweep = []
    for (name, n, s), r in sweep_runs.items():
        main = next(x for x in per_seed if x["name"] == name and x["seed"] == s)
        if r is None:
            sweep.append(sweep_point(name, n, n_train, main, reused=True, seed=s))
            continue
        spec = _spec(cfg, name)
        row = method_row(name, family_of(spec), spec.method, _run_of(r), results[r.key], base["params"], r.run_dir,
                         seed=s)
        sweep.append(sweep_point(name, n, n_train, row, reused=False, seed=s))
        _tidy(r.run_dir, cfg.keep_checkpoints, results[r.key]["train"]["artifact"])
    analysis = analyse(base, per_seed, sweep, n_train)
    report = {
        "title": cfg.title, "command": command, "settings": asdict(cfg), "machine": machine, "train_examples": n_train,
        "executor": {"name": executor, "address": address, "cpus_per_run": threads, "gpus_per_run": gpus},
        "base": base, "rows": analysis["rows"], "per_seed": per_seed, "sweep": analysis["sweep"],
        "sweep_per_seed": sweep, "tests": analysis["tests"], "separation": analysis["separation"],
        "data_column": analysis["data_column"], "calibration_seconds_per_step": per_step_of,
        "total_seconds": time.perf_counter() - t_start, "load_average_end": list(os.getloadavg()), "out": str(out),
    }
    report["guide"] = pick_guide(report)
    write_report(report, out)
    print_summary(report)
    return report


def _run_of(r: Run) -> RunConfig:
    return from_dict(RunConfig, r.job["run_config"], where="job")


def _spec(cfg: CompareConfig, name: str) -> MethodSpec:
    return next(s for s in cfg.methods if s.name == name)


def _steps(cfg: CompareConfig, load, out: Path) -> tuple[dict[str, int], dict[str, float]]:
    """Each method's steps: the budget's, or, for a budget in seconds, a timed calibration here."""
    if not cfg.budget.seconds:
        return {s.name: cfg.budget.max_steps for s in cfg.methods}, {}
    base = load()
    steps_of, per_step_of = {}, {}
    for spec in cfg.methods:
        steps_of[spec.name], per_step_of[spec.name] = _calibrated_steps(cfg, spec, base, out)
    return steps_of, per_step_of


def _calibrated_steps(cfg: CompareConfig, spec: MethodSpec, base, out: Path) -> tuple[int, float]:
    """Steps that fill budget.seconds: time calibration_steps steps on a copy, the first one not counted."""
    n = cfg.budget.calibration_steps
    run_dir = out / "calibration" / slug(spec.name)
    train(method_run_config(cfg, spec, n, run_dir),
          LoadedModel(copy.deepcopy(base.model), base.tokenizer, base.path, base.name))
    elapsed = [r["elapsed_s"] for r in train_records(run_dir)]
    per_step = (elapsed[-1] - elapsed[0]) / (len(elapsed) - 1)
    shutil.rmtree(run_dir, ignore_errors=True)
    return max(1, int(cfg.budget.seconds / per_step)), per_step


def _plan_lines(cfg: CompareConfig, sizes: list[int], n_train: int, executor: str) -> list[str]:
    steps = f"{cfg.budget.max_steps} steps" if cfg.budget.max_steps else f"~{cfg.budget.seconds:g} s"
    seeds = f" x {cfg.seeds} seeds" if cfg.seeds > 1 else ""
    lines = [f"{s.name}: {s.method}, {steps} x batch {cfg.budget.batch_size * cfg.budget.grad_accum}{seeds}"
             + (" (+ data sweep)" if s.name in cfg.data_sweep.methods else "") for s in cfg.methods]
    d = cfg.sft_then_dpo
    if d.after:
        lines.append(f"{d.name}: {d.pairs} pairs from '{d.after}', DPO {d.max_steps} steps x {d.batch_size} pairs")
    for name in cfg.data_sweep.methods:
        extra = [n for n in sizes if n != n_train or cfg.data_sweep.max_steps]
        lines.append(f"data sweep {name}: {len(extra)} extra runs on the first {', '.join(map(str, extra))} examples")
    rows = len(cfg.methods) + bool(d.after)
    where = {"local": "each main row in its own process" if cfg.isolate else "all in this process",
             "ray": "each run a Ray task in a worker process of its own"}[executor]
    lines.append(f"evaluation: {cfg.eval.n} held-out examples for the base, {rows} rows and each sweep run; "
                 f"retention: {cfg.retention.source} x {cfg.retention.n} for the base and the rows; {where}")
    return lines


# ---------------------------------------------------------------- CLI


def cmd_compare(args) -> None:
    overrides = list(args.overrides) + ([f"out={args.out}"] if args.out else []) + \
        ([f"seeds={args.seeds}"] if args.seeds else [])
    cfg = load_compare_config(args.config, overrides)
    if args.only:
        cfg = only_methods(cfg, [n.strip() for n in args.only.split(",") if n.strip()])
    extra = (["--out", args.out] if args.out else []) + (["--only", args.only] if args.only else []) + \
        (["--seeds", str(args.seeds)] if args.seeds else []) + \
        (["--executor", args.executor] if args.executor != "local" else []) + \
        (["--address", args.address] if args.address else [])
    command = "plugtune compare " + " ".join(shlex.quote(a) for a in [args.config, *args.overrides, *extra])
    if args.address and args.executor != "ray":
        raise ConfigError("--address is the Ray cluster's address; it needs --executor ray")
    run_compare(cfg, command, plan_only=args.plan, executor=args.executor, address=args.address,
                cpus_per_run=args.cpus_per_run, max_retries=args.max_retries)


def only_methods(cfg: CompareConfig, names: list[str]) -> CompareConfig:
    """A copy with only the named rows (the SFT -> DPO row only when its SFT row stays)."""
    unknown = [n for n in names if n not in {m.name for m in cfg.methods}]
    if unknown:
        raise ConfigError(f"--only: no method named {', '.join(unknown)} (methods: "
                          f"{', '.join(m.name for m in cfg.methods)})")
    sweep = replace(cfg.data_sweep, methods=[m for m in cfg.data_sweep.methods if m in names])
    dpo = cfg.sft_then_dpo if cfg.sft_then_dpo.after in names else replace(cfg.sft_then_dpo, after="")
    return replace(cfg, methods=[m for m in cfg.methods if m.name in names], data_sweep=sweep, sft_then_dpo=dpo)


def add_compare_parser(subparsers) -> None:
    p = subparsers.add_parser("compare", help="train one base with several methods under one budget; write "
                                              "report.md, report.json and plots, with intervals and a pick guide")
    p.add_argument("config", help="a compare YAML file, or a shipped one (quick, arith)")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. budget.max_steps=8 eval.n=50 "
                                                "base.model.name=DIR methods=... isolate=false")
    p.add_argument("--out", default=None, help="output directory (default: the config's `out`); a compare run "
                                               "again into the same directory keeps the runs that finished")
    p.add_argument("--only", default=None, metavar="NAME[,NAME]", help="run only these methods (row names)")
    p.add_argument("--seeds", type=int, default=0, metavar="N",
                   help="repeat every run with N training seeds; figures become mean ± spread (default: the config's)")
    p.add_argument("--executor", default="local", choices=EXECUTORS,
                   help="local: runs one after another here; ray: each run a Ray task (pip install 'plugtune[ray]')")
    p.add_argument("--address", default=None, metavar="HOST:PORT",
                   help="with --executor ray: an existing cluster's address (default: start a local one)")
    p.add_argument("--cpus-per-run", type=int, default=0, metavar="N",
                   help="torch threads (and Ray CPUs) of each run (default: this process's torch threads)")
    p.add_argument("--max-retries", type=int, default=2, help="with --executor ray: retries of a run whose worker "
                                                              "died (default 2)")
    p.add_argument("--plan", action="store_true", help="print the runs it would do and exit")
    p.set_defaults(func=cmd_compare)
