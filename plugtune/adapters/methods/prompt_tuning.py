"""Prompt tuning (Lester et al. 2021, "The Power of Scale for Parameter-Efficient Prompt Tuning").

A learned soft prompt P_e (n, C) is put before the embedded input X_e (T, C); the frozen model
reads [P_e; X_e] (sec. 2) and only P_e is trained. The prompt lives in `model.prompt_encoder`, a
module that wraps no layer: `causal_lm.prepare_inputs` finds it by its `virtual_inputs` method
(adapters/virtual.py). In a per-row mixed batch each row gets its own adapter's prompt.

Not an identity at init: the prompt is extra context, so even a fresh adapter changes the outputs.
What holds instead: with the adapter disabled (`adapters_disabled`) the model is the base, bit
for bit, and the base weights never change.

Init (sec. 3.2): "random" (N(0, 1), PEFT's nn.Embedding default), "sample_vocab" (embeddings of
random vocabulary tokens) or "text" (embeddings of a text's tokens, repeated or cut to n; the paper
uses class labels). For "text", `text_init(tokenizer, text, n)` stores the token ids in the config
(`init_token_ids`); otherwise attach tokenizes `init_text` with `tokenizer_name_or_path`.

PEFT format: adapter_config.json with peft_type PROMPT_TUNING, and one tensor `prompt_embeddings`
(n, C) in adapter_model.safetensors (no `base_model.model.` prefix).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch
from torch import nn

from plugtune.adapters.virtual import VirtualTokenEncoder, encoder_of, peft_single_tensor_format
from plugtune.adapters.registry import AdapterMethod, register

ENCODER = "prompt_encoder"  # attribute of the model holding the soft prompts
INITS = ("random", "sample_vocab", "text")


@dataclass
class PromptTuningConfig:
    num_virtual_tokens: int = 20
    init: str = "random"  # random | sample_vocab | text (PEFT: prompt_tuning_init)
    init_text: str | None = None  # PEFT: prompt_tuning_init_text
    init_token_ids: list[int] | None = None  # init_text tokenized; text_init() fills it
    tokenizer_name_or_path: str | None = None  # used to tokenize init_text when init_token_ids is unset
    # The base's shape, filled in by attach; PEFT records them in adapter_config.json.
    token_dim: int | None = None
    num_layers: int | None = None
    num_attention_heads: int | None = None

    def __post_init__(self):
        if self.num_virtual_tokens < 1:
            raise ValueError(f"num_virtual_tokens must be >= 1, got {self.num_virtual_tokens}")
        self.init = self.init.lower()
        if self.init not in INITS:
            raise ValueError(f"prompt tuning init must be one of {INITS}, got {self.init!r}")
        if self.init == "text" and not (self.init_token_ids or (self.init_text and self.tokenizer_name_or_path)):
            raise ValueError("init='text' needs init_token_ids (see text_init) or init_text + tokenizer_name_or_path")


def text_init(tokenizer, text: str, num_virtual_tokens: int = 20) -> PromptTuningConfig:
    """A config whose prompt starts as the embeddings of `text` (tokenized as PEFT does)."""
    return PromptTuningConfig(num_virtual_tokens=num_virtual_tokens, init="text", init_text=text,
                              init_token_ids=list(tokenizer(text)["input_ids"]),
                              tokenizer_name_or_path=getattr(tokenizer, "name_or_path", None) or None)


class PromptEncoder(VirtualTokenEncoder):
    """Soft prompts, one (n, C) parameter per adapter."""

    adapter_module_names = ("prompt_embeddings",)
    table_attr = "prompt_embeddings"
    merge_refusal = "a soft prompt is extra input, not a weight change: prompt tuning cannot be merged"

    def __init__(self):
        super().__init__()
        self.prompt_embeddings = nn.ParameterDict()

    def add_adapter(self, name: str, cfg: PromptTuningConfig, init: torch.Tensor) -> None:
        self.prompt_embeddings[name] = nn.Parameter(init.float())  # fp32, as PEFT
        self.register_adapter(name, cfg)

    def virtual_inputs(self, batch_size: int) -> dict:
        if self.row_plan is not None:
            return self._row_prompts(batch_size)
        live = self.live_adapters()
        if not live:
            return {}
        prompt = torch.cat([self.prompt_embeddings[n] for n in live], dim=0)  # (n, C)
        return {"prompt": prompt.unsqueeze(0).expand(batch_size, -1, -1)}  # (B, n, C)

    def _row_prompts(self, batch_size: int) -> dict:
        """Each row's own soft prompt, left-padded to the longest with a 0 mask, so the prompt sits right
        before the row's tokens and positions (from the mask) are those the row would have alone."""
        groups = self.row_groups(batch_size)
        if not groups:
            return {}
        n_max = max(self.prompt_embeddings[n].shape[0] for n, _ in groups)
        ref = self.prompt_embeddings[groups[0][0]]
        prompt = ref.new_zeros(batch_size, n_max, ref.shape[1])  # (B, n_max, C)
        mask = torch.zeros(batch_size, n_max, dtype=torch.long, device=ref.device)  # (B, n_max)
        all_rows = torch.arange(batch_size, device=ref.device)
        for name, idx in groups:
            table = self.prompt_embeddings[name]  # (n, C)
            rows = all_rows if idx is None else idx
            padded = torch.cat([table.new_zeros(n_max - table.shape[0], table.shape[1]), table])  # (n_max, C)
            prompt = prompt.index_copy(0, rows, padded.unsqueeze(0).expand(len(rows), -1, -1))
            mask[rows, n_max - table.shape[0]:] = 1
        return {"prompt": prompt, "prompt_mask": mask}


def _init_prompt(model: nn.Module, cfg: PromptTuningConfig) -> torch.Tensor:
    embed = model.get_input_embeddings()
    n, (vocab, dim) = cfg.num_virtual_tokens, embed.weight.shape
    if cfg.init == "random":
        return torch.randn(n, dim, device=embed.weight.device)
    if cfg.init == "sample_vocab":
        ids = torch.randint(0, vocab, (n,), device=embed.weight.device)
    else:
        token_ids = cfg.init_token_ids
        if not token_ids:
            from transformers import AutoTokenizer

            token_ids = AutoTokenizer.from_pretrained(cfg.tokenizer_name_or_path)(cfg.init_text)["input_ids"]
        token_ids = (list(token_ids) * math.ceil(n / len(token_ids)))[:n]  # repeat or cut to n, as PEFT
        ids = torch.tensor(token_ids, device=embed.weight.device)
    with torch.no_grad():
        return embed(ids).detach().clone()  # (n, C)


def attach_prompt_tuning(model: nn.Module, cfg: PromptTuningConfig, name: str) -> tuple[list[str], PromptTuningConfig]:
    conf = getattr(model, "config", None)
    resolved = replace(cfg, token_dim=model.get_input_embeddings().weight.shape[1],
                       num_layers=getattr(conf, "num_hidden_layers", cfg.num_layers),
                       num_attention_heads=getattr(conf, "num_attention_heads", cfg.num_attention_heads))
    encoder_of(model, ENCODER, PromptEncoder).add_adapter(name, resolved, _init_prompt(model, resolved))
    return [ENCODER], resolved


_saved_state, _load_state = peft_single_tensor_format(ENCODER)


def _to_peft(cfg: PromptTuningConfig) -> dict:
    # PEFT rejects TEXT without a tokenizer path; the init only matters before training, so then
    # the text is kept as a record under RANDOM.
    init = cfg.init.upper() if cfg.init != "text" or cfg.tokenizer_name_or_path else "RANDOM"
    return {
        "peft_type": "PROMPT_TUNING", "task_type": "CAUSAL_LM", "num_virtual_tokens": cfg.num_virtual_tokens,
        "token_dim": cfg.token_dim, "num_transformer_submodules": 1, "num_layers": cfg.num_layers,
        "num_attention_heads": cfg.num_attention_heads, "prompt_tuning_init": init,
        "prompt_tuning_init_text": cfg.init_text,
        "tokenizer_name_or_path": cfg.tokenizer_name_or_path if init == "TEXT" else None,
        "tokenizer_kwargs": None, "inference_mode": True, "modules_to_save": None,
    }


def _from_peft(saved: dict) -> PromptTuningConfig:
    if saved.get("task_type") not in (None, "CAUSAL_LM") or saved.get("num_transformer_submodules") not in (None, 1):
        raise ValueError(f"plugtune supports prompt tuning of causal LMs only; this adapter has "
                         f"task_type={saved.get('task_type')!r}, num_transformer_submodules="
                         f"{saved.get('num_transformer_submodules')!r}")
    # The saved prompt replaces any init, so loading never needs the tokenizer: init='random'.
    return PromptTuningConfig(num_virtual_tokens=int(saved["num_virtual_tokens"]), init="random",
                              init_text=saved.get("prompt_tuning_init_text"),
                              tokenizer_name_or_path=saved.get("tokenizer_name_or_path"),
                              token_dim=saved.get("token_dim"), num_layers=saved.get("num_layers"),
                              num_attention_heads=saved.get("num_attention_heads"))


register(AdapterMethod(name="prompt_tuning", config_cls=PromptTuningConfig, attach=attach_prompt_tuning,
                       peft_type="PROMPT_TUNING", to_saved=_to_peft, from_saved=_from_peft,
                       saved_state=_saved_state, load_state=_load_state,
                       examples={"prompt tuning (20 tok)": {"num_virtual_tokens": 20}}))
