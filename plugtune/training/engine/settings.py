"""The loop's settings (the `training:` section of a run config): optimizer, schedule, accumulation,
logging, checkpoints, non-finite policy, distributed mode, trackers and speed switches."""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class TrainingConfig:
    max_steps: int = 0  # optimizer steps; 0 = derive from epochs
    epochs: float = 1.0
    batch_size: int = 8  # examples per micro-batch
    grad_accum: int = 1  # micro-batches per optimizer step
    lr: float = 2e-4
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    warmup_steps: int = 0
    schedule: str = "cosine"  # cosine | linear | constant
    min_lr_ratio: float = 0.0  # cosine/linear decay floor, as a fraction of lr
    max_grad_norm: float = 1.0  # 0 disables clipping
    seed: int = 0
    log_every: int = 1
    eval_every: int = 0  # 0 = only at the end (when data.eval is set)
    save_every: int = 0  # 0 = only the final checkpoint
    keep_checkpoints: int = 2
    progress: bool = True
    on_nonfinite: str = "stop"  # stop | skip : a NaN/inf loss or gradient stops the run or skips the step
    # Under torchrun (WORLD_SIZE > 1): auto = ddp (replicas, gradients summed) | fsdp (FSDP2 shards).
    distributed: str = "auto"
    report_to: list[str] = field(default_factory=list)  # tensorboard | mlflow | wandb, all offline
    gradient_checkpointing: bool = False  # recompute layer activations in the backward: less memory, ~1/3 slower
    threads: int = 0  # torch intra-op threads for the run; 0 = leave as is (OMP_NUM_THREADS or all cores)
