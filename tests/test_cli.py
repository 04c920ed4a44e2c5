"""End to end on the tiny model: plugtune train -> generate -> eval, full fine-tuning and LoRA."""
import copy
import json
import math
import shutil
import subprocess
import sys

import pytest
import torch

from plugtune.cli import main


@pytest.fixture
def data_file(tmp_path):
    rows = [{"messages": [{"role": "user", "content": f"what is {i}"}, {"role": "assistant", "content": f"{i % 7}"}]}
            for i in range(24)]
    path = tmp_path / "train.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def train_args(model_dir, data_file, out, *extra):
    return ["train", "lora_sft", f"model.name={model_dir}", f"data.train={data_file}", f"data.eval={data_file}",
            f"output.dir={out}", "training.max_steps=4", "training.batch_size=4", "training.grad_accum=1",
            "training.eval_every=2", "training.save_every=2", "training.progress=false", "training.epochs=1", *extra]


def test_train_generate_eval_with_lora(tmp_path, tiny_model_dir, data_file, capsys):
    out = tmp_path / "run"
    assert main(train_args(tiny_model_dir, data_file, out, "adapter.r=4", "training.lr=1e-2")) == 0
    report = json.loads((out / "train_report.json").read_text())
    assert report["steps"] == 4 and report["trainable_params"] > 0
    adapter = out / "adapter"
    assert {p.name for p in adapter.iterdir()} >= {"adapter_config.json", "adapter_model.safetensors"}
    assert (out / "loss_curve.png").is_file() and (out / "metrics.jsonl").is_file()
    assert [p.name for p in (out / "checkpoints").iterdir()] == ["step-0000002", "step-0000004"]
    capsys.readouterr()

    assert main(["generate", "--model", str(tiny_model_dir), "--adapter", str(adapter), "--prompt", "what is 3",
                 "--max-new-tokens", "5", "--json"]) == 0
    line = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    reference, tok = peft_reference(tiny_model_dir, adapter)
    assert line == {"prompt": "what is 3", "output": hf_greedy(reference, tok, "what is 3", 5), "adapter": "default"}
    # After 4 steps the chat answer is often empty (the end of turn comes first); a plain continuation is not.
    assert main(["generate", "--model", str(tiny_model_dir), "--adapter", str(adapter), "--prompt", "what is 3",
                 "--max-new-tokens", "5", "--raw"]) == 0
    raw = hf_greedy(reference, tok, "what is 3", 5, chat=False)
    assert capsys.readouterr().out.splitlines()[-1] == raw and raw.strip()

    def sampled(*options):
        assert main(["generate", "--model", str(tiny_model_dir), "--prompt", "hi", "--max-new-tokens", "8", "--raw",
                     "--json", *options]) == 0
        return json.loads(capsys.readouterr().out.strip().splitlines()[-1])["output"]

    from transformers import AutoModelForCausalLM

    greedy = sampled()
    assert greedy == hf_greedy(AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval(), tok, "hi", 8, chat=False)
    sample = lambda seed: sampled("--temperature", "0.8", "--top-p", "0.9", "--seed", str(seed))
    first = sample(1)
    assert first.strip() and sample(1) == first  # a seed fixes the sample
    others = {sample(2), sample(3)}
    assert others - {first} and (others | {first}) - {greedy}  # the seed matters, and sampling is not greedy

    assert main(["eval", "--model", str(tiny_model_dir), "--adapter", str(adapter), "--data", str(data_file),
                 "--exact-match", "--max-new-tokens", "3", "--limit", "8"]) == 0
    result = json.loads(capsys.readouterr().out)
    rows = [json.loads(l) for l in data_file.read_text().splitlines()[:8]]
    answers = [hf_greedy(reference, tok, r["messages"][0]["content"], 3) for r in rows]
    correct = sum(a.strip() == r["messages"][1]["content"] for a, r in zip(answers, rows))
    assert (result["total"], result["correct"], result["exact_match"]) == (8, correct, correct / 8)
    # The loss: PEFT's model on the same 8 examples in one batch, mean over the supervised tokens.
    from plugtune.data import collate, load_examples, tokenize_dataset

    items, _ = tokenize_dataset(tok, load_examples(data_file)[:8], 512)
    with torch.no_grad():
        loss = reference(**collate(items, tok.pad_token_id)).loss.item()
    assert result["loss"] == pytest.approx(loss, rel=1e-4)
    assert result["perplexity"] == pytest.approx(math.exp(loss), rel=1e-4)


def peft_reference(model_dir, adapter):
    """The trained adapter loaded by PEFT onto the base loaded by transformers: an independent reader."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    return PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(model_dir), adapter).eval(), tok


def hf_greedy(model, tok, user: str, max_new_tokens: int, chat: bool = True) -> str:
    """transformers' own greedy generate on the chat prompt (or the plain text), stopping at the end of the turn."""
    if chat:
        text = tok.apply_chat_template([{"role": "user", "content": user}], tokenize=False, add_generation_prompt=True)
        enc = tok(text, add_special_tokens=False, return_tensors="pt")
    else:
        enc = tok(user, add_special_tokens=True, return_tensors="pt")
    stops = [tok.convert_tokens_to_ids(t) for t in ("<|im_end|>", "<|endoftext|>")]
    with torch.no_grad():
        out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=stops,
                             pad_token_id=tok.pad_token_id)
    return tok.decode(out[0, enc["input_ids"].shape[1]:], skip_special_tokens=True)


def test_resume_after_finished_run_is_a_no_op_and_keeps_checkpoints(tmp_path, tiny_model_dir, data_file):
    out = tmp_path / "run"
    assert main(train_args(tiny_model_dir, data_file, out)) == 0
    before = sorted(p.name for p in (out / "checkpoints").iterdir())
    assert main(train_args(tiny_model_dir, data_file, out)) == 0  # resume=auto finds the final checkpoint
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == before


def test_full_finetune_writes_a_plain_transformers_model(tmp_path, tiny_model_dir, data_file):
    from transformers import AutoModelForCausalLM

    out = tmp_path / "full"
    assert main(train_args(tiny_model_dir, data_file, out, "method=full", "adapter=null", "training.lr=1e-3")) == 0
    model = AutoModelForCausalLM.from_pretrained(out / "model")
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    changed = [n for (n, p), (_, q) in zip(model.named_parameters(), base.named_parameters()) if not torch.equal(p, q)]
    assert len(changed) == len(list(base.named_parameters()))  # every parameter trained


def test_bad_inputs_give_one_clear_error(tmp_path, tiny_model_dir, data_file, capsys):
    assert main(train_args(tiny_model_dir, data_file, tmp_path / "x", "training.seeed=1")) == 2
    assert "Did you mean 'seed'" in capsys.readouterr().err
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a", "completion": "b"}\n{"prompt": "a"}\n')
    assert main(train_args(tiny_model_dir, bad, tmp_path / "y")) == 2
    assert "bad.jsonl:2: missing field 'completion'" in capsys.readouterr().err
    assert main(["generate", "--model", "HuggingFaceTB/SmolLM2-1.7B", "--prompt", "hi"]) == 2
    assert "never downloads" in capsys.readouterr().err


def test_console_script_is_installed(tiny_model_dir, capsys):
    script = shutil.which("plugtune")
    assert script, "the `plugtune` console script is not on PATH: pip install -e ."
    help_text = subprocess.run([script, "--help"], capture_output=True, text=True, check=True).stdout
    assert help_text.startswith("usage: plugtune ")
    for command in ("train", "generate", "chat", "eval", "demo", "merge", "adapters", "serve", "compare"):
        assert command in help_text
    # A real command through the script gives what main() gives in this process.
    args = ["generate", "--model", str(tiny_model_dir), "--prompt", "hi", "--max-new-tokens", "4", "--raw", "--json"]
    run = subprocess.run([script, *args], capture_output=True, text=True, check=True)
    assert main(args) == 0
    assert json.loads(run.stdout.splitlines()[-1]) == json.loads(capsys.readouterr().out.splitlines()[-1])
    # main()'s return value is the script's exit status: bad input is status 2 and one line on stderr.
    bad = subprocess.run([script, "generate", "--model", "HuggingFaceTB/SmolLM2-1.7B", "--prompt", "hi"],
                         capture_output=True, text=True)
    assert bad.returncode == 2 and bad.stderr.startswith("plugtune generate: error: ") and "never downloads" in bad.stderr


def test_chat_keeps_the_conversation(tmp_path, tiny_model_dir, monkeypatch, capsys):
    import io

    import plugtune.api

    seen, replies = [], []  # each turn's conversation as generate received it (copied: the command appends to
    # it later), and what generate answered
    load = plugtune.api.load

    def spying_load(*args, **kwargs):
        lm = load(*args, **kwargs)
        generate = lm.generate

        def spy(prompts, *rest, **kw):
            seen.append(copy.deepcopy(prompts))
            replies.append(generate(prompts, *rest, **kw)[0])
            return [replies[-1]]

        lm.generate = spy
        return lm

    monkeypatch.setattr(plugtune.api, "load", spying_load)
    monkeypatch.setattr(sys, "stdin", io.StringIO("hello\nwhat is 3\n/reset\nwhat is 4\n/exit\n"))
    assert main(["chat", "--model", str(tiny_model_dir), "--max-new-tokens", "3", "--system", "be brief"]) == 0
    printed = capsys.readouterr().out
    system, user = {"role": "system", "content": "be brief"}, lambda c: {"role": "user", "content": c}
    assert seen == [
        [[system, user("hello")]],
        # The second turn is given the first turn and the reply the user saw.
        [[system, user("hello"), {"role": "assistant", "content": replies[0]}, user("what is 3")]],
        [[system, user("what is 4")]],  # /reset keeps the system prompt only
    ]
    assert [f"assistant> {r}" in printed for r in replies] == [True] * 3
    assert printed.count("assistant> ") == 3
