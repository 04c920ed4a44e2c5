"""An Ollama Modelfile for an exported GGUF: FROM, the chat template in Ollama's Go-template syntax,
and the stop tokens.

A Jinja chat template cannot be translated in general, so the Modelfile is written for the template
family plugtune ships and trains with, ChatML (`<|im_start|>role\\ncontent<|im_end|>\\n`), and only
after checking, by rendering the model's own template, that it is ChatML, including any default
system prompt it inserts when the conversation has none (SmolLM2's does).
"""
from __future__ import annotations

import re
from pathlib import Path

START, END = "<|im_start|>", "<|im_end|>"


class UnsupportedTemplateError(ValueError):
    """A chat template the Modelfile writer cannot express in Ollama's template syntax."""


def _chatml(messages: list[dict]) -> str:
    return "".join(f"{START}{m['role']}\n{m['content']}{END}\n" for m in messages) + f"{START}assistant\n"


def chatml_default_system(tokenizer) -> str | None:
    """The system prompt the template adds when none is given (None: it adds none). Refuses a template
    that does not render exactly as ChatML."""
    template = getattr(tokenizer, "chat_template", None)
    if not template:
        raise UnsupportedTemplateError("--ollama: the tokenizer has no chat template to write into the Modelfile")
    convo = [{"role": "user", "content": "Q1"}, {"role": "assistant", "content": "A1"},
             {"role": "user", "content": "Q2"}]
    system = [{"role": "system", "content": "S"}]

    def render(messages):
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)

    refusal = UnsupportedTemplateError(
        "--ollama writes Modelfiles for ChatML chat templates (<|im_start|>role ... <|im_end|>); this model's "
        "template is another one. The GGUF itself carries the template (tokenizer.chat_template); write the "
        "Modelfile's TEMPLATE by hand, or drop --ollama")
    if render(system + convo) != _chatml(system + convo):
        raise refusal
    plain = render(convo)
    if plain == _chatml(convo):
        return None
    match = re.fullmatch(re.escape(f"{START}system\n") + r"(.*)" + re.escape(f"{END}\n"),
                         plain[: len(plain) - len(_chatml(convo))], flags=re.S)
    if not plain.endswith(_chatml(convo)) or match is None:
        raise refusal
    return match.group(1)


def ollama_template(default_system: str | None) -> str:
    """ChatML in Ollama's Go template syntax. Ollama gives the system prompt as .System and every turn
    in .Messages (system turns included, which are skipped here since .System carries them)."""
    turns = (f'{{{{ range .Messages }}}}{{{{ if ne .Role "system" }}}}{START}{{{{ .Role }}}}\n'
             f"{{{{ .Content }}}}{END}\n{{{{ end }}}}{{{{ end }}}}{START}assistant\n")
    if default_system is None:
        system = f"{{{{ if .System }}}}{START}system\n{{{{ .System }}}}{END}\n{{{{ end }}}}"
    else:
        system = f"{START}system\n{{{{ if .System }}}}{{{{ .System }}}}{{{{ else }}}}{default_system}{{{{ end }}}}{END}\n"
    return system + turns


def modelfile_text(gguf_file: str, tokenizer) -> str:
    default_system = chatml_default_system(tokenizer)
    template = ollama_template(default_system)
    if '"""' in template or "{{" in (default_system or ""):
        raise UnsupportedTemplateError("--ollama: the default system prompt contains characters a Modelfile "
                                       "template cannot quote (\"\"\" or {{); write the Modelfile by hand")
    stops = [END] + [t for t in (getattr(tokenizer, "eos_token", None),) if t and t != END]
    lines = [f"FROM ./{gguf_file}", f'TEMPLATE """{template}"""']
    lines += [f'PARAMETER stop "{s}"' for s in stops]
    return "\n".join(lines) + "\n"


def modelfile_path(gguf_out: Path) -> Path:
    return gguf_out.with_name(gguf_out.stem + ".Modelfile")
