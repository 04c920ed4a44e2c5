"""`plugtune export --format gguf`: a base model (with an adapter merged in), or a LoRA adapter alone,
as a GGUF file for llama.cpp / Ollama. Cheap refusals (an existing output, an adapter llama.cpp
cannot load, an architecture without a tensor map) come before any weights are loaded.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

from transformers import AutoConfig

from plugtune.adapters.io import load_adapter, read_adapter_config
from plugtune.adapters.layers import set_active_adapters
from plugtune.adapters.merge import fold_into_base
from plugtune.adapters.registry import method_from_saved
from plugtune.export.gguf_writer import (QUANTS, WriteFn, check_output_path, commit_atomically, write_gguf_file,
                                        write_model_gguf)
from plugtune.export.lora_gguf import LORA_QUANTS, check_lora_exportable, write_lora_gguf
from plugtune.export.modelfile import modelfile_path, modelfile_text
from plugtune.export.tensor_names import gguf_arch
from plugtune.models.loading import load_base, resolve_model_dir

FORMATS = ("gguf",)


@dataclass
class ExportResult:
    path: Path
    kind: str  # "model" | "lora"
    quant: str
    modelfile: Path | None
    seconds: float


def export_gguf(out: str | Path, model: str = "smollm2-135m", adapter: str | Path | None = None,
                quant: str | None = None, adapter_only: bool = False, ollama: bool = False, overwrite: bool = False,
                force: bool = False, write: WriteFn = write_gguf_file) -> ExportResult:
    """Write `model` (+ `adapter` merged) to the GGUF file `out`; with adapter_only, the adapter alone as
    a llama.cpp LoRA file for the base's GGUF. `write` writes a prepared gguf.GGUFWriter to a path
    (tests inject a failing one)."""
    start = time.perf_counter()
    out = Path(out)
    quant = quant or ("f32" if adapter_only else "f16")
    check_output_path(out, overwrite)
    mf = None
    if ollama:
        if adapter_only:
            raise ValueError("--ollama writes a Modelfile for a whole model; with --adapter-only, export the base "
                             "too (plugtune export --out base.gguf) and add `ADAPTER ./<lora>.gguf` to its Modelfile")
        mf = check_output_path(modelfile_path(out), overwrite)
    method = cfg = None
    if adapter is not None:
        method, cfg = method_from_saved(read_adapter_config(adapter))
    if adapter_only:
        if adapter is None:
            raise ValueError("--adapter-only needs --adapter DIR (the LoRA adapter to write)")
        if quant not in LORA_QUANTS:
            raise ValueError(f"--adapter-only writes LoRA tensors as {' or '.join(LORA_QUANTS)}, not --quant {quant}")
        check_lora_exportable(method.name, cfg, method.can_merge)
    else:
        if quant not in QUANTS:
            raise ValueError(f"--quant {quant!r}: choose one of {', '.join(QUANTS)}")
        if method is not None and not method.can_merge:
            raise ValueError(f"the adapter in {adapter} is {method.name}, which cannot be folded into the base "
                             "weights, so no GGUF model can carry it (llama.cpp runs plain weights and LoRA "
                             "files only); train a LoRA, DoRA or IA3 adapter to export")
    gguf_arch(AutoConfig.from_pretrained(resolve_model_dir(model)))  # refuse before loading any weights

    loaded = load_base(model, "float32", "cpu")
    lm = loaded.model.eval()
    if adapter is not None:
        load_adapter(lm, adapter, name="default", force=force)
        set_active_adapters(lm, ["default"])
    label = f"{loaded.name}+{Path(adapter).name}" if adapter is not None else str(loaded.name)
    if adapter_only:
        path = write_lora_gguf(lm, out, "default", quant, overwrite, adapter_name=label, write=write)
        return ExportResult(path, "lora", quant, None, time.perf_counter() - start)
    if adapter is not None:
        fold_into_base(lm, "default")
    text = modelfile_text(out.name, loaded.tokenizer) if ollama else None  # a refusal before writing anything
    path = write_model_gguf(lm, loaded.tokenizer, out, quant, overwrite, name=label, write=write)
    if text is not None:
        commit_atomically(mf, overwrite, lambda tmp: tmp.write_text(text))
    return ExportResult(path, "model", quant, mf, time.perf_counter() - start)
