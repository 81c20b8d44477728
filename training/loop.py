"""The training run, as a recipe: set up, step, evaluate, checkpoint, save, summarize.

Runs the same under `python train.py`, `corral train` and `accelerate launch` (one process or many:
DDP, FSDP, DeepSpeed come from accelerate's config; training/processes.py). `train` reads top to
bottom; each part it calls can be read alone:

- `setup`: the objective (training/objectives.py: sft, dpo or reward, chosen once from the
  config), accelerator, data (every data problem is reported here, before a model is loaded), the
  step plan, model, optimizer, schedule, and the checkpoint to resume from;
- `step_batches` + `train_step`: the micro-batches of one optimizer step and the step itself; the
  objective makes the batches and gives each its loss;
- `evaluate`: the objective's validation metrics, reduced over processes;
- `checkpoint` (training/checkpoint.py), then `save_final` and `write_summary`
  (training/finish.py): the run directory, whose every path and whose lifecycle (claim, refuse,
  replace, resume) corral/rundir.py owns.

What `setup` builds and each step returns: training/run.py (`TrainingRun`, `StepResult`).

Tools that watch a run (scripts/gpu_check.py, the benchmarks) pass callbacks
(training/callbacks.py), called at setup, each step's start and end, each evaluation and each save.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from corral.training.callbacks import TrainingCallback
from corral.training.checkpoint import (
    load_objective_state,
    read_trainer_state,
    register_adapter_only_hooks,
    save_checkpoint,
)
from corral.training.config import TrainConfig
from corral.training.data import count_steps_per_epoch, plan_batches, shard_for_process
from corral.training.finish import save_final, write_summary
from corral.training.metrics import MetricsLogger, Throughput
from corral.training.objectives import objective_for
from corral.training.processes import (
    StopFlag,
    claim_run_dir,
    engine_accumulates,
    make_accelerator,
    precision_name,
)
from corral.training.run import StepResult, TrainingRun

from corral.config import config_to_yaml, save_config
from corral.rundir import RunDir


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


# ------------------------------------------------------------------------------ the recipe


def train(config: TrainConfig, callbacks: Sequence[TrainingCallback] = ()) -> Path:
    """Train as `config` says and return the run directory (its contents: corral/rundir.py)."""
    accelerator = make_accelerator(config)
    with claim_run_dir(config, accelerator):
        run = setup(config, accelerator, callbacks)
        for callback in callbacks:
            callback.on_setup(run)
        return _train(run)


def _train(run: TrainingRun) -> Path:
    from tqdm.auto import tqdm

    config = run.config
    main = run.accelerator.is_main_process
    resumed = run.resumed_from is not None
    metrics = MetricsLogger(
        run.files, config, enabled=main, resume_step=run.step if resumed else None
    )
    progress = tqdm(
        total=run.total_steps, initial=run.step, disable=not main, desc="train", dynamic_ncols=True
    )
    speed = Throughput()
    last_checkpoint = run.resumed_from
    started = time.time()
    try:
        with StopFlag() as stop:
            if run.step == 0 and run.val_examples:
                # The starting point, so "the loss went down" can be read off metrics.jsonl.
                metrics.log({"step": 0, "epoch": 0.0, **_eval_fields(evaluate(run)), "time": 0.0})
            while run.step < run.total_steps:
                batches = step_batches(run)
                for callback in run.callbacks:
                    callback.on_step_begin(run, batches)
                result = train_step(run, batches, stop_requested=stop.requested)
                for callback in run.callbacks:
                    callback.on_step_end(run, result, batches)
                speed.add(result.tokens, result.seconds)
                progress.update(1)
                record = _train_record(run, result, speed, started, progress)
                if _evaluation_due(run):
                    record = _with_evaluation(run, record, started, progress)
                if record is not None:
                    metrics.log(record)
                if _checkpoint_due(run, result):
                    last_checkpoint = checkpoint(run)
                if result.stop_requested and run.step < run.total_steps:
                    raise TrainingStopped(last_checkpoint, run.step)
    finally:
        progress.close()
        metrics.close()

    save_final(run)
    write_summary(run, speed, seconds=time.time() - started)
    run.accelerator.print(
        f"done: {run.step} steps in {time.time() - started:.1f} s; run directory {run.run_dir}"
    )
    return run.run_dir


# ------------------------------------------------------------------------------ setup


def setup(
    config: TrainConfig, accelerator: Any, callbacks: Sequence[TrainingCallback] = ()
) -> TrainingRun:
    """Data, step plan, model, optimizer, schedule; resumed when asked."""
    import torch
    from accelerate.utils import set_seed
    from corral.training.model import (
        build_model,
        build_optimizer,
        build_scheduler,
        check_init_adapter,
        check_target_modules,
        count_parameters,
    )

    from corral.models import load_tokenizer, quiet_transformers
    from corral.templates import get_template

    say = accelerator.print
    files = RunDir(config.output_dir)
    objective = objective_for(config)
    say(f"corral train: resolved config\n{config_to_yaml(config)}")
    set_seed(config.seed)

    # Data first: every data problem is reported here, before the model is loaded.
    with quiet_transformers():
        tokenizer = load_tokenizer(config.model)
    template = get_template(
        config.template, tokenizer, dolly_special_tokens=config.dolly_special_tokens
    )
    train_examples, val_examples, report = objective.prepare_examples(tokenizer, template)
    unit = objective.unit
    say(
        f"data: {config.data}: {report.summary().replace('examples', unit)}; "
        f"{len(val_examples)} validation {unit}"
    )
    lengths = [len(e) for e in train_examples]
    steps_per_epoch = count_steps_per_epoch(config, lengths, accelerator.num_processes)
    total_steps = config.max_steps or math.ceil(config.epochs * steps_per_epoch)
    check_init_adapter(config)
    check_target_modules(config)

    if accelerator.is_main_process:
        files.root.mkdir(parents=True, exist_ok=True)
        save_config(config, files.config_file)
    with quiet_transformers():
        model = build_model(
            config,
            tokenizer,
            local_process_index=accelerator.local_process_index,
            sequence_classifier=objective.sequence_classifier,
        )
    trainable, total = count_parameters(model)
    say(f"model: {config.model} ({config.method}): {trainable:,} trainable of {total:,} parameters")
    say(f"precision: {precision_name(accelerator)} (precision={config.precision})")
    if objective.describe():
        say(objective.describe())
    optimizer = build_optimizer(config, model)
    scheduler = build_scheduler(config, optimizer, total_steps)
    if config.weights != "full":
        register_adapter_only_hooks(accelerator)
    model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)

    step = 0
    resume_from = files.resume_point(config.resume)
    if resume_from is not None:
        accelerator.load_state(str(resume_from))
        step = read_trainer_state(resume_from)["step"]
        state = load_objective_state(resume_from, accelerator.process_index)
        if state is not None:
            objective.load_state_dict(state)
        say(f"resumed from {resume_from} at step {step}")
    if accelerator.device.type == "cpu":
        # Softmax over a 49K vocabulary leaves most probabilities (and their gradients) below
        # fp32's normal range; x86 arithmetic on such denormals is tens of times slower. Flushing
        # them to zero changes the loss by less than 1e-38 and keeps every step at full speed.
        torch.set_flush_denormal(True)
    say(
        f"training: {total_steps} steps ({steps_per_epoch} per epoch), "
        f"{accelerator.num_processes} process(es), micro-batch {config.micro_batch_size} x "
        f"{config.gradient_accumulation_steps} accumulation, run dir {files.root}"
    )
    return TrainingRun(
        config=config,
        objective=objective,
        accelerator=accelerator,
        tokenizer=tokenizer,
        template=template,
        train_examples=train_examples,
        val_examples=val_examples,
        tokenization=report,
        lengths=lengths,
        steps_per_epoch=steps_per_epoch,
        total_steps=total_steps,
        model=model,
        optimizer=optimizer,
        scheduler=scheduler,
        trainable_parameters=trainable,
        files=files,
        resumed_from=resume_from,
        step=step,
        callbacks=tuple(callbacks),
    )


# ------------------------------------------------------------------------------ one step


def step_batches(run: TrainingRun) -> list[dict[str, Any]]:
    """This process's forward passes for optimizer step `run.step` (the same on a resume)."""
    config = run.config
    per_step = config.gradient_accumulation_steps
    epoch, step_in_epoch = divmod(run.step, run.steps_per_epoch)
    plan = plan_batches(
        run.lengths,
        config.micro_batch_size,
        seed=config.seed,
        epoch=epoch,
        group_by_length=config.group_by_length,
    )
    mine = shard_for_process(
        plan,
        num_processes=run.world,
        process_index=run.accelerator.process_index,
        per_step=per_step,
    )
    micro = mine[step_in_epoch * per_step : (step_in_epoch + 1) * per_step]
    return run.objective.make_batches(run, micro)


def train_step(
    run: TrainingRun, batches: list[dict[str, Any]], *, stop_requested: bool
) -> StepResult:
    """Forward and backward over `batches`, then one optimizer and scheduler step."""
    import torch

    started = time.monotonic()
    accelerator, model, device, world = run.accelerator, run.model, run.device, run.world
    objective, accumulates = run.objective, engine_accumulates(accelerator)
    # Normalise by the loss units (trained tokens, pairs) of the whole step on every process, so
    # the gradient is the per-unit mean however the units fall across forward passes and ranks
    # (data parallel averages gradients over ranks, hence the factor `world`).
    local_units = sum(objective.loss_units(b) for b in batches)
    global_units = accelerator.reduce(
        torch.tensor(float(local_units), device=device), reduction="sum"
    ).item()
    scale = world / max(global_units, 1.0)
    if accumulates:
        scale *= run.config.gradient_accumulation_steps  # DeepSpeed divides by its accumulation
    loss_sum_total = 0.0
    nonfinite = 0.0
    names = objective.metric_names
    metric_sums = [0.0] * len(names)
    for position, batch in enumerate(batches):
        if accumulates:
            context = accelerator.accumulate(model)
        elif position == len(batches) - 1:
            context = contextlib.nullcontext()
        else:
            context = accelerator.no_sync(model)  # gradients all-reduced once per step
        with context:
            loss_sum, sums = objective.loss_sum(run, batch)
            value = loss_sum.item()
            if not math.isfinite(value):
                nonfinite = 1.0
            loss_sum_total += value if math.isfinite(value) else 0.0
            metric_sums = [
                total + sums[name] for total, name in zip(metric_sums, names, strict=True)
            ]
            accelerator.backward(loss_sum * scale)
    agreed = accelerator.reduce(
        torch.tensor(
            [
                loss_sum_total,
                nonfinite,
                float(stop_requested),
                float(sum(b["num_tokens"] for b in batches)),
                *metric_sums,
            ],
            dtype=torch.float64,
            device=device,
        ),
        reduction="sum",
    )
    if agreed[1] > 0:
        raise NonFiniteLossError(
            f"non-finite loss at step {run.step + 1}: the run stopped before applying it. "
            f"Lower learning_rate (now {run.config.learning_rate}), keep max_grad_norm > 0, "
            "and prefer bf16 or fp32 over fp16"
        )
    grad_norm = None
    if run.config.max_grad_norm > 0:
        grad_norm = float(accelerator.clip_grad_norm_(model.parameters(), run.config.max_grad_norm))
    run.optimizer.step()
    run.scheduler.step()
    run.optimizer.zero_grad(set_to_none=True)
    run.step += 1
    means = {name: float(agreed[4 + i]) / max(global_units, 1.0) for i, name in enumerate(names)}
    return StepResult(
        loss=float(agreed[0]) / max(global_units, 1.0),
        tokens=int(agreed[3]),
        seconds=time.monotonic() - started,
        grad_norm=grad_norm,
        stop_requested=bool(agreed[2] > 0),
        metrics={**means, **objective.step_metrics(run)},
    )


def _train_record(
    run: TrainingRun, result: StepResult, speed: Throughput, started: float, progress: Any
) -> dict[str, Any] | None:
    """The training metrics row of this step, every logging_steps (and at the last step)."""
    step = run.step
    if step % run.config.logging_steps and step != run.total_steps:
        return None
    tokens_per_s = speed.take_window()
    record = {
        "step": step,
        "epoch": round(step / run.steps_per_epoch, 4),
        "loss": round(result.loss, 6),
        **{name: round(value, 6) for name, value in result.metrics.items()},
        "lr": run.scheduler.get_last_lr()[0],
        "tokens_per_s": round(tokens_per_s, 2),
        "time": round(time.time() - started, 3),
    }
    if result.grad_norm is not None:
        record["grad_norm"] = round(result.grad_norm, 6)
    run.latest_train = {"step": step, "loss": result.loss, **result.metrics}
    progress.set_postfix(loss=f"{result.loss:.4f}", tok_s=f"{tokens_per_s:.0f}")
    return record


def _evaluation_due(run: TrainingRun) -> bool:
    eval_steps = run.config.eval_steps
    return bool(eval_steps and run.step % eval_steps == 0) or run.step == run.total_steps


def _with_evaluation(
    run: TrainingRun, record: dict[str, Any] | None, started: float, progress: Any
) -> dict[str, Any] | None:
    """Evaluate now and add the result to this step's row (a row of its own if none is due)."""
    evaluation = evaluate(run)
    if evaluation is None:
        return record
    step = run.step
    record = record or {
        "step": step,
        "epoch": round(step / run.steps_per_epoch, 4),
        "time": round(time.time() - started, 3),
    }
    record.update(_eval_fields(evaluation))
    run.latest_eval = {"step": step, **evaluation}
    if run.accelerator.is_main_process:
        accuracy = evaluation.get("rewards/accuracies")
        progress.write(
            f"step {step}: eval_loss {evaluation['loss']:.4f}"
            + ("" if accuracy is None else f", eval reward accuracy {accuracy:.3f}")
        )
    return record


def _eval_fields(evaluation: dict[str, float]) -> dict[str, float]:
    """An evaluation as metrics.jsonl fields: eval_loss, eval_rewards/accuracies, ..."""
    return {f"eval_{name}": round(value, 6) for name, value in evaluation.items()}


def _checkpoint_due(run: TrainingRun, result: StepResult) -> bool:
    save_steps = run.config.save_steps
    return (
        (save_steps and run.step % save_steps == 0)
        or run.step == run.total_steps
        or result.stop_requested
    )


# ------------------------------------------------------------------------------ evaluate


def evaluate(run: TrainingRun) -> dict[str, float] | None:
    """The objective's validation metrics (None without validation data): `loss`, the mean loss
    per unit, and its other metrics; callbacks see every evaluation."""
    evaluation = run.objective.evaluate(run)
    if evaluation is not None:
        for callback in run.callbacks:
            callback.on_evaluate(run, evaluation)
    return evaluation


# ------------------------------------------------------------------------------ save


def checkpoint(run: TrainingRun) -> Path:
    """A checkpoint of this step for exact resume (training/checkpoint.py)."""
    saved = save_checkpoint(
        run.accelerator,
        run.files,
        {"step": run.step, "total_steps": run.total_steps, "steps_per_epoch": run.steps_per_epoch},
        run.config.save_total_limit,
        objective_state=run.objective.state_dict(),
    )
    for callback in run.callbacks:
        callback.on_save(run, saved)
    return saved
