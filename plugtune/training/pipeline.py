"""Staged runs: one YAML, several stages, each starting from the previous stage's policy.

    model: {name: smollm2-135m}          # defaults for every stage: any run-config section
    method: lora
    adapter: {r: 16, alpha: 32}
    output: {dir: runs/pipeline}
    stages:
      - {name: sample, sample: {prompts: plugtune:instructions/train.jsonl, k: 4, verifier: instructions, repair: true}}
      - {name: sft, objective: sft, data: {train: "@sample/sft.jsonl"}, training: {max_steps: 30}}
      - {name: resample, sample: {prompts: plugtune:instructions/train.jsonl, k: 4}}
      - {name: dpo, objective: dpo, data: {train: "@resample/pairs.jsonl"}}
      - {name: grpo, objective: grpo, from: sft, rollout: {reward_functions: [instructions]}}

A stage is a run config merged over the pipeline's top-level sections (`objective:` one of the
recipes, or a `sample:` section for rejection sampling, inference/rejection_sampling.py). Its policy
starts from the last earlier policy stage (sft, dpo, ppo, grpo), or from the stage named by `from:`:
for adapters, the stage continues that stage's adapter (`model.adapter`) and DPO/PPO/GRPO take a
frozen copy of it as the reference policy (InstructGPT and Tülu: the SFT model is the reference);
for full fine-tuning, `model.name` becomes that stage's model directory and the reference its frozen
copy. Reward and sample stages do not move the policy. A sample stage samples from the current policy.

`@stage/file` in a string value names an earlier stage's output: `@sample/sft.jsonl`,
`@sample/pairs.jsonl`, or `@rm` (a reward stage's reward model directory, e.g. for
`rollout.reward_model` or a sample stage's `verifier: reward_model:@rm`).

Stages run in order under OUTPUT/<NN>-<name>/. `pipeline.json` records each finished stage with a hash
of its resolved config: a rerun skips finished stages, continues an unfinished one from its last
checkpoint, and refuses a finished stage whose config changed unless output.overwrite is set (then that
stage and every later one run again). Nothing an earlier stage wrote is touched by a failing later
one. The summary (pipeline_summary.json / .md / .png) gives each stage's metrics, time and memory.
"""
from __future__ import annotations

import copy
import hashlib
import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from plugtune.adapters import load_adapter
from plugtune.data.readers import resolve_data_path
from plugtune.inference.rejection_sampling import SampleConfig, sample_and_verify
from plugtune.models.loading import load_base
from plugtune.schema import ConfigError, from_dict, read_yaml_mapping
from plugtune.training.config import RunConfig, apply_overrides, resolve_config_path, validate_run_config
from plugtune.training.engine.loop import peak_memory_mb
from plugtune.training.engine.metrics_log import MetricsLog
from plugtune.training.engine.speed import set_threads
from plugtune.training.recipes import RECIPES
from plugtune.training.run import train

POLICY_OBJECTIVES = ("sft", "dpo", "ppo", "grpo")  # stages whose result is the next stage's policy
STATE_FILE = "pipeline.json"
_REF_KEYS = ("data.train", "data.eval", "rollout.reward_model", "sample.prompts", "sample.verifier")


@dataclass
class Stage:
    index: int
    name: str
    kind: str  # a recipe name (sft, reward, dpo, ppo, grpo) or "sample"
    raw: dict  # this stage's run-config mapping, pipeline defaults merged in, references unresolved
    start_from: str | None  # the stage whose policy this one starts from; None: the base

    @property
    def dir_name(self) -> str:
        return f"{self.index:02d}-{self.name}"


@dataclass
class StageResult:
    name: str
    kind: str
    seconds: float
    peak_memory_mb: float
    artifact: str = ""
    metrics: dict = field(default_factory=dict)


# ---------------------------------------------------------------- reading and checking


def is_pipeline(path: str | Path) -> bool:
    """Does this YAML describe stages (a pipeline) rather than one run?"""
    return "stages" in read_yaml_mapping(resolve_config_path(path))


def load_pipeline(path: str | Path, overrides: list[str] | None = None) -> tuple[Path, list[Stage], dict]:
    """(output dir, stages, top-level defaults). Overrides apply to the defaults (every stage)."""
    path = resolve_config_path(path)
    return parse_pipeline(read_yaml_mapping(path), overrides, where=str(path))


def parse_pipeline(data: dict, overrides: list[str] | None = None, where: str = "pipeline") -> tuple[Path, list[Stage], dict]:
    if not isinstance(data, dict) or not isinstance(data.get("stages"), list) or not data["stages"]:
        raise ConfigError(f"{where}: a pipeline has a non-empty 'stages:' list (each stage a mapping with "
                          "'objective:' or a 'sample:' section)")
    defaults = apply_overrides({k: v for k, v in data.items() if k != "stages"}, overrides or [])
    out = Path(defaults.get("output", {}).get("dir", "runs/pipeline"))
    stages: list[Stage] = []
    last_policy: str | None = None
    names = [str(s.get("name", "")) for s in data["stages"] if isinstance(s, dict)]
    for i, raw in enumerate(data["stages"]):
        if not isinstance(raw, dict):
            raise ConfigError(f"{where}: stage {i + 1} must be a mapping, got {type(raw).__name__}")
        raw = copy.deepcopy(raw)
        kind = "sample" if "sample" in raw or raw.get("objective") == "sample" else raw.get("objective", "sft")
        name = str(raw.pop("name", f"{kind}{i + 1}"))
        start = raw.pop("from", last_policy)
        if kind not in RECIPES and kind != "sample":
            raise ConfigError(f"{where}: stage '{name}': objective={kind!r} is not one of "
                              f"{', '.join([*RECIPES, 'sample'])}")
        if any(s.name == name for s in stages):
            raise ConfigError(f"{where}: two stages are named '{name}'; give each stage its own name")
        if start is not None and not any(s.name == start and s.kind in POLICY_OBJECTIVES for s in stages):
            raise ConfigError(f"{where}: stage '{name}' starts from '{start}', which is not an earlier sft, dpo, ppo "
                              "or grpo stage")
        raw.pop("objective", None)
        merged = _deep_merge(copy.deepcopy(defaults), raw)
        if kind != "sample":
            merged["objective"] = kind
        stage = Stage(i + 1, name, kind, merged, start)
        _check_references(stage, stages, names, where)
        _check_stage_config(stage, where)
        stages.append(stage)
        if kind in POLICY_OBJECTIVES:
            last_policy = name
    return out, stages, defaults


def _deep_merge(base: dict, over: dict) -> dict:
    for k, v in over.items():
        base[k] = _deep_merge(base[k], v) if isinstance(v, dict) and isinstance(base.get(k), dict) else v
    return base


def _get(mapping: dict, dotted: str) -> Any:
    node: Any = mapping
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return None
        node = node[part]
    return node


def _set(mapping: dict, dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node = mapping
    for part in parts[:-1]:
        node = node.setdefault(part, {})
    node[parts[-1]] = value


def _reference(value: str) -> tuple[str, str] | None:
    """'@stage/file' or 'reward_model:@stage' -> (stage, file)."""
    text = value.split(":", 1)[1] if value.startswith("reward_model:@") else value
    if not text.startswith("@"):
        return None
    stage, _, rest = text[1:].partition("/")
    return stage, rest


def _check_references(stage: Stage, earlier: list[Stage], names: list[str], where: str) -> None:
    """Every '@stage/...' names an earlier stage that writes it; a training stage has its data."""
    for key in _REF_KEYS:
        value = _get(stage.raw, key)
        ref = _reference(value) if isinstance(value, str) else None
        if ref is None:
            continue
        source = next((s for s in earlier if s.name == ref[0]), None)
        if source is None:
            later = " runs later" if ref[0] in names else " is not a stage of this pipeline"
            raise ConfigError(f"{where}: stage '{stage.name}' reads {key}={value}, but stage '{ref[0]}'{later}; "
                              "a stage can only use what an earlier stage wrote: reorder the stages")
        if source.kind == "sample" and ref[1] not in ("sft.jsonl", "pairs.jsonl", "samples.jsonl"):
            raise ConfigError(f"{where}: stage '{stage.name}' reads {key}={value}; a sample stage writes "
                              f"@{source.name}/sft.jsonl, @{source.name}/pairs.jsonl and @{source.name}/samples.jsonl")
        if source.kind == "sample" and ref[1] == "pairs.jsonl" and not (_get(source.raw, "sample.pairs") in (None, True)):
            raise ConfigError(f"{where}: stage '{stage.name}' reads {value}, but stage '{source.name}' has "
                              "sample.pairs=false")
        if source.kind != "sample" and (source.kind != "reward" or ref[1]):
            raise ConfigError(f"{where}: stage '{stage.name}' reads {key}={value}; only sample stages (files) and "
                              "reward stages ('@<reward stage>' is its reward model) can be referenced")
    if stage.kind in ("sft", "dpo", "reward") and not _get(stage.raw, "data.train"):
        what = "pairs" if stage.kind in ("dpo", "reward") else "examples"
        file = "pairs.jsonl" if stage.kind in ("dpo", "reward") else "sft.jsonl"
        raise ConfigError(f"{where}: stage '{stage.name}' ({stage.kind}) has no data.train: give a file of {what}, "
                          f"or '@<an earlier sample stage>/{file}'")
    if stage.kind in ("ppo", "grpo") and not _get(stage.raw, "data.train"):
        raise ConfigError(f"{where}: stage '{stage.name}' ({stage.kind}) has no data.train: give its prompt records")
    if stage.kind == "sample" and not _get(stage.raw, "sample.prompts"):
        raise ConfigError(f"{where}: stage '{stage.name}' (sample) has no sample.prompts: give a file of prompt records")


def _check_stage_config(stage: Stage, where: str) -> None:
    """The stage's own sections parse and validate now, before any stage runs (references to earlier
    stages' outputs are filled in later; here they stand as they are)."""
    label = f"{where}: stage '{stage.name}'"
    if stage.kind == "sample":
        sample = from_dict(SampleConfig, stage.raw.get("sample", {}), where=f"{label}: sample")
        try:
            sample.check(where=f"stage '{stage.name}': sample")
        except ValueError as exc:
            raise ConfigError(f"{where}: {exc}") from None
        return
    _run_config(stage.raw, label)


def _run_config(data: dict, label: str) -> RunConfig:
    """A training stage's mapping as a validated RunConfig; errors name the stage."""
    cfg = from_dict(RunConfig, {k: v for k, v in data.items() if k != "sample"}, where=label)
    try:
        validate_run_config(cfg)
    except ConfigError as exc:
        raise ConfigError(f"{label}: {exc}") from None
    return cfg


# ---------------------------------------------------------------- running


@dataclass
class PipelineReport:
    out_dir: str
    stages: list[StageResult]
    seconds: float
    skipped: list[str] = field(default_factory=list)  # finished in an earlier run


def run_pipeline(path: str | Path | dict, overrides: list[str] | None = None) -> PipelineReport:
    """Run (or resume) the pipeline the YAML file `path` (or mapping) describes."""
    out, stages, defaults = (load_pipeline(path, overrides) if not isinstance(path, dict)
                             else parse_pipeline(path, overrides))
    overwrite = bool(_get(defaults, "output.overwrite"))
    out.mkdir(parents=True, exist_ok=True)
    state = _read_state(out)
    done: dict[str, StageResult] = {}
    skipped: list[str] = []
    t0 = time.perf_counter()
    rerun_from: int | None = None
    for stage in stages:
        resolved = _resolve(stage, out, done)
        digest = _config_hash(resolved)
        saved = state.get(stage.name)
        if saved and saved.get("finished") and rerun_from is None:
            if saved["config_hash"] == digest:
                done[stage.name] = StageResult(**saved["result"])
                skipped.append(stage.name)
                print(f"[pipeline] stage {stage.dir_name}: finished in an earlier run, not run again")
                continue
            if not overwrite:
                raise ConfigError(f"stage '{stage.name}' finished in an earlier run of {out} with another config; "
                                  "set output.overwrite=true to run it (and every later stage) again, or use "
                                  "another output.dir")
            rerun_from = stage.index
        if rerun_from is not None:
            resolved = _deep_merge(resolved, {"output": {"overwrite": True}})
        print(f"[pipeline] stage {stage.dir_name} ({stage.kind})" + (f", from '{stage.start_from}'" if stage.start_from else ""))
        state[stage.name] = {"finished": False, "config_hash": digest}
        _write_state(out, state)
        result = _run_stage(stage, resolved, done)
        done[stage.name] = result
        state[stage.name] = {"finished": True, "config_hash": digest, "result": asdict(result)}
        _write_state(out, state)
    report = PipelineReport(str(out), [done[s.name] for s in stages], round(time.perf_counter() - t0, 1), skipped)
    write_summary(out, report, stages)
    return report


def _config_hash(resolved: dict) -> str:
    """What decides a stage's result: its resolved config, less how the run treats its directory."""
    kept = copy.deepcopy(resolved)
    for key in ("overwrite", "resume"):
        kept.get("output", {}).pop(key, None)
    kept.get("training", {}).pop("progress", None)
    return hashlib.sha256(json.dumps(kept, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _resolve(stage: Stage, out: Path, done: dict[str, StageResult]) -> dict:
    """The stage's run-config mapping with '@' references and the starting policy filled in."""
    raw = copy.deepcopy(stage.raw)
    for key in _REF_KEYS:
        value = _get(raw, key)
        ref = _reference(value) if isinstance(value, str) else None
        if ref is None:
            continue
        source = done[ref[0]]
        target = str(Path(source.artifact) / ref[1]) if ref[1] else source.artifact
        _set(raw, key, ("reward_model:" + target) if value.startswith("reward_model:") else target)
    _set(raw, "output.dir", str(out / stage.dir_name))
    if stage.start_from is not None:
        start = done[stage.start_from].artifact
        if raw.get("method", "lora") == "full":
            _set(raw, "model.name", start)
        else:
            _set(raw, "model.adapter", start)
    return raw


def _run_stage(stage: Stage, resolved: dict, done: dict[str, StageResult]) -> StageResult:
    t0 = time.perf_counter()
    if stage.kind == "sample":
        return _run_sample_stage(stage, resolved, t0)
    cfg = _run_config(resolved, f"stage '{stage.name}'")
    for key in ("data.train", "data.eval"):
        value = _get(resolved, key)
        if value and not resolve_data_path(value).exists():
            raise FileNotFoundError(f"stage '{stage.name}': {key}={value} does not exist; fix the path (or, for a "
                                    "sample stage's output, write '@<stage>/sft.jsonl' or '@<stage>/pairs.jsonl')")
    report = train(cfg)
    history = MetricsLog(Path(cfg.output.dir) / "metrics.jsonl").read()
    metrics = {"steps": report.steps, "train_loss": report.train_loss, "eval_loss": report.eval_loss,
               "tokens_per_second": round(report.tokens_per_second, 1), **report.eval_metrics}
    last = next((r for r in reversed(history) if r.get("kind") == "train"), {})
    metrics.update({k: v for k, v in last.items() if k.startswith(("kl", "reward", "rewards/"))})
    return StageResult(stage.name, stage.kind, round(time.perf_counter() - t0, 3), round(report.peak_memory_mb, 1),
                       report.artifact, metrics)


def _run_sample_stage(stage: Stage, resolved: dict, t0: float) -> StageResult:
    sample = from_dict(SampleConfig, resolved.get("sample", {}), where=f"stage '{stage.name}'.sample")  # checked at parse
    if not resolve_data_path(sample.prompts).exists():
        raise FileNotFoundError(f"stage '{stage.name}': sample.prompts={sample.prompts} does not exist; fix the path")
    model = resolved.get("model", {})
    out_dir = Path(resolved["output"]["dir"])
    loaded = load_base(model.get("name", "smollm2-135m"), model.get("dtype", "auto"), model.get("device", "auto"),
                       model.get("quantize", "none"))
    adapter = None
    if model.get("adapter"):
        load_adapter(loaded.model, model["adapter"], "policy")
        adapter = "policy"
    set_threads(int(_get(resolved, "training.threads") or 0))
    try:
        report = sample_and_verify(loaded.model, loaded.tokenizer, sample, out_dir, adapter=adapter)
    except ValueError as exc:
        raise ValueError(f"stage '{stage.name}': {exc}") from None
    metrics = {k: v for k, v in asdict(report).items() if k not in ("files", "seconds")}
    metrics["pass_rate"] = round(report.pass_rate, 4)
    if report.never_passed_by_type:
        print(f"[pipeline] stage {stage.dir_name}: prompts where no sample passed, by constraint type: "
              + ", ".join(f"{t} {n}" for t, n in report.never_passed_by_type.items()))
    device = next(loaded.model.parameters()).device
    return StageResult(stage.name, "sample", round(time.perf_counter() - t0, 3), round(peak_memory_mb(device), 1),
                       str(out_dir), metrics)


def _read_state(out: Path) -> dict:
    path = out / STATE_FILE
    return json.loads(path.read_text()).get("stages", {}) if path.is_file() else {}


def _write_state(out: Path, stages: dict) -> None:
    tmp = out / (STATE_FILE + ".tmp")
    tmp.write_text(json.dumps({"stages": stages}, indent=2))
    tmp.replace(out / STATE_FILE)


# ---------------------------------------------------------------- summary


def write_summary(out: Path, report: PipelineReport, stages: list[Stage]) -> None:
    """pipeline_summary.json, pipeline_summary.md (a table of every stage) and pipeline_summary.png
    (each training stage's loss curve, and every stage's time and memory)."""
    (out / "pipeline_summary.json").write_text(json.dumps(asdict(report), indent=2, default=str))
    lines = ["| stage | kind | time (s) | peak memory (MB) | result |", "|---|---|---|---|---|"]
    for r in report.stages:
        shown = {k: v for k, v in r.metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
        text = ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in list(shown.items())[:8])
        if r.metrics.get("never_passed_by_type"):
            text += "; never passed: " + ", ".join(f"{t} {n}" for t, n in r.metrics["never_passed_by_type"].items())
        lines.append(f"| {r.name} | {r.kind} | {r.seconds:.1f} | {r.peak_memory_mb:.0f} | {text} |")
    (out / "pipeline_summary.md").write_text("\n".join(lines) + "\n")
    _plot(out, report, stages)


def _plot(out: Path, report: PipelineReport, stages: list[Stage]) -> None:
    import matplotlib  # noqa: PLC0415  (a plotting backend only when a summary is written)

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    fig, (curves, cost) = plt.subplots(1, 2, figsize=(11, 4))
    for stage, r in zip(stages, report.stages):
        if r.kind == "sample":
            continue
        history = MetricsLog(out / stage.dir_name / "metrics.jsonl").read()
        train = [(h["step"], h["loss"]) for h in history if h.get("kind") == "train"]
        if train:
            curves.plot(*zip(*train), label=f"{r.name} ({r.kind})")
    curves.set_xlabel("step")
    curves.set_ylabel("training loss (the stage's own objective)")
    curves.legend(fontsize=8)
    names = [r.name for r in report.stages]
    cost.bar(names, [r.seconds for r in report.stages], color="tab:blue")
    cost.set_ylabel("seconds")
    twin = cost.twinx()
    twin.plot(names, [r.peak_memory_mb for r in report.stages], "o-", color="tab:red")
    twin.set_ylabel("peak memory (MB)", color="tab:red")
    fig.suptitle("pipeline stages")
    fig.tight_layout()
    fig.savefig(out / "pipeline_summary.png", dpi=110)
    plt.close(fig)
