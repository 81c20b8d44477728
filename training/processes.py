"""The processes of a launch: the accelerator, SIGTERM between steps, and agreement between ranks.

Whatever runs the loop (`python train.py`, `corral train`, `accelerate launch` with DDP, FSDP or
DeepSpeed) meets it through these few functions; training/loop.py holds no launcher detail.
"""

from __future__ import annotations

import os
import signal
from typing import Any

from corral.training.config import TrainConfig

from corral.errors import ConfigError


class StopFlag:
    """Set by SIGTERM; checked between optimizer steps so a checkpoint is never half a step."""

    def __init__(self) -> None:
        self.requested = False
        self._previous: Any = None

    def __enter__(self) -> StopFlag:
        try:
            self._previous = signal.signal(signal.SIGTERM, self._handle)
        except ValueError:  # not the main thread (e.g. called from a server): no signal handling
            self._previous = None
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        self.requested = True

    def __exit__(self, *exc: Any) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)


def make_accelerator(config: TrainConfig) -> Any:
    import torch
    from accelerate import Accelerator
    from corral.training.model import compute_dtype

    bf16 = compute_dtype(config) == torch.bfloat16
    if os.environ.get("ACCELERATE_USE_DEEPSPEED", "").lower() == "true":
        # DeepSpeed takes accumulation and clipping from its own config: hand it ours, and refuse
        # a launcher flag that says otherwise rather than silently training with another value.
        for env, value in (
            ("ACCELERATE_GRADIENT_ACCUMULATION_STEPS", config.gradient_accumulation_steps),
            ("ACCELERATE_GRADIENT_CLIPPING", config.max_grad_norm),
        ):
            given = os.environ.get(env)
            if given not in (None, "auto") and float(given) != float(value):
                raise ConfigError(
                    f"accelerate sets {env}={given} but the training config says {value}; "
                    "set it in the training config only"
                )
            os.environ[env] = str(value)
        if config.max_tokens_per_forward:
            raise ConfigError(
                "key 'max_tokens_per_forward': DeepSpeed needs a fixed number of forward passes "
                "per step; set it to 0 and use micro_batch_size/gradient_accumulation_steps"
            )
        accumulation = config.gradient_accumulation_steps
    else:
        accumulation = 1  # the loop syncs gradients itself, once per optimizer step
    accelerator = Accelerator(
        mixed_precision="bf16" if bf16 else "no",
        gradient_accumulation_steps=accumulation,
        # One scheduler step per optimizer step, whatever the number of processes.
        step_scheduler_with_optimizer=False,
    )
    check_one_process_group(accelerator.num_processes)
    return accelerator


def engine_accumulates(accelerator: Any) -> bool:
    """DeepSpeed accumulates gradients itself; everywhere else the loop does."""
    from accelerate.utils import DistributedType

    return accelerator.distributed_type == DistributedType.DEEPSPEED


def precision_name(accelerator: Any) -> str:
    """What the run computes in: bf16 mixed precision (fp32 master weights) or fp32."""
    return "bf16" if accelerator.mixed_precision == "bf16" else "fp32"


def check_one_process_group(joined: int) -> None:
    """Stop when the launcher started more processes than joined one group.

    On a machine without GPUs, `accelerate launch` with an FSDP, DeepSpeed or multi-GPU config
    starts N processes that each set themselves up alone; they would train N separate copies and
    overwrite one run directory. The launcher's WORLD_SIZE says how many it started.
    """
    launched = int(os.environ.get("WORLD_SIZE") or 1)
    if launched > joined:
        raise ConfigError(
            f"the launcher started {launched} processes but they did not join one process group "
            f"(each sees {joined}): FSDP, DeepSpeed and multi-GPU configs need GPUs. To rehearse "
            f"data parallelism on CPUs: ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu "
            f"--num_processes {launched} train.py ...; for FSDP or DeepSpeed, run on GPUs "
            "(scripts/gpu_check.sh checks a machine first)"
        )


def check_ranks_agree(accelerator: Any, model: Any) -> list[str]:
    """A hash of the trainable weights on every process; raises if data-parallel ranks diverged."""
    import hashlib

    import torch
    from accelerate.utils import DistributedType, gather_object

    if accelerator.distributed_type in (DistributedType.FSDP, DistributedType.DEEPSPEED):
        return []  # sharded: each rank holds a different slice by design
    digest = hashlib.sha256()
    for name, param in accelerator.unwrap_model(model).named_parameters():
        if param.requires_grad:
            digest.update(name.encode())
            digest.update(param.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    fingerprints = gather_object([digest.hexdigest()])
    if len(set(fingerprints)) > 1:
        raise RuntimeError(f"data-parallel ranks ended with different weights: {fingerprints}")
    return fingerprints
