"""Self-generated, verified data (rejection sampling / best-of-n; AutoIF, Dong et al. 2024; the
"rejection sampling" of Llama 2, Touvron et al. 2023, sec. 3.2.3): sample k answers per prompt from
the current policy, score each with a verifier, and write

- sft.jsonl    the best passing answer per prompt, as a chat example ({"messages": [...], "score"}),
- pairs.jsonl  the best answer against the worst, when the verifier prefers it by >= min_margin
               ({"prompt", "chosen", "rejected", "chosen_score", "rejected_score"}: DPO / reward data),
- samples.jsonl every sample with its score, and summary.json (pass rates; prompts that never passed,
               counted per constraint type when the prompts carry IFEval-style constraints).

Verifiers (inference/verifiers.py): a registered name such as `instructions` (the instruction
checkers' shaped score: 1.0 when every constraint holds), a user's 'package.module:function', or
`reward_model:DIR` (a trained reward model scores prompt + answer).

Repair (`repair: true`, instruction prompts only): a failing sample may be edited into a compliant
one by tasks/instructions/repair.py (lower-cased, wrapped in JSON, cut into the asked bullets, ...);
the edit is kept only if the checker then passes it, and it is marked `"source": "repaired"`. Whether
to allow it is a choice: it gives demonstrations for constraint types the policy never meets alone
(the 135M base almost never answers in lowercase or JSON), at the price of answers the policy did not
write. Repaired answers go to sft.jsonl only, never into pairs (a pair's chosen answer is a sample).
"""
from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from torch import nn

from plugtune.adapters.layers import adapters_only
from plugtune.data.preference import PromptItem, load_prompts
from plugtune.inference.generate import GenerationConfig, generate_ids, stop_token_ids
from plugtune.inference.reward_model import load_reward_model
from plugtune.inference.verifiers import Verifier, checked_scores, resolve_reward_function
from plugtune.tasks.instructions.repair import repair as repair_answer

REWARD_MODEL_PREFIX = "reward_model:"


@dataclass
class SampleConfig:
    """The `sample:` section of a pipeline stage, and `plugtune sample`'s options."""

    prompts: str = ""  # prompt records (JSONL/...): "prompt" plus the fields the verifier reads
    k: int = 4  # answers sampled per prompt
    max_new_tokens: int = 64
    temperature: float = 1.0
    top_p: float = 0.95
    top_k: int = 0
    seed: int = 0
    verifier: str = "instructions"  # a registered name | package.module:function | reward_model:DIR
    pass_score: float = 1.0  # an answer passes when its score >= pass_score
    min_margin: float = 0.1  # a pair needs best - worst >= min_margin
    pairs: bool = True  # write pairs.jsonl (needs k >= 2)
    repair: bool = False  # instruction prompts: repair failing answers into compliant SFT examples
    limit: int = 0  # 0: every prompt
    batch_size: int = 16  # prompts per generation batch (each with its k samples)

    def check(self, where: str = "sample") -> None:
        if not self.prompts:
            raise ValueError(f"{where}.prompts is not set: give a file of prompt records (one JSON object per "
                             "line with a 'prompt' field)")
        if self.k < 1:
            raise ValueError(f"{where}.k must be >= 1, got {self.k}")
        if self.pairs and self.k < 2:
            raise ValueError(f"{where}.k={self.k}: a preference pair needs two different answers to the same prompt; "
                             f"set {where}.k >= 2 or {where}.pairs=false")
        if self.min_margin < 0:
            raise ValueError(f"{where}.min_margin must be >= 0")
        GenerationConfig(self.max_new_tokens, self.temperature, self.top_k, self.top_p, self.seed)  # its own checks


@dataclass
class SampleReport:
    prompts: int
    samples: int
    passing_samples: int
    prompts_with_a_pass: int
    sft_examples: int
    repaired: int
    pairs: int
    seconds: float
    never_passed_by_type: dict[str, int] = field(default_factory=dict)  # prompts with no passing sample
    files: dict[str, str] = field(default_factory=dict)

    @property
    def pass_rate(self) -> float:
        return self.passing_samples / max(self.samples, 1)


def resolve_verifier(name: str, model: nn.Module, tokenizer) -> Verifier:
    """A verifier by name; `reward_model:DIR` loads that reward model onto `model` (a second adapter on
    the same base, or its own weights for a full reward model) and scores prompt + answer with it."""
    if not name.startswith(REWARD_MODEL_PREFIX):
        return resolve_reward_function(name)
    path = name[len(REWARD_MODEL_PREFIX):]
    scorer = load_reward_model(path, model=model, tokenizer=tokenizer, adapter_name="verifier_reward")

    def reward_model(prompts: list[PromptItem], completions: list[str]) -> list[float]:
        return scorer.score([p.messages for p in prompts], completions).tolist()

    return reward_model


def _types(item: PromptItem) -> list[str]:
    return [c.get("type", "?") for c in item.meta.get("constraints", []) if isinstance(c, dict)]


def sample_and_verify(model: nn.Module, tokenizer, cfg: SampleConfig, out_dir: str | Path,
                      adapter: str | None = None, verifier: Verifier | None = None) -> SampleReport:
    """Sample cfg.k answers per prompt from `model` (with `adapter` active alone, or the base), score
    them, write sft.jsonl / pairs.jsonl / samples.jsonl / summary.json to out_dir, and report."""
    cfg.check()
    t0 = time.perf_counter()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    items = load_prompts(cfg.prompts, tokenizer)
    items = items[: cfg.limit] if cfg.limit else items
    verifier = verifier or resolve_verifier(cfg.verifier, model, tokenizer)
    stops = stop_token_ids(tokenizer)
    gen = GenerationConfig(cfg.max_new_tokens, cfg.temperature, cfg.top_k, cfg.top_p, cfg.seed)
    answers: list[list[str]] = []
    scores: list[list[float]] = []
    was_training = model.training
    model.eval()
    with adapters_only(model, adapter):
        for start in range(0, len(items), cfg.batch_size):
            chunk = items[start:start + cfg.batch_size]
            rows = [it for it in chunk for _ in range(cfg.k)]  # k copies in a row: each prompt is prefilled once
            gen.seed = cfg.seed * 1_000_003 + start
            ids = generate_ids(model, [it.prompt_ids for it in rows], stops, tokenizer.pad_token_id, gen)
            texts = [tokenizer.decode(t, skip_special_tokens=True).strip() for t in ids]
            values = checked_scores(verifier, rows, texts)
            answers += [texts[i * cfg.k:(i + 1) * cfg.k] for i in range(len(chunk))]
            scores += [values[i * cfg.k:(i + 1) * cfg.k] for i in range(len(chunk))]
    model.train(was_training)
    report = _write(items, answers, scores, cfg, out_dir)
    report.seconds = round(time.perf_counter() - t0, 1)
    (out_dir / "summary.json").write_text(json.dumps({**asdict(report), "pass_rate": report.pass_rate,
                                                      "config": asdict(cfg)}, indent=2))
    return report


def _write(items: list[PromptItem], answers: list[list[str]], scores: list[list[float]], cfg: SampleConfig,
           out_dir: Path) -> SampleReport:
    sft, pairs, samples = [], [], []
    never: dict[str, int] = {}
    passing = with_pass = repaired = 0
    for item, texts, values in zip(items, answers, scores):
        samples += [{"prompt": item.messages, "answer": t, "score": v} for t, v in zip(texts, values)]
        order = sorted(range(len(texts)), key=lambda i: -values[i])
        best, worst = order[0], order[-1]
        n_pass = sum(v >= cfg.pass_score for v in values)
        passing += n_pass
        if n_pass and texts[best]:
            with_pass += 1
            sft.append({"messages": [*item.messages, {"role": "assistant", "content": texts[best]}],
                        "score": values[best], "source": "sampled"})
        else:
            fixed = _repaired(item, texts[best]) if cfg.repair else None
            if fixed is not None:
                repaired += 1
                sft.append({"messages": [*item.messages, {"role": "assistant", "content": fixed}],
                            "score": None, "source": "repaired"})
            for t in _types(item) or ["(untyped)"]:
                never[t] = never.get(t, 0) + 1
        if (cfg.pairs and values[best] - values[worst] >= cfg.min_margin and texts[best] != texts[worst]
                and texts[best] and texts[worst]):  # an empty answer (the model stopped at once) is no reply to prefer
            pairs.append({"prompt": item.messages, "chosen": [{"role": "assistant", "content": texts[best]}],
                          "rejected": [{"role": "assistant", "content": texts[worst]}],
                          "chosen_score": values[best], "rejected_score": values[worst]})
    files = {"samples": out_dir / "samples.jsonl", "sft": out_dir / "sft.jsonl", "pairs": out_dir / "pairs.jsonl"}
    for name, rows in (("samples", samples), ("sft", sft), ("pairs", pairs)):
        if name == "pairs" and not cfg.pairs:
            continue
        _write_jsonl(files[name], rows)
    return SampleReport(prompts=len(items), samples=sum(len(t) for t in answers), passing_samples=passing,
                        prompts_with_a_pass=with_pass, sft_examples=len(sft), repaired=repaired, pairs=len(pairs),
                        seconds=0.0, never_passed_by_type=dict(sorted(never.items())),
                        files={k: str(v) for k, v in files.items() if k != "pairs" or cfg.pairs})


def _repaired(item: PromptItem, answer: str) -> str | None:
    if not item.meta.get("constraints"):
        return None
    return repair_answer(item.meta, answer)  # a repair is returned only if the checker passes it


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    """Written to a temporary name and renamed, so a killed run never leaves half a file under the name."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in rows))
    tmp.replace(path)

