"""Can vLLM serve these adapters? `plugtune adapters check --for vllm DIR`.

The scale-out path is `vllm serve BASE --enable-lora --lora-modules NAME=DIR ...` on the same
adapter directories. vLLM reads PEFT's adapter_config.json and refuses (vllm/lora/peft_helper.py,
`PEFTHelper.validate_legal`, and vllm/config/lora.py):
  - DoRA (`use_dora`): "vLLM does not yet support DoRA."
  - `modules_to_save`: "vLLM only supports modules_to_save being None."
  - a rank above the server's --max-lora-rank, which must itself be one of MAX_LORA_RANKS
    (default 16), and adapter bias unless bias is enabled.
It reads one `r` and one `lora_alpha` for the whole adapter (PEFTHelper has no rank_pattern /
alpha_pattern), and serves LoRA only: IA3, prompt/prefix tuning and plugtune's bottleneck adapters
have no vLLM loader. Each finding says what to change.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from plugtune.adapters.io import CONFIG_FILE, WEIGHTS_FILE

# vllm/config/lora.py: MaxLoRARanks = Literal[1, 8, 16, 32, 64, 128, 256, 320, 512]; default 16.
MAX_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)
DEFAULT_MAX_LORA_RANK = 16
MERGE_HINT = "or merge it into the base (`plugtune merge --adapter DIR --out MERGED`) and serve MERGED with vLLM"


@dataclass
class AdapterCheck:
    path: Path
    errors: list[str] = field(default_factory=list)  # vLLM will refuse the adapter
    warnings: list[str] = field(default_factory=list)  # vLLM loads it, but something needs care
    rank: int | None = None
    base: str | None = None  # base_model_name_or_path, when the adapter records it

    @property
    def ok(self) -> bool:
        return not self.errors


def _peft_type(cfg: dict) -> str:
    if cfg.get("method") == "bottleneck" or "reduction_factor" in cfg:
        return "BOTTLENECK"
    return str(cfg.get("peft_type", "")).upper()


def check_adapter(path: str | Path, max_lora_rank: int | None = None) -> AdapterCheck:
    """Check one adapter directory against vLLM's constraints."""
    path = Path(path)
    result = AdapterCheck(path)
    cfg_file = path / CONFIG_FILE
    if not cfg_file.is_file():
        result.errors.append(f"{CONFIG_FILE} is missing: not an adapter directory")
        return result
    try:
        cfg = json.loads(cfg_file.read_text())
    except json.JSONDecodeError as exc:
        result.errors.append(f"{CONFIG_FILE} is not valid JSON ({exc})")
        return result
    result.base = cfg.get("base_model_name_or_path") or None
    kind = _peft_type(cfg)
    if kind != "LORA":
        result.errors.append(f"vLLM serves LoRA adapters only; this one is {kind or 'of unknown type'}: retrain it "
                             f"with method 'lora', {MERGE_HINT}")
        return result
    if not (path / WEIGHTS_FILE).is_file() and not (path / "adapter_model.bin").is_file():
        result.errors.append(f"{WEIGHTS_FILE} is missing: vLLM needs the adapter's weights next to its config")
    if cfg.get("use_dora"):
        result.errors.append(f"vLLM does not support DoRA (use_dora: true): retrain with use_dora false, {MERGE_HINT}")
    if cfg.get("modules_to_save"):
        result.errors.append(f"vLLM only supports modules_to_save being None; this adapter also trains "
                             f"{cfg['modules_to_save']} in full: retrain without modules_to_save, {MERGE_HINT}")
    if str(cfg.get("bias", "none")) != "none":
        result.errors.append(f"vLLM refuses adapter bias (bias: {cfg['bias']!r}) unless LoRA bias is enabled, and "
                             "recent versions do not support it: retrain with bias 'none'")
    patterns = {k: v for k, v in (cfg.get("rank_pattern") or {}).items()}
    if patterns or cfg.get("alpha_pattern"):
        result.errors.append("vLLM reads one r and one lora_alpha for the whole adapter and ignores rank_pattern / "
                             "alpha_pattern, so modules with their own rank or alpha would get the wrong scale: "
                             "retrain with a single r and lora_alpha")
    ranks = [int(cfg.get("r", 8))] + [int(v) for v in patterns.values()]
    rank = max(ranks)
    result.rank = rank
    if rank > MAX_LORA_RANKS[-1]:
        result.errors.append(f"rank {rank} is above the largest --max-lora-rank vLLM accepts ({MAX_LORA_RANKS[-1]}): "
                             f"retrain with r <= {MAX_LORA_RANKS[-1]}")
    elif max_lora_rank is not None and rank > max_lora_rank:
        result.errors.append(f"rank {rank} is above --max-lora-rank {max_lora_rank}: start vLLM with "
                             f"--max-lora-rank {needed_max_rank(rank)}")
    elif max_lora_rank is None and rank > DEFAULT_MAX_LORA_RANK:
        result.warnings.append(f"rank {rank} is above vLLM's default --max-lora-rank {DEFAULT_MAX_LORA_RANK}: start "
                               f"vLLM with --max-lora-rank {needed_max_rank(rank)}")
    targets = cfg.get("target_modules") or []
    targets = [targets] if isinstance(targets, str) else list(targets)
    special = [t for t in targets if any(s in t for s in ("embed_tokens", "lm_head", "wte", "embed_out"))]
    if special:
        result.warnings.append(f"LoRA on {special}: vLLM's support for LoRA on embeddings and the LM head depends on "
                               "its version and the model; target only the linear layers (attention and MLP) to "
                               "be safe")
    if cfg.get("use_rslora"):
        result.warnings.append("rsLoRA (use_rslora): vLLM applies the lora_alpha / sqrt(r) scale; nothing to change")
    return result


def needed_max_rank(rank: int) -> int:
    """The smallest --max-lora-rank vLLM accepts that covers `rank`."""
    return next(r for r in MAX_LORA_RANKS if r >= rank)


def find_adapters(path: str | Path) -> list[Path]:
    """`path` itself if it is an adapter directory, else its adapter subdirectories."""
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"{path} is not a directory")
    if (path / CONFIG_FILE).is_file():
        return [path]
    found = sorted(p for p in path.iterdir() if p.is_dir() and (p / CONFIG_FILE).is_file())
    if not found:
        raise FileNotFoundError(f"{path} holds no adapter ({CONFIG_FILE} in it or in a subdirectory)")
    return found


def check_for_vllm(path: str | Path, max_lora_rank: int | None = None) -> tuple[list[AdapterCheck], str]:
    """Check every adapter under `path`; returns the checks and a report ending with the
    `vllm serve` command that serves the ones that pass."""
    if max_lora_rank is not None and max_lora_rank not in MAX_LORA_RANKS:
        raise ValueError(f"--max-lora-rank {max_lora_rank} is not one vLLM accepts: {MAX_LORA_RANKS}")
    checks = [check_adapter(p, max_lora_rank) for p in find_adapters(path)]
    lines = []
    for c in checks:
        lines.append(f"{'ok  ' if c.ok else 'FAIL'} {c.path}" + (f"  (r {c.rank})" if c.rank else ""))
        lines += [f"     error: {e}" for e in c.errors] + [f"     warning: {w}" for w in c.warnings]
    good = [c for c in checks if c.ok]
    if good:
        rank = max(needed_max_rank(c.rank or 1) for c in good)
        if max_lora_rank is None:  # name the flag only when vLLM's default does not cover the ranks
            flags = f" --max-lora-rank {rank}" if rank > DEFAULT_MAX_LORA_RANK else ""
        else:
            flags = f" --max-lora-rank {max_lora_rank}"
        modules = " ".join(f"{c.path.name}={c.path}" for c in good)
        loras = f" --max-loras {len(good)}" if len(good) > 1 else ""  # adapters in one batch (default 1)
        base = next((c.base for c in good if c.base), "BASE")  # a Hugging Face model directory or hub id
        lines.append(f"\n{len(good)}/{len(checks)} adapter(s) can be served by vLLM:\n"
                     f"  vllm serve {base} --enable-lora{flags}{loras} --lora-modules {modules}")
    else:
        lines.append(f"\nnone of the {len(checks)} adapter(s) can be served by vLLM as they are")
    return checks, "\n".join(lines)
