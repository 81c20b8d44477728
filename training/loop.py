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
- `save_checkpoint` (training/checkpoint.py), `save_final` and `write_summary`: the run directory,
  whose every path and whose lifecycle (claim, refuse, replace, resume) corral/rundir.py owns.

Tools that watch a run (scripts/gpu_check.py, the benchmarks) pass callbacks
(training/callbacks.py), called at setup, each step's start and end, each evaluation and each save.
"""

from __future__ import annotations

import contextlib
import json
import math
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
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
from corral.training.data import plan_batches, shard_for_process
from corral.training.export import carry_template_for_engines
from corral.training.metrics import MetricsLogger, Throughput
from corral.training.objectives import Objective, objective_for
from corral.training.processes import (
    StopFlag,
    check_ranks_agree,
    engine_accumulates,
    make_accelerator,
    precision_name,
)

from corral.config import config_to_yaml, save_config
from corral.errors import CorralError, RecordError, UsageError
from corral.fileio import atomic_write_text
from corral.rundir import RunDir, run_info_for_training, write_run_info


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


@dataclass
class TrainingRun:
    """Everything `setup` builds, and the position of the run (`step`)."""

    config: TrainConfig
    objective: Objective
    accelerator: Any
    tokenizer: Any
    template: Any
    train_examples: list
    val_examples: list
    tokenization: Any  # training.data.TokenizationReport
    lengths: list[int]
    steps_per_epoch: int
    total_steps: int
    model: Any
    optimizer: Any
    scheduler: Any
    trainable_parameters: int
    files: RunDir
    resumed_from: Path | None
    step: int = 0
    callbacks: Sequence[TrainingCallback] = ()
    # The latest logged metrics of this session (train step and evaluation), for the summary.
    latest_train: dict[str, float] = field(default_factory=dict)
    latest_eval: dict[str, float] = field(default_factory=dict)

    @property
    def run_dir(self) -> Path:
        return self.files.root

    @property
    def world(self) -> int:
        return self.accelerator.num_processes

    @property
    def device(self) -> Any:
        return self.accelerator.device


@dataclass
class StepResult:
    """What one optimizer step did, agreed over every process."""

    loss: float  # mean loss per loss unit (sft: trained token; dpo, reward: pair)
    tokens: int  # non-padding tokens of the step, prompt and answer alike
    seconds: float
    grad_norm: float | None
    stop_requested: bool  # some process received SIGTERM
    # The objective's metrics (means per loss unit) and its extra step metrics (timings, ...).
    metrics: dict[str, float] = field(default_factory=dict)


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


@contextlib.contextmanager
def claim_run_dir(config: TrainConfig, accelerator: Any) -> Iterator[None]:
    """One launch at a time writes a run directory, and never over a finished run unless asked.

    The main process claims the folder (corral/rundir.py: lock, refuse or replace); every process
    learns the verdict before any of them does work, so a refused launch stops whole instead of
    hanging in a collective.
    """
    from accelerate.utils import broadcast_object_list

    files = RunDir(config.output_dir)
    with contextlib.ExitStack() as held:
        refusal: CorralError | None = None
        if accelerator.is_main_process:
            try:
                held.enter_context(
                    files.claim(resume=bool(config.resume), overwrite=config.overwrite_output_dir)
                )
            except CorralError as exc:
                refusal = exc
        verdict = [None if refusal is None else str(refusal)]
        broadcast_object_list(verdict, from_process=0)
        if refusal is not None:
            raise refusal
        if verdict[0] is not None:
            raise UsageError(verdict[0])
        yield


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
    template = get_template(config.template, tokenizer)
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


def count_steps_per_epoch(config: TrainConfig, lengths: list[int], world: int) -> int:
    """Optimizer steps in one epoch: whole steps of every process's shard of the batch plan."""
    per_step = config.gradient_accumulation_steps
    plan = plan_batches(
        lengths, config.micro_batch_size, seed=config.seed, epoch=0, group_by_length=False
    )
    batches = shard_for_process(plan, num_processes=world, process_index=0, per_step=per_step)
    steps = len(batches) // per_step
    if steps == 0:
        raise RecordError(
            config.data,
            f"{len(lengths)} training examples do not fill one optimizer step of "
            f"{config.micro_batch_size} x {per_step} accumulation x {world} processes; "
            "lower micro_batch_size or gradient_accumulation_steps",
        )
    return steps


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


def save_final(run: TrainingRun) -> None:
    """The run directory's top level: adapter (or full weights), tokenizer, run_info.json."""
    from accelerate.utils import DistributedType
    from corral.training.model import REFERENCE_ADAPTER

    import corral
    from corral.models import resolve_model

    accelerator, config = run.accelerator, run.config
    accelerator.wait_for_everyone()
    state_dict = None
    if accelerator.distributed_type in (DistributedType.FSDP, DistributedType.DEEPSPEED):
        state_dict = accelerator.get_state_dict(run.model)  # gathers the shards on the main process
    unwrapped = accelerator.unwrap_model(run.model)
    if accelerator.is_main_process:
        # An adapter run carries the chat template too: vLLM serves a LoRA module with the base's
        # tokenizer, and takes this folder's template with --chat-template RUN/chat_template.jinja.
        full_weights = config.weights == "full"
        carry_template_for_engines(
            run.tokenizer, run.template, unwrapped.generation_config if full_weights else None
        )
        # dpo after init_adapter: the trained adapter only, not the frozen reference copy.
        only_trained = (
            {"selected_adapters": ["default"]}
            if REFERENCE_ADAPTER in getattr(unwrapped, "peft_config", {})
            else {}
        )
        unwrapped.save_pretrained(
            run.run_dir, state_dict=state_dict, safe_serialization=True, **only_trained
        )
        run.tokenizer.save_pretrained(run.run_dir)
        info = run_info_for_training(
            base_model=config.model,
            base_model_path=resolve_model(config.model),
            method=config.recorded_method,
            objective=config.objective,
            weights=config.weights,
            template=run.template,
            max_length=config.max_length,
            corral_version=corral.__version__,
        )
        write_run_info(run.run_dir, info)
    accelerator.wait_for_everyone()


def write_summary(run: TrainingRun, speed: Throughput, *, seconds: float) -> None:
    """`train_summary.json`, after checking that data-parallel ranks ended with equal weights."""
    fingerprints = check_ranks_agree(run.accelerator, run.model)
    if not run.accelerator.is_main_process:
        return
    summary = {
        "steps": run.step,
        "world_size": run.world,
        "train_examples": len(run.train_examples),
        "validation_examples": len(run.val_examples),
        "tokenization": {k: v for k, v in vars(run.tokenization).items() if k != "dropped_indices"},
        "trainable_parameters": run.trainable_parameters,
        "session_tokens": speed.session_tokens,
        "session_train_seconds": round(speed.session_seconds, 3),
        "session_tokens_per_s": round(speed.session_tokens / speed.session_seconds, 2)
        if speed.session_seconds
        else None,
        "rank_fingerprints": fingerprints,
        "precision": precision_name(run.accelerator),
        "seconds": round(seconds, 2),
        "objective": run.config.objective,
        "weights": run.config.weights,
        **run.objective.summary_fields(run),
    }
    atomic_write_text(run.files.summary_file, json.dumps(summary, indent=2) + "\n")
