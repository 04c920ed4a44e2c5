"""Data-parallel training on torch.distributed: DDP-style replicas or FSDP2 shards, one loop.

    torchrun --nproc-per-node 4 -m plugtune train lora_sft data.train=my.jsonl

`Distributed.from_env` reads torchrun's RANK / WORLD_SIZE / LOCAL_RANK (nccl on CUDA, gloo on CPU).

Gradient synchronisation (training.distributed=ddp, the default when WORLD_SIZE > 1). The objectives
call the backbone and the LM head of the *inner* model (`hidden_states(model, ...)`, `lm_head(model)`),
never `model.forward`, so a DistributedDataParallel wrapper would never see a forward and its reducer
would never fire. Instead the loop keeps the model unwrapped and, after the backward of the step's
last micro-batch, `GradSync` sums every trainable gradient across ranks in flat buckets (one
all_reduce per ~25 MB). Only parameters with requires_grad are in it: with an adapter on a frozen
base only the adapter's gradients travel. Why a sum, not DDP's mean: the loop divides each rank's
summed loss by the step's *global* units (supervised tokens, pairs, ... all-gathered before the
forward, one small collective per step), so rank r's loss is its part of the global mean and the
global gradient is the sum of the ranks' gradients, exactly as one process with the whole batch.
What this gives up against DDP: overlapping the all_reduce with the backward. For adapters the
gradients are small; for large full fine-tuning use FSDP, which overlaps its reduce-scatters.

FSDP2 (training.distributed=fsdp): `fully_shard` on every decoder layer and on the backbone (the
root), the LM head its own unit when it is not tied to the input embedding; a tied head reads the
embedding's gathered weight during the step (`_TiedHead`). Gradients are summed (divide factor 1)
for the same reason as above. Parameters FSDP does not manage (scalar heads) go through GradSync.
Checkpoints and artifacts hold full tensors: each sharded parameter is gathered (`full_tensor`),
rank 0 writes; so DDP and FSDP checkpoints are the same files. Rollout objectives (PPO, GRPO) are
refused under FSDP: every rank must run the same forwards, and generation lengths differ by rank.

Data: `ShardedSource` gives rank r its share of every *global* micro-batch (rows r::world, pairs
r::world for pair batches, whole examples of packed rows), so the step's examples, its loss and its
update equal one process with the same global batch_size x grad_accum. A source may shard itself
instead (`shard(dist)`: rollouts generate each rank's share, recipes/rollouts.py).
"""
from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch import nn

from plugtune.data.packing import collate_packed
from plugtune.data.tokenize import IGNORE_INDEX, Tokenized
from plugtune.models.causal_lm import backbone

BUCKET_BYTES = 25 * 2**20  # like DDP's default bucket_cap_mb


def is_dtensor(t) -> bool:
    from torch.distributed.tensor import DTensor

    return isinstance(t, DTensor)


@dataclass
class Distributed:
    """This process's place in the job. world == 1: a plain single-process run, every call a no-op."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    mode: str = "none"  # none | ddp | fsdp
    owns_group: bool = False  # this object initialised the process group (and destroys it)
    mesh: object = field(default=None, repr=False)
    device: str = "cpu"  # where small collective tensors live (the GPU for nccl)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world > 1

    @classmethod
    def from_env(cls, mode: str = "auto", device: torch.device | None = None) -> Distributed:
        """From torchrun's environment; WORLD_SIZE unset or 1 gives a single process (mode 'fsdp' too)."""
        if mode not in ("auto", "ddp", "fsdp"):
            raise ValueError(f"training.distributed={mode!r} is not one of auto, ddp, fsdp")
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world <= 1:
            return cls()
        rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
        owns = not dist.is_initialized()
        cuda = device is not None and device.type == "cuda"
        if owns:
            dist.init_process_group("nccl" if cuda else "gloo", device_id=device if cuda else None)
        mesh = None
        if mode == "fsdp":
            from torch.distributed.device_mesh import init_device_mesh

            mesh = init_device_mesh("cuda" if cuda else "cpu", (world,))
        small = str(device) if cuda and dist.get_backend() == "nccl" else "cpu"
        return cls(rank, world, local_rank, "fsdp" if mode == "fsdp" else "ddp", owns, mesh, small)

    def barrier(self) -> None:
        if self.active:
            dist.barrier()

    def close(self) -> None:
        if self.owns_group and dist.is_initialized():
            dist.destroy_process_group()

    def gather_objects(self, obj) -> list:
        """Every rank's `obj`, in rank order (pickled; for small host-side values)."""
        if not self.active:
            return [obj]
        out = [None] * self.world
        dist.all_gather_object(out, obj)
        return out

    def broadcast_object(self, obj):
        """Rank 0's `obj` on every rank."""
        if not self.active:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def global_units(self, units: dict[str, int], same_keys: bool = False) -> dict[str, int]:
        """Per-key units summed over ranks. `same_keys` (every rank has exactly these keys, e.g. the
        objective counts one plain number): one all_reduce. Otherwise (keys per adapter, and a rank may
        hold no row of some adapter) the dicts are gathered; keys in first-seen rank order."""
        if not self.active:
            return units
        if same_keys:
            counts = torch.tensor(list(units.values()), dtype=torch.int64, device=self.device)
            dist.all_reduce(counts)
            return dict(zip(units, counts.tolist()))
        total: dict[str, int] = {}
        for part in self.gather_objects(units):
            for k, n in part.items():
                total[k] = total.get(k, 0) + n
        return total

    def sum_(self, t: torch.Tensor) -> torch.Tensor:
        if self.active:
            dist.all_reduce(t)
        return t


def _buckets(tensors: list[torch.Tensor], cap: int = BUCKET_BYTES) -> list[list[int]]:
    """Indices of `tensors` in buckets of one dtype and device, each up to `cap` bytes."""
    buckets: list[list[int]] = []
    open_: dict[tuple, tuple[list[int], int]] = {}
    for i, t in enumerate(tensors):
        key = (t.dtype, t.device)
        members, size = open_.get(key, ([], 0))
        if members and size + t.numel() * t.element_size() > cap:
            buckets.append(members)
            members, size = [], 0
        members.append(i)
        open_[key] = (members, size + t.numel() * t.element_size())
    buckets += [m for m, _ in open_.values() if m]
    return buckets


class GradSync:
    """Sums the gradients of `params` (trainable, not sharded by FSDP) across ranks after the backward.

    A parameter without a gradient on some ranks (an adapter no row of the shard used) gets the sum of
    the others; one that has none on any rank keeps grad None, as in one process (the optimizer then
    skips it). The has-gradient flags ride in the first bucket, so a step costs one all_reduce per bucket."""

    def __init__(self, params: list[nn.Parameter], d: Distributed):
        seen: set[int] = set()
        self.params = [p for p in params if p.requires_grad and not is_dtensor(p)
                       and not (id(p) in seen or seen.add(id(p)))]
        self.d = d
        self.bytes_per_step = sum(p.numel() * p.element_size() for p in self.params)
        self.buckets = _buckets([p.detach() for p in self.params])

    def __call__(self) -> None:
        if not self.d.active or not self.params:
            return
        flags = torch.tensor([p.grad is not None for p in self.params], dtype=torch.float32)
        for k, bucket in enumerate(self.buckets):
            grads = [self.params[i].grad if self.params[i].grad is not None else torch.zeros_like(self.params[i])
                     for i in bucket]
            parts = [g.reshape(-1) for g in grads]
            if k == 0:
                parts.append(flags.to(device=grads[0].device, dtype=grads[0].dtype))
            flat = torch.cat(parts)
            dist.all_reduce(flat)
            if k == 0:
                flags = flat[-len(self.params):].cpu()
            at = 0
            for i, g in zip(bucket, grads):
                p, n = self.params[i], g.numel()
                p.grad = flat[at:at + n].view_as(p).clone() if p.grad is None else p.grad.copy_(flat[at:at + n].view_as(p))
                at += n
        for p, has in zip(self.params, flags.tolist()):
            if not has:
                p.grad = None

    def broadcast_params(self) -> None:
        """Start every rank from rank 0's trainable weights (they are equal already when seeded alike)."""
        if not self.d.active:
            return
        with torch.no_grad():
            for bucket in self.buckets:
                flat = torch.cat([self.params[i].detach().reshape(-1) for i in bucket])
                dist.broadcast(flat, 0)
                at = 0
                for i in bucket:
                    p = self.params[i]
                    p.copy_(flat[at:at + p.numel()].view_as(p))
                    at += p.numel()


# ---------------------------------------------------------------- data shards


def shard_batch(batch: dict, rank: int, world: int, paired: bool = False) -> dict | None:
    """Rank `rank`'s share of one global micro-batch, padding trimmed; None when the share is empty.

    Padded batches: rows rank::world. Pair batches (rows i and B+i are one pair): pairs rank::world.
    Packed rows (position_ids, no attention_mask): whole examples rank::world, packed again. Every
    tensor (or list) whose first dimension is the row count is sliced; others (scalars) are kept."""
    if "position_ids" in batch and "attention_mask" not in batch and not paired:
        return _shard_packed(batch, rank, world)
    n = batch["input_ids"].shape[0]
    b = n // 2 if paired else n
    picked = torch.arange(rank, b, world)
    if picked.numel() == 0:
        return None
    rows = torch.cat([picked, picked + b]) if paired else picked
    out = {}
    for k, v in batch.items():
        if torch.is_tensor(v) and v.ndim >= 1 and v.shape[0] == n:
            out[k] = v.index_select(0, rows.to(v.device))
        elif paired and torch.is_tensor(v) and v.ndim >= 1 and v.shape[0] == b:  # per pair, e.g. margin (B,)
            out[k] = v.index_select(0, picked.to(v.device))
        elif isinstance(v, (list, tuple)) and len(v) == n:  # e.g. adapter_names
            out[k] = [v[i] for i in rows.tolist()]
        else:
            out[k] = v
    return _trim_right_padding(out)


def _trim_right_padding(batch: dict) -> dict:
    """Drop trailing columns that are padding in every row of the shard (right-padded batches only);
    per-token tensors of width T or T-1 (rollout log-probs, advantages) are cut alike."""
    mask = batch.get("attention_mask")
    if mask is None or mask.ndim != 2:
        return batch
    lengths = mask.sum(-1)
    width = int(lengths.max())
    t = mask.shape[1]
    if width == t or not torch.equal(mask.bool(), torch.arange(t, device=mask.device) < lengths[:, None]):
        return batch
    rows = mask.shape[0]
    out = {}
    for k, v in batch.items():
        if torch.is_tensor(v) and v.ndim >= 2 and v.shape[0] == rows and v.shape[1] in (t, t - 1):
            out[k] = v[:, :width - (t - v.shape[1])]
        else:
            out[k] = v
    return out


def _shard_packed(batch: dict, rank: int, world: int) -> dict | None:
    """Packed rows -> the examples in them (a segment starts where position_ids restart at 0) ->
    examples rank::world, packed again the same way: one row if the batch was one row, else rows no
    wider than the batch's. Segments without a label (the padding at the end of a row) are dropped:
    they add nothing to the loss. A segment's first label is IGNORE in both layouts."""
    ids, labels, pos = batch["input_ids"], batch["labels"], batch["position_ids"]
    examples, pad_id = [], 0
    for r in range(ids.shape[0]):
        starts = (pos[r] == 0).nonzero().flatten().tolist() + [ids.shape[1]]
        for s, e in zip(starts[:-1], starts[1:]):
            seg_labels = labels[r, s:e].tolist()
            if all(x == IGNORE_INDEX for x in seg_labels[1:]):
                pad_id = int(ids[r, s])
                continue
            examples.append(Tokenized(ids[r, s:e].tolist(), [IGNORE_INDEX] + seg_labels[1:]))
    mine = examples[rank::world]
    if not mine:
        return None
    if ids.shape[0] == 1:  # one row holding every example (variable-length attention): the same, shorter
        out = {"input_ids": torch.tensor([sum((it.input_ids for it in mine), [])]),
               "position_ids": torch.tensor([[i for it in mine for i in range(len(it.input_ids))]]),
               "labels": torch.tensor([sum((it.labels for it in mine), [])])}
    else:
        out = collate_packed(mine, pad_id, ids.shape[1])
    out = {k: v.to(ids.device) for k, v in out.items()}
    out.update({k: v for k, v in batch.items() if k not in out})
    return out


class ShardedSource:
    """Any BatchSource, each global micro-batch cut to this rank's share (see `shard_batch`).
    Stateless over its inner source: its state is the inner source's."""

    def __init__(self, source, rank: int, world: int, paired: bool = False):
        self.source, self.rank, self.world, self.paired = source, rank, world, paired

    @property
    def steps_per_epoch(self) -> int:
        return self.source.steps_per_epoch

    def batches(self, step: int, model: nn.Module) -> list[dict]:
        out = []
        for batch in self.source.batches(step, model):
            share = shard_batch(batch, self.rank, self.world, self.paired)
            if share is None:
                what = "pairs" if self.paired else "rows"
                n = batch["input_ids"].shape[0] // (2 if self.paired else 1)
                raise ValueError(f"a micro-batch of {n} {what} cannot give each of {self.world} processes a share: "
                                 f"set training.batch_size to at least {self.world}")
            out.append(share)
        return out

    def state_dict(self) -> dict:
        return self.source.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.source.load_state_dict(state)


def shard_source(source, d: Distributed):
    """This rank's view of `source` (itself in a single process): the source's own `shard(dist)` hook
    if it has one (rollouts generate their own share), else each global micro-batch cut row-wise
    (pairs kept together when the source is `paired`)."""
    if not d.active:
        return source
    hook = getattr(source, "shard", None)
    if callable(hook):
        return hook(d)
    return ShardedSource(source, d.rank, d.world, getattr(source, "paired", False))


# ---------------------------------------------------------------- FSDP2


def _decoder_layers(body: nn.Module) -> nn.ModuleList:
    lists = [m for m in body.modules() if isinstance(m, nn.ModuleList) and len(m) > 0]
    if not lists:
        raise TypeError(f"{type(body).__name__}: no list of decoder layers to shard")
    return max(lists, key=lambda m: sum(p.numel() for p in m.parameters()))


class _TiedHead:
    """A tied LM head under FSDP: the embedding's weight is sharded with the backbone, so the head
    takes the embedding's current (gathered, during a step) weight just before each call and gives
    it back after; its gradient then accumulates on the very tensor FSDP reduce-scatters."""

    def __init__(self, head: nn.Module, embed: nn.Module):
        self.head, self.embed = head, embed
        self.sharded = embed.weight
        head._parameters["weight"] = self.sharded
        head.register_forward_pre_hook(self.before)
        head.register_forward_hook(self.after)

    def before(self, module, args):
        module._parameters["weight"] = self.embed._parameters["weight"]

    def after(self, module, args, output):
        module._parameters["weight"] = self.sharded


def shard_model(model: nn.Module, d: Distributed) -> None:
    """FSDP2 on `model` in place: decoder layers, the backbone (root), an untied LM head."""
    try:
        from torch.distributed.fsdp import fully_shard
    except ImportError as exc:  # public from torch 2.6
        raise ImportError(f"training.distributed=fsdp needs torch>=2.6 (FSDP2's fully_shard): {exc}") from exc


    if any(callable(getattr(m, "virtual_inputs", None)) for m in model.modules()):
        raise ValueError("prompt and prefix tuning feed the embedding outside the backbone's forward, which FSDP "
                         "needs: use training.distributed=ddp")
    body = backbone(model)
    head, embed = model.get_output_embeddings(), model.get_input_embeddings()
    tied = head is not None and head.weight is embed.weight
    units = [*_decoder_layers(body), body]
    for module in units:
        fully_shard(module, mesh=d.mesh, reshard_after_forward=module is not body)
    if head is not None and not tied:
        fully_shard(head, mesh=d.mesh)
        units.append(head)
    elif tied:
        _TiedHead(head, embed)
    for module in units:
        module.set_gradient_divide_factor(1.0)  # a sum over ranks: each rank's loss is its part of the global mean
        if hasattr(module, "set_force_sum_reduction_for_comms"):  # plain SUM collectives (gloo has no PREMUL_SUM)
            module.set_force_sum_reduction_for_comms(True)


@contextlib.contextmanager
def full_params(model: nn.Module, d: Distributed):
    """Within the block, rank 0's model holds full CPU copies of every FSDP-sharded parameter (for
    save_pretrained / save_adapter); ties stay ties. A collective: every rank enters it. No-op otherwise."""
    if d.mode != "fsdp":
        yield
        return
    swapped, full = [], {}
    for module in model.modules():
        for name, p in list(module._parameters.items()):
            if p is None or not is_dtensor(p):
                continue
            if id(p) not in full:
                full[id(p)] = nn.Parameter(p.full_tensor().cpu(), requires_grad=p.requires_grad)
            swapped.append((module, name, p))
    if d.is_main:
        for module, name, p in swapped:
            module._parameters[name] = full[id(p)]
    try:
        yield
    finally:
        for module, name, p in swapped:
            module._parameters[name] = p


def full_tensor(t: torch.Tensor) -> torch.Tensor:
    """A gathered copy of a sharded tensor (collective), the tensor itself otherwise."""
    return t.full_tensor() if is_dtensor(t) else t


def like_param(value: torch.Tensor, param: torch.Tensor) -> torch.Tensor:
    """`value` (full) laid out like `param`: sharded the same way when `param` is an FSDP shard."""
    if not is_dtensor(param):
        return value
    from torch.distributed.tensor import distribute_tensor

    return distribute_tensor(value.to(param.device, param.dtype), param.device_mesh, param.placements)


def start(cfg):
    """This process's Distributed and the run config it trains with: under torchrun on CUDA, each
    process takes the GPU of its LOCAL_RANK (model.device auto/cuda -> cuda:LOCAL_RANK)."""
    from dataclasses import replace

    world, local_rank = int(os.environ.get("WORLD_SIZE", "1")), int(os.environ.get("LOCAL_RANK", "0"))
    device = None
    if world > 1 and cfg.model.device in ("auto", "cuda") and torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
        cfg = replace(cfg, model=replace(cfg.model, device=str(device)))
    elif world > 1 and cfg.model.device.startswith("cuda"):
        device = torch.device(cfg.model.device)
    return cfg, Distributed.from_env(cfg.training.distributed, device)
