"""Distributed training on CPU with gloo, 2 processes: the same loss trajectory and the same saved
weights as one process with the same global batch (DDP and FSDP2), exact resume, only rank 0 writes,
only trainable gradients travel; and, in one process, that the data shards add up to the batch."""
import json
import multiprocessing as mp
import os
import shutil
import socket
import subprocess
import sys
import traceback
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import plugtune
from plugtune.adapters import attach_adapter
from plugtune.config import load_run_config
from plugtune.data.tokenize import IGNORE_INDEX
from plugtune.training.engine.distributed import Distributed, GradSync, shard_batch

ROOT = Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------- launching ranks


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _child(fn, rank: int, world: int, port: int, args: tuple) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port), OMP_NUM_THREADS="1")
    torch.set_num_threads(1)
    try:
        fn(rank, *args)
    except BaseException:
        traceback.print_exc()
        sys.stderr.flush()
        os._exit(1)
    sys.stdout.flush()
    os._exit(0)


def run_ranks(fn, *args, world: int = 2, timeout: float = 300) -> None:
    """fn(rank, *args) in `world` forked processes joined in one gloo group (forked: no re-import)."""
    ctx = mp.get_context("fork")
    port = free_port()
    procs = [ctx.Process(target=_child, args=(fn, r, world, port, args)) for r in range(world)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout)
    codes = [p.exitcode for p in procs]
    for p in procs:
        if p.is_alive():
            p.kill()
    assert codes == [0] * world, f"rank exit codes {codes} (tracebacks above)"


WRITES = ("os.mkdir", "os.rename", "os.replace", "os.remove", "os.rmdir", "shutil.rmtree", "os.truncate")


def audited_train(rank: int, overrides: list[str], audit_dir: Path) -> None:
    """train() with every file-system write under output.dir recorded (Python's audit hooks: opens for
    writing, mkdir, rename, remove; safetensors' own writes happen inside directories these cover)."""
    out = str(Path(next(o for o in overrides if o.startswith("output.dir=")).split("=", 1)[1]).resolve())
    seen: list[str] = []

    def hook(event, args):
        if event == "open" and args and isinstance(args[0], (str, bytes, os.PathLike)):
            mode = args[1] if len(args) > 1 and isinstance(args[1], str) else "r"
            if any(c in mode for c in "wax+") and os.path.abspath(os.fsdecode(args[0])).startswith(out):
                seen.append(f"open {args[0]}")
        elif event in WRITES and args and isinstance(args[0], (str, bytes, os.PathLike)):
            if os.path.abspath(os.fsdecode(args[0])).startswith(out):
                seen.append(f"{event} {args[0]}")

    sys.addaudithook(hook)
    plugtune.train(load_run_config(None, overrides))
    (audit_dir / f"rank{rank}.json").write_text(json.dumps(seen))


# ---------------------------------------------------------------- data and configs


@pytest.fixture(scope="module")
def sft_data(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("data") / "sft.jsonl"
    rows = [{"instruction": f"say {i} twice " + "x " * (i % 5), "output": f"{i} {i} " + "y " * (i % 7)} for i in range(24)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def sft(model_dir, data, out, *extra) -> list[str]:
    return [f"model.name={model_dir}", f"data.train={data}", f"output.dir={out}", "method=lora", "adapter.r=4",
            "adapter.dropout=0", "training.max_steps=4", "training.batch_size=4", "training.grad_accum=2",
            "training.lr=1e-2", "training.warmup_steps=0", "training.progress=false", "training.save_every=2",
            "training.keep_checkpoints=3", *extra]


def losses(out: Path, key: str = "loss") -> list[float]:
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [r[key] for r in lines if r["kind"] == "train"]


def assert_same_trajectory(a: Path, b: Path) -> None:
    """Loss and gradient norm of every step (the norm would show a mean over ranks instead of a sum:
    AdamW's update barely changes when all gradients are scaled alike)."""
    assert losses(b) == pytest.approx(losses(a), rel=1e-5)
    assert losses(b, "grad_norm") == pytest.approx(losses(a, "grad_norm"), rel=1e-4)


def assert_same_tensors(a: Path, b: Path, exact: bool = False) -> None:
    """Exact, or up to the rounding of sums taken in another order: AdamW divides by sqrt(v), so an
    entry whose gradient nearly cancels over the batch can move by ~1e-5 of a 1e-2 learning rate."""
    ta, tb = load_file(str(a)), load_file(str(b))
    assert sorted(ta) == sorted(tb)
    for k in ta:
        if exact:
            assert torch.equal(ta[k], tb[k]), k
        else:
            torch.testing.assert_close(ta[k], tb[k], rtol=1e-3, atol=1e-4, msg=lambda m: f"{k}: {m}")


# ---------------------------------------------------------------- tests with processes


def test_torchrun_ddp_lora_equals_one_process(tmp_path, tiny_model_dir, sft_data):
    """The documented command, `torchrun --nproc-per-node 2 -m plugtune train ...`, against one process."""
    one, two = tmp_path / "one", tmp_path / "two"
    args = lambda out: sft(tiny_model_dir, sft_data, out, "data.eval=", "adapter.target_modules=[q_proj,v_proj]")
    plugtune.train(load_run_config("lora_sft", args(one)))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", str(free_port()),
           "-m", "plugtune", "train", "lora_sft", *args(two)]
    done = subprocess.run(cmd, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "DDP over 2 processes: 8 trainable tensors" in done.stdout
    assert_same_trajectory(one, two)
    assert_same_tensors(one / "adapter" / "adapter_model.safetensors", two / "adapter" / "adapter_model.safetensors")
    assert_same_tensors(one / "checkpoints" / "step-0000002" / "trainable.safetensors",
                        two / "checkpoints" / "step-0000002" / "trainable.safetensors")


def test_ddp_resume_is_exact_and_only_rank0_writes(tmp_path, tiny_model_dir, sft_data):
    """Dropout on: each rank's random state must be saved and restored for the resumed run to be exact.
    Packed SFT batches (whole examples per rank)."""
    full, cut = tmp_path / "full", tmp_path / "cut"
    audit = tmp_path / "audit"
    audit.mkdir()
    args = lambda out: sft(tiny_model_dir, sft_data, out, "adapter.dropout=0.1", "data.packing=true")
    run_ranks(audited_train, args(full), audit)
    rank0, rank1 = (json.loads((audit / f"rank{r}.json").read_text()) for r in (0, 1))
    assert rank1 == [], rank1
    assert any("metrics.jsonl" in w for w in rank0) and any("step-0000004" in w for w in rank0)
    # A run stopped after the step-2 checkpoint: what it leaves behind, then resumed by both ranks.
    shutil.copytree(full, cut)
    for name in ("checkpoints/step-0000004", "adapter", "train_report.json"):
        shutil.rmtree(cut / name) if (cut / name).is_dir() else (cut / name).unlink()
    run_ranks(audited_train, args(cut), audit)
    assert json.loads((audit / "rank1.json").read_text()) == []
    assert losses(cut) == losses(full)
    assert_same_tensors(full / "adapter" / "adapter_model.safetensors", cut / "adapter" / "adapter_model.safetensors",
                        exact=True)
    rng = torch.load(cut / "checkpoints" / "step-0000004" / "rng.pt", weights_only=False)
    assert len(rng["ranks"]) == 2 and not torch.equal(rng["ranks"][0]["torch"], rng["ranks"][1]["torch"])


@pytest.mark.parametrize("method", ["full", "lora"])
def test_fsdp_equals_one_process_and_resumes(tmp_path, tiny_model_dir, sft_data, method):
    """FSDP2 (fully_shard) on gloo: full fine-tuning of a model with tied embeddings, and LoRA."""
    extra = ["method=full", "adapter=null", "training.lr=1e-3"] if method == "full" else []
    one, two, cut = tmp_path / "one", tmp_path / "two", tmp_path / "cut"
    plugtune.train(load_run_config(None, sft(tiny_model_dir, sft_data, one, *extra)))
    audit = tmp_path / "audit"
    audit.mkdir()
    run_ranks(audited_train, sft(tiny_model_dir, sft_data, two, *extra, "training.distributed=fsdp"), audit)
    assert json.loads((audit / "rank1.json").read_text()) == []
    assert_same_trajectory(one, two)
    artifact = "model/model.safetensors" if method == "full" else "adapter/adapter_model.safetensors"
    assert_same_tensors(one / artifact, two / artifact)
    # Resume from the step-2 checkpoint (full tensors, sharded again on load, optimizer state too).
    shutil.copytree(two, cut)
    shutil.rmtree(cut / "checkpoints" / "step-0000004")
    run_ranks(audited_train, sft(tiny_model_dir, sft_data, cut, *extra, "training.distributed=fsdp"), audit)
    assert losses(cut) == pytest.approx(losses(two), rel=1e-6)
    assert_same_tensors(two / artifact, cut / artifact)


@pytest.mark.parametrize("objective", ["dpo", "reward"])
def test_pair_objectives_under_ddp_equal_one_process(tmp_path, tiny_model_dir, objective):
    """Pair batches are shared by pairs; DPO's reference is the policy with its adapter off on each rank."""
    pairs = tmp_path / "pairs.jsonl"
    words = ["red", "green", "blue", "fox", "dog", "yes", "no", "fine"]
    pairs.write_text("".join(json.dumps({"prompt": f"pick {i} {words[i % 8]}", "chosen": f"{words[(i * 3) % 8]} ok",
                                         "rejected": f"{words[(i * 5 + 1) % 8]} {words[i % 3]} no"}) + "\n"
                             for i in range(12)))
    args = lambda out, *extra: [f"objective={objective}", f"model.name={tiny_model_dir}", f"data.train={pairs}",
                                f"output.dir={out}", "adapter.r=4", "adapter.dropout=0", "training.max_steps=3",
                                "training.batch_size=3", "training.grad_accum=2", "training.lr=1e-2",
                                "training.progress=false", *extra]
    one, two, audit = tmp_path / "one", tmp_path / "two", tmp_path / "audit"
    audit.mkdir()
    plugtune.train(load_run_config(None, args(one)))
    run_ranks(audited_train, args(two), audit)
    assert_same_trajectory(one, two)
    artifact = "adapter" if objective == "dpo" else "reward_model"
    assert_same_tensors(one / artifact / "adapter_model.safetensors", two / artifact / "adapter_model.safetensors")
    if objective == "reward":  # the head's bias is not compared: its gradient is 0 up to rounding (r_c - r_r)
        torch.testing.assert_close(load_file(str(one / artifact / "reward_head.safetensors"))["weight"],
                                   load_file(str(two / artifact / "reward_head.safetensors"))["weight"],
                                   rtol=1e-4, atol=1e-5)


def _sync_grads(rank: int, result: Path) -> None:
    from plugtune.models.tiny import build_model

    d = Distributed.from_env("ddp")
    model = build_model("llama", 400)
    attach_adapter(model, "lora", {"r": 4})
    trainable = [p for p in model.parameters() if p.requires_grad]
    sync = GradSync(list(model.parameters()), d)
    for i, p in enumerate(trainable):
        if i == 0 and rank == 0 or i == 1:
            p.grad = None  # param 0: a gradient on rank 1 only; param 1: on no rank
        else:
            p.grad = torch.full_like(p, rank + 1.0)
    sync()
    if rank == 0:
        result.write_text(json.dumps({
            "synced": len(sync.params), "trainable": len(trainable), "bytes": sync.bytes_per_step,
            "trainable_bytes": sum(p.numel() * 4 for p in trainable),
            "frozen_synced": sum(not p.requires_grad for p in sync.params),
            "grad0": trainable[0].grad.unique().tolist(), "grad1_none": trainable[1].grad is None,
            "grad2": trainable[2].grad.unique().tolist()}))
    d.close()


def test_only_trainable_gradients_are_summed(tmp_path):
    result = tmp_path / "sync.json"
    run_ranks(_sync_grads, result)
    got = json.loads(result.read_text())
    assert got["synced"] == got["trainable"] == 16 and got["frozen_synced"] == 0
    assert got["bytes"] == got["trainable_bytes"]  # the frozen base (the bulk of the model) never travels
    assert got["grad0"] == [2.0]  # rank 1's alone
    assert got["grad1_none"] is True  # none on any rank: stays None, as in one process
    assert got["grad2"] == [3.0]  # 1 + 2: a sum, not a mean (each rank's loss is its part of the global mean)


def test_grpo_under_ddp_runs_and_resumes_exactly(tmp_path, tiny_model_dir, monkeypatch):
    """Each rank generates its own prompt groups; each rank's rollout buffer is in the checkpoint."""
    from plugtune.inference.verifiers import REWARD_FUNCTIONS

    monkeypatch.setitem(REWARD_FUNCTIONS, "length", lambda prompts, completions: [len(c) / 10 for c in completions])
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in ["hello world", "convert date", "tell me",
                                                                          "the quick brown fox"]))
    args = lambda out: ["objective=grpo", f"model.name={tiny_model_dir}", f"data.train={prompts}",
                        f"output.dir={out}", "training.max_steps=4", "training.save_every=1", "training.progress=false",
                        "training.keep_checkpoints=4", "rollout.prompts_per_step=2", "rollout.samples_per_prompt=2",
                        "rollout.max_new_tokens=4", "rollout.minibatches=2", "rollout.reward_functions=[length]"]
    full, cut, audit = tmp_path / "full", tmp_path / "cut", tmp_path / "audit"
    audit.mkdir()
    run_ranks(audited_train, args(full), audit)
    assert json.loads((audit / "rank1.json").read_text()) == []
    saved = torch.load(full / "checkpoints" / "step-0000003" / "components.pt", weights_only=False)["ranks"]
    prompts_of = lambda r: saved[r]["source"]["buffer"]["input_ids"].tolist()
    assert len(prompts_of(0)) == len(prompts_of(1)) == 2 and prompts_of(0) != prompts_of(1)  # one group each
    shutil.copytree(full, cut)  # stopped after step 3: mid-rollout (2 steps per rollout)
    shutil.rmtree(cut / "checkpoints" / "step-0000004")
    run_ranks(audited_train, args(cut), audit)
    assert losses(cut) == losses(full)
    assert_same_tensors(full / "adapter" / "adapter_model.safetensors", cut / "adapter" / "adapter_model.safetensors",
                        exact=True)


# ---------------------------------------------------------------- shards add up (one process)


def _loss_and_grads(model, objective, batches, units):
    model.zero_grad()
    total = 0.0
    for b in batches:
        loss, _ = objective(model, b)
        loss = {"loss": loss} if not isinstance(loss, dict) else loss
        value = sum(v / units[k] for k, v in loss.items())
        value.backward()
        total += float(value.detach())
    return total, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _check_shards_add_up(model, objective, batch, paired=False, world=3):
    keyed = lambda u: u if isinstance(u, dict) else {"loss": u}
    units = keyed(objective.units(batch))
    whole, grads = _loss_and_grads(model, objective, [batch], units)
    shards = [shard_batch(batch, r, world, paired) for r in range(world)]
    shard_units: dict = {}
    for s in shards:
        for k, n in keyed(objective.units(s)).items():
            shard_units[k] = shard_units.get(k, 0) + n
    assert shard_units == units
    parts, part_grads = zip(*(_loss_and_grads(model, objective, [s], units) for s in shards))
    assert sum(parts) == pytest.approx(whole, rel=1e-5)
    for n, g in grads.items():
        torch.testing.assert_close(sum(pg[n] for pg in part_grads if n in pg), g, rtol=1e-4, atol=1e-6, msg=n)
    return shards


def _items(n, seed=0, vocab=400):
    from plugtune.data.tokenize import Tokenized

    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        ids = torch.randint(3, vocab, (5 + (i * 7) % 9,), generator=g).tolist()
        out.append(Tokenized(ids, [IGNORE_INDEX] * (1 + i % 3) + ids[1 + i % 3:]))
    return out


def test_padded_and_packed_sft_shards_add_up(tiny_llama):
    from plugtune.data.batching import collate
    from plugtune.data.packing import collate_packed
    from plugtune.training.compute.next_token import CausalLMObjective

    attach_adapter(tiny_llama, "lora", {"r": 4})
    items = _items(7)
    shards = _check_shards_add_up(tiny_llama, CausalLMObjective(), collate(items, 0))
    assert [s["input_ids"].shape[0] for s in shards] == [3, 2, 2]
    assert shards[1]["input_ids"].shape[1] < 13  # padding trimmed to the shard's longest row
    packed = collate_packed(items, 0, 32)
    shards = _check_shards_add_up(tiny_llama, CausalLMObjective(), packed)
    assert all("position_ids" in s and "attention_mask" not in s for s in shards)
    flat = {"input_ids": torch.tensor([sum((it.input_ids for it in items), [])]),  # one row, no padding
            "position_ids": torch.tensor([[i for it in items for i in range(len(it.input_ids))]]),
            "labels": torch.tensor([sum(([IGNORE_INDEX] + it.labels[1:] for it in items), [])])}
    shards = _check_shards_add_up(tiny_llama, CausalLMObjective(), flat)
    assert [s["input_ids"].shape[0] for s in shards] == [1, 1, 1]
    assert sum(s["input_ids"].shape[1] for s in shards) == flat["input_ids"].shape[1]


def test_pair_shards_keep_pairs_together(tiny_llama):
    """DPO and reward batches: rows i and B+i are one pair and go to the same rank, with their margin."""
    from plugtune.config import DPOConfig, RewardConfig
    from plugtune.data.preference import TokenizedPair
    from plugtune.models.heads import attach_head
    from plugtune.training.recipes.dpo import PreferenceObjective, collate_referenced
    from plugtune.training.recipes.reward_model import RewardObjective

    attach_adapter(tiny_llama, "lora", {"r": 4})
    pairs = []
    for it in _items(5, seed=1):
        prompt, rest = it.input_ids[:3], it.input_ids[3:]
        pairs.append(TokenizedPair(prompt + rest, [IGNORE_INDEX] * 3 + rest,
                                   prompt + rest[::-1] + [7], [IGNORE_INDEX] * 3 + rest[::-1] + [7], 3))
    batch = collate_referenced(pairs, 0)
    shards = _check_shards_add_up(tiny_llama, PreferenceObjective(DPOConfig()), batch, paired=True)
    assert [s["input_ids"].shape[0] for s in shards] == [4, 4, 2]  # pairs 0,3 | 1,4 | 2: chosen then rejected
    assert torch.equal(shards[1]["input_ids"][0, :3], shards[1]["input_ids"][2, :3])
    attach_head(tiny_llama, "reward_head")
    batch["margin"] = torch.arange(5, dtype=torch.float32)
    shards = _check_shards_add_up(tiny_llama, RewardObjective(RewardConfig()), batch, paired=True)
    assert shards[1]["margin"].tolist() == [1.0, 4.0]


def test_multitask_shards_add_up_per_adapter(tiny_llama):
    """Mixed-adapter batches: adapter_names is cut with the rows; each adapter's loss is normalised by
    its own tokens over all ranks (a rank may hold no row of some adapter)."""
    from plugtune.adapters.layers import mark_trainable
    from plugtune.data.batching import collate
    from plugtune.training.recipes.multitask import MultiTaskLMObjective

    for name in ("a", "b"):
        attach_adapter(tiny_llama, "lora", {"r": 4}, name=name, trainable=False)
    mark_trainable(tiny_llama, ["a", "b"])
    batch = {**collate(_items(5, seed=2), 0), "adapter_names": ["a", "a", "b", "a", "b"]}
    shards = _check_shards_add_up(tiny_llama, MultiTaskLMObjective(), batch, world=2)
    assert [s["adapter_names"] for s in shards] == [["a", "b", "b"], ["a", "a"]]

