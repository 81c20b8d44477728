"""The training run: config -> data -> model -> loop -> run directory.

Runs the same under `python train.py`, `corral train` and `accelerate launch` (one process or many:
DDP, FSDP, DeepSpeed come from accelerate's config). Reads top to bottom: set up, tokenize (bad data
stops here, before any model is loaded), build the model, train with checkpoints, save the result.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

from corral.config import ConfigError, config_to_yaml, save_config
from corral.fileio import atomic_write_text
from corral.records import RecordError
from training.checkpoint import (
    latest_checkpoint,
    read_trainer_state,
    register_adapter_only_hooks,
    save_checkpoint,
)
from training.config import TrainConfig
from training.data import (
    load_records,
    plan_batches,
    shard_for_process,
    split_by_token_budget,
    split_validation,
    tokenize_records,
)

RUN_INFO = "run_info.json"
METRICS = "metrics.jsonl"


class NonFiniteLossError(RuntimeError):
    """The loss became NaN or infinite; the run stops before the optimizer applies it."""


class TrainingStopped(Exception):
    """The run received SIGTERM, saved a checkpoint and stopped; resume with resume=auto."""

    def __init__(self, checkpoint: Path, step: int) -> None:
        self.checkpoint = checkpoint
        self.step = step
        super().__init__(
            f"stopped by SIGTERM at step {step}; checkpoint saved in {checkpoint}; "
            "run again with resume=auto to continue"
        )


class _StopFlag:
    """Set by SIGTERM; checked between optimizer steps so a checkpoint is never half a step."""

    def __init__(self) -> None:
        self.requested = False
        self._previous: Any = None

    def install(self) -> None:
        try:
            self._previous = signal.signal(signal.SIGTERM, self._handle)
        except ValueError:  # not the main thread (e.g. called from a server): no signal handling
            self._previous = None

    def _handle(self, signum: int, frame: Any) -> None:
        self.requested = True

    def uninstall(self) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)


class MetricsLogger:
    """metrics.jsonl always (main process); TensorBoard and W&B when configured."""

    def __init__(
        self, run_dir: Path, config: TrainConfig, *, enabled: bool, resume_step: int | None
    ) -> None:
        self.enabled = enabled
        self.path = run_dir / METRICS
        self.tensorboard = None
        self.wandb = None
        if not enabled:
            return
        if self.path.exists() and resume_step is None:
            self.path.unlink()  # a fresh run starts a fresh history
        elif self.path.exists():
            # A resumed run rewrites history after its checkpoint, so no step appears twice.
            kept = [
                line
                for line in self.path.read_text().splitlines()
                if line.strip() and json.loads(line).get("step", 0) <= resume_step
            ]
            atomic_write_text(self.path, "".join(line + "\n" for line in kept))
        if "tensorboard" in config.report_to:
            from torch.utils.tensorboard import SummaryWriter

            self.tensorboard = SummaryWriter(
                log_dir=str(run_dir / "tensorboard"), purge_step=(resume_step or 0) + 1
            )
        if "wandb" in config.report_to:
            try:
                import wandb
            except ImportError:
                print(
                    "corral: report_to has wandb but wandb is not installed; skipping it",
                    file=sys.stderr,
                )
            else:
                self.wandb = wandb.init(
                    project=config.wandb_project,
                    name=run_dir.name,
                    config=json.loads(json.dumps(vars(config))),
                    resume="allow",
                )

    def log(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        with self.path.open("a", encoding="utf-8") as handle:
            handle.write(json.dumps(record) + "\n")
        step = record["step"]
        for key, value in record.items():
            if key in ("step", "time") or not isinstance(value, int | float):
                continue
            if self.tensorboard is not None:
                self.tensorboard.add_scalar(
                    f"train/{key}" if key != "eval_loss" else "eval/loss", value, step
                )
        if self.wandb is not None:
            self.wandb.log({k: v for k, v in record.items() if k != "step"}, step=step)

    def close(self) -> None:
        if self.tensorboard is not None:
            self.tensorboard.close()
        if self.wandb is not None:
            self.wandb.finish()


def prepare_examples(config: TrainConfig, tokenizer: Any, template: Any) -> tuple[list, list, Any]:
    """(train examples, validation examples, tokenization report); bad data raises RecordError."""
    records = load_records(config.data, split=config.data_split)
    train_records, val_records = split_validation(records, config.val_size, config.seed)
    common = {
        "max_length": config.max_length,
        "truncation": config.truncation,
        "train_on_inputs": config.train_on_inputs,
        "source": config.data,
    }
    train_examples, report = tokenize_records(train_records, tokenizer, template, **common)
    val_examples: list = []
    if val_records:
        # The validation split may lose every record to max_length without being an error.
        try:
            val_examples, _ = tokenize_records(val_records, tokenizer, template, **common)
        except RecordError:
            val_examples = []
    return train_examples, val_examples, report


def _make_accelerator(config: TrainConfig) -> Any:
    import torch
    from accelerate import Accelerator

    from training.model import compute_dtype

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
    return Accelerator(
        mixed_precision="bf16" if bf16 else "no",
        gradient_accumulation_steps=accumulation,
        # One scheduler step per optimizer step, whatever the number of processes.
        step_scheduler_with_optimizer=False,
    )


def resolve_resume(config: TrainConfig, run_dir: Path) -> Path | None:
    if not config.resume:
        return None
    if config.resume == "auto":
        return latest_checkpoint(run_dir)
    checkpoint = Path(config.resume)
    if not (checkpoint / "trainer_state.json").is_file():
        raise ConfigError(f"key 'resume': {checkpoint} is not a complete checkpoint folder")
    return checkpoint


def write_run_info(run_dir: Path, config: TrainConfig, template: Any) -> None:
    import corral
    from corral.models import resolve_model

    info = {
        "base_model": config.model,
        "base_model_path": resolve_model(config.model),
        "method": config.method,
        "template": template.name,
        "max_length": config.max_length,
        "response_marker": template.response_marker,
        "end_marker": template.end_marker,
        "completion_suffix": template.completion_suffix,
        "corral_version": corral.__version__,
    }
    atomic_write_text(run_dir / RUN_INFO, json.dumps(info, indent=2) + "\n")


def train(config: TrainConfig) -> Path:
    """Train as `config` says and return the run directory (see ARCHITECTURE.md for its layout)."""
    import torch
    from tqdm.auto import tqdm

    from corral.models import load_tokenizer, quiet_transformers
    from corral.templates import get_template
    from training.batches import collate, completion_loss_sum
    from training.model import build_model, build_optimizer, build_scheduler, count_parameters

    accelerator = _make_accelerator(config)
    main = accelerator.is_main_process
    say = accelerator.print
    run_dir = Path(config.output_dir)
    say(f"corral train: resolved config\n{config_to_yaml(config)}")
    from accelerate.utils import DistributedType, set_seed

    set_seed(config.seed)

    # ---- data (every data problem is reported here, before the model is loaded)
    with quiet_transformers():
        tokenizer = load_tokenizer(config.model)
    template = get_template(config.template, tokenizer)
    train_examples, val_examples, report = prepare_examples(config, tokenizer, template)
    say(f"data: {config.data}: {report.summary()}; {len(val_examples)} validation examples")
    world = accelerator.num_processes
    per_step = config.gradient_accumulation_steps
    lengths = [len(e) for e in train_examples]
    batches_per_epoch = len(
        shard_for_process(
            plan_batches(
                lengths, config.micro_batch_size, seed=config.seed, epoch=0, group_by_length=False
            ),
            num_processes=world,
            process_index=0,
            per_step=per_step,
        )
    )
    steps_per_epoch = batches_per_epoch // per_step
    if steps_per_epoch == 0:
        raise RecordError(
            config.data,
            f"{len(train_examples)} training examples do not fill one optimizer step of "
            f"{config.micro_batch_size} x {per_step} accumulation x {world} processes; "
            "lower micro_batch_size or gradient_accumulation_steps",
        )
    total_steps = config.max_steps or math.ceil(config.epochs * steps_per_epoch)

    if not config.resume and latest_checkpoint(run_dir) is not None:
        raise ConfigError(
            f"{run_dir} holds checkpoints of an earlier run: set resume=auto to continue it, "
            "or choose another output_dir"
        )

    # ---- model, optimizer, schedule
    if main:
        run_dir.mkdir(parents=True, exist_ok=True)
        save_config(config, run_dir / "corral_config.yaml")
    with quiet_transformers():
        model = build_model(config, tokenizer, local_process_index=accelerator.local_process_index)
    trainable, total = count_parameters(model)
    say(f"model: {config.model} ({config.method}): {trainable:,} trainable of {total:,} parameters")
    optimizer = build_optimizer(config, model)
    scheduler = build_scheduler(config, optimizer, total_steps)
    if config.method != "full":
        register_adapter_only_hooks(accelerator)
    model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)

    step = 0
    resume_from = resolve_resume(config, run_dir)
    if resume_from is not None:
        accelerator.load_state(str(resume_from))
        step = read_trainer_state(resume_from)["step"]
        say(f"resumed from {resume_from} at step {step}")
    metrics = MetricsLogger(
        run_dir, config, enabled=main, resume_step=step if resume_from is not None else None
    )
    stop = _StopFlag()
    stop.install()
    device = accelerator.device
    if device.type == "cpu":
        # Softmax over a 49K vocabulary leaves most probabilities (and their gradients) below
        # fp32's normal range; x86 arithmetic on such denormals is tens of times slower. Flushing
        # them to zero changes the loss by less than 1e-38 and keeps every step at full speed.
        torch.set_flush_denormal(True)
    engine_accumulates = accelerator.distributed_type == DistributedType.DEEPSPEED

    def run_eval() -> float | None:
        if not val_examples:
            return None
        model.eval()
        shard = val_examples[accelerator.process_index :: world]
        sums = torch.zeros(2, dtype=torch.float64, device=device)
        with torch.no_grad():
            for start in range(0, len(shard), config.micro_batch_size):
                chunk = shard[start : start + config.micro_batch_size]
                batch = collate(
                    chunk,
                    packing=config.packing,
                    pad_token_id=tokenizer.pad_token_id,
                    row_capacity=config.max_length,
                )
                loss_sum, n = completion_loss_sum(model, batch, device)
                sums += torch.tensor([loss_sum.item(), n], dtype=torch.float64, device=device)
        model.train()
        sums = accelerator.reduce(sums, reduction="sum")
        return float(sums[0] / sums[1])

    def checkpoint_state() -> dict[str, Any]:
        return {"step": step, "total_steps": total_steps, "steps_per_epoch": steps_per_epoch}

    say(
        f"training: {total_steps} steps ({steps_per_epoch} per epoch), {world} process(es), "
        f"micro-batch {config.micro_batch_size} x {per_step} accumulation, run dir {run_dir}"
    )
    if step == 0 and val_examples:
        # The starting point, so "the loss went down" can be read off metrics.jsonl.
        metrics.log({"step": 0, "epoch": 0.0, "eval_loss": round(run_eval(), 6), "time": 0.0})
    model.train()
    progress = tqdm(
        total=total_steps, initial=step, disable=not main, desc="train", dynamic_ncols=True
    )
    last_checkpoint: Path | None = resume_from
    started = time.time()
    window_tokens, window_seconds = 0, 0.0
    # Throughput of this session's optimizer steps alone (no evaluation, no checkpoint writes).
    session_tokens, session_seconds = 0, 0.0
    try:
        while step < total_steps:
            step_started = time.monotonic()
            epoch, step_in_epoch = divmod(step, steps_per_epoch)
            plan = plan_batches(
                lengths,
                config.micro_batch_size,
                seed=config.seed,
                epoch=epoch,
                group_by_length=config.group_by_length,
            )
            mine = shard_for_process(
                plan,
                num_processes=world,
                process_index=accelerator.process_index,
                per_step=per_step,
            )
            micro = mine[step_in_epoch * per_step : (step_in_epoch + 1) * per_step]
            # Each micro-batch may run as several forward passes of at most max_tokens_per_forward
            # tokens: the same examples, the same gradient, bounded activation memory.
            batches = [
                collate(
                    [train_examples[i] for i in chunk],
                    packing=config.packing,
                    pad_token_id=tokenizer.pad_token_id,
                    row_capacity=config.max_length,
                )
                for indices in micro
                for chunk in split_by_token_budget(indices, lengths, config.max_tokens_per_forward)
            ]
            # Normalise by the trained tokens of the whole step on every process, so the gradient
            # is the per-token mean however the tokens fall across forward passes and ranks
            # (data parallel averages gradients over ranks, hence the factor `world`).
            local_label_tokens = sum(int((b["targets"] != -100).sum()) for b in batches)
            global_label_tokens = accelerator.reduce(
                torch.tensor(float(local_label_tokens), device=device), reduction="sum"
            ).item()
            scale = world / max(global_label_tokens, 1.0)
            if engine_accumulates:
                scale *= per_step  # DeepSpeed divides by its accumulation steps itself
            step_loss_sum = 0.0
            nonfinite = 0.0
            for position, batch in enumerate(batches):
                last = position == len(batches) - 1
                if engine_accumulates:
                    context = accelerator.accumulate(model)
                elif last:
                    context = contextlib.nullcontext()
                else:
                    context = accelerator.no_sync(model)  # gradients all-reduced once per step
                with context:
                    loss_sum, _ = completion_loss_sum(model, batch, device)
                    value = loss_sum.item()
                    if not math.isfinite(value):
                        nonfinite = 1.0
                    step_loss_sum += value if math.isfinite(value) else 0.0
                    accelerator.backward(loss_sum * scale)
            stats = accelerator.reduce(
                torch.tensor(
                    [
                        step_loss_sum,
                        nonfinite,
                        float(stop.requested),
                        float(sum(b["num_tokens"] for b in batches)),
                    ],
                    dtype=torch.float64,
                    device=device,
                ),
                reduction="sum",
            )
            if stats[1] > 0:
                raise NonFiniteLossError(
                    f"non-finite loss at step {step + 1}: the run stopped before applying it. "
                    f"Lower learning_rate (now {config.learning_rate}), keep max_grad_norm > 0, "
                    "and prefer bf16 or fp32 over fp16"
                )
            grad_norm = None
            if config.max_grad_norm > 0:
                grad_norm = accelerator.clip_grad_norm_(model.parameters(), config.max_grad_norm)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            step_seconds = time.monotonic() - step_started
            window_tokens += int(stats[3])
            window_seconds += step_seconds
            session_tokens += int(stats[3])
            session_seconds += step_seconds
            loss = float(stats[0]) / max(global_label_tokens, 1.0)
            progress.update(1)

            record: dict[str, Any] | None = None
            if step % config.logging_steps == 0 or step == total_steps:
                # Tokens per second of the steps themselves (evaluation and checkpoints excluded).
                tokens_per_s = window_tokens / window_seconds if window_seconds > 0 else 0.0
                window_tokens, window_seconds = 0, 0.0
                record = {
                    "step": step,
                    "epoch": round(step / steps_per_epoch, 4),
                    "loss": round(loss, 6),
                    "lr": scheduler.get_last_lr()[0],
                    "tokens_per_s": round(tokens_per_s, 2),
                    "time": round(time.time() - started, 3),
                }
                if grad_norm is not None:
                    record["grad_norm"] = round(float(grad_norm), 6)
                progress.set_postfix(loss=f"{loss:.4f}", tok_s=f"{tokens_per_s:.0f}")
            if (config.eval_steps and step % config.eval_steps == 0) or step == total_steps:
                eval_loss = run_eval()
                if eval_loss is not None:
                    record = record or {
                        "step": step,
                        "epoch": round(step / steps_per_epoch, 4),
                        "time": round(time.time() - started, 3),
                    }
                    record["eval_loss"] = round(eval_loss, 6)
                    if main:
                        progress.write(f"step {step}: eval_loss {eval_loss:.4f}")
            if record is not None:
                metrics.log(record)
            if (
                (config.save_steps and step % config.save_steps == 0)
                or step == total_steps
                or stats[2] > 0
            ):
                last_checkpoint = save_checkpoint(
                    accelerator, run_dir, checkpoint_state(), config.save_total_limit
                )
            if stats[2] > 0 and step < total_steps:
                raise TrainingStopped(last_checkpoint, step)
    finally:
        progress.close()
        metrics.close()
        stop.uninstall()

    save_final(accelerator, model, tokenizer, config, template, run_dir)
    fingerprints = check_ranks_agree(accelerator, model)
    if main:
        summary = {
            "steps": step,
            "world_size": world,
            "train_examples": len(train_examples),
            "validation_examples": len(val_examples),
            "tokenization": {k: v for k, v in vars(report).items() if k != "dropped_indices"},
            "trainable_parameters": trainable,
            "session_tokens": session_tokens,
            "session_train_seconds": round(session_seconds, 3),
            "session_tokens_per_s": round(session_tokens / session_seconds, 2)
            if session_seconds
            else None,
            "rank_fingerprints": fingerprints,
            "seconds": round(time.time() - started, 2),
        }
        atomic_write_text(run_dir / "train_summary.json", json.dumps(summary, indent=2) + "\n")
    say(f"done: {step} steps in {time.time() - started:.1f} s; run directory {run_dir}")
    return run_dir


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


def save_final(
    accelerator: Any, model: Any, tokenizer: Any, config: TrainConfig, template: Any, run_dir: Path
) -> None:
    """The run directory's top level: adapter (or full weights), tokenizer, run_info.json."""
    from accelerate.utils import DistributedType

    accelerator.wait_for_everyone()
    state_dict = None
    if accelerator.distributed_type in (DistributedType.FSDP, DistributedType.DEEPSPEED):
        state_dict = accelerator.get_state_dict(model)  # gathers the shards on the main process
    unwrapped = accelerator.unwrap_model(model)
    if accelerator.is_main_process:
        unwrapped.save_pretrained(run_dir, state_dict=state_dict, safe_serialization=True)
        tokenizer.save_pretrained(run_dir)
        write_run_info(run_dir, config, template)
    accelerator.wait_for_everyone()
