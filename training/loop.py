"""The training run, as a recipe: set up, step, evaluate, checkpoint, save, summarize.

Runs the same under `python train.py`, `corral train` and `accelerate launch` (one process or many:
DDP, FSDP, DeepSpeed come from accelerate's config). `train` reads top to bottom; each part it
calls can be read alone:

- `setup`: accelerator, data (every data problem is reported here, before a model is loaded),
  the step plan, model, optimizer, schedule, and the checkpoint to resume from;
- `step_batches` + `train_step`: the micro-batches of one optimizer step and the step itself;
  `batch_loss` is where the methods differ: the completion-only cross-entropy (lora, qlora, full),
  the DPO loss, or the reward model's pairwise loss (dpo, reward: training/preference.py);
- `evaluate`: the validation loss (and, for preference pairs, the reward metrics), reduced over
  processes;
- `save_checkpoint` (training/checkpoint.py), `save_final` and `write_summary`: the run directory.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import signal
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from corral.training.checkpoint import (
    latest_checkpoint,
    read_trainer_state,
    register_adapter_only_hooks,
    save_checkpoint,
)
from corral.training.config import PREFERENCE_METHODS, RL_METHODS, TrainConfig
from corral.training.data import (
    load_records,
    plan_batches,
    shard_for_process,
    split_by_token_budget,
    split_validation,
    tokenize_records,
)
from corral.training.export import carry_template_for_engines
from corral.training.metrics import MetricsLogger

from corral.config import config_to_yaml, save_config
from corral.errors import ConfigError, CorralError, RecordError, UsageError
from corral.fileio import atomic_write_text, check_output_path, exclusive_output
from corral.rundir import (
    CHECKPOINTS_DIR,
    CONFIG_FILE,
    METRICS_FILE,
    RUN_INFO_FILE,
    SUMMARY_FILE,
    has_run_info,
    run_info_for_training,
    write_run_info,
)


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

    def __enter__(self) -> _StopFlag:
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


@dataclass
class TrainingRun:
    """Everything `setup` builds, and the position of the run (`step`)."""

    config: TrainConfig
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
    run_dir: Path
    resumed_from: Path | None
    step: int = 0
    # The latest logged metrics of this session (train step and evaluation), for the summary.
    latest_train: dict[str, float] = field(default_factory=dict)
    latest_eval: dict[str, float] = field(default_factory=dict)
    # Online RL (method grpo): the objective that owns data, batches, loss, evaluation and state.
    objective: Any = None

    @property
    def pairs(self) -> bool:
        """Whether the run trains on preference pairs (dpo, reward) rather than Alpaca records."""
        return self.config.method in PREFERENCE_METHODS

    @property
    def world(self) -> int:
        return self.accelerator.num_processes

    @property
    def device(self) -> Any:
        return self.accelerator.device

    @property
    def engine_accumulates(self) -> bool:
        """DeepSpeed accumulates gradients itself; everywhere else the loop does."""
        from accelerate.utils import DistributedType

        return self.accelerator.distributed_type == DistributedType.DEEPSPEED


@dataclass
class StepResult:
    """What one optimizer step did, agreed over every process."""

    loss: float  # mean cross-entropy per trained token (dpo, reward: mean loss per pair)
    tokens: int  # non-padding tokens of the step, prompt and answer alike
    seconds: float
    grad_norm: float | None
    stop_requested: bool  # some process received SIGTERM
    metrics: dict[str, float] = field(default_factory=dict)  # dpo, reward: means per pair


@dataclass
class Throughput:
    """Tokens per second of optimizer steps alone (no evaluation, no checkpoint writes)."""

    window_tokens: int = 0
    window_seconds: float = 0.0
    session_tokens: int = 0
    session_seconds: float = 0.0

    def add(self, tokens: int, seconds: float) -> None:
        self.window_tokens += tokens
        self.window_seconds += seconds
        self.session_tokens += tokens
        self.session_seconds += seconds

    def take_window(self) -> float:
        """Tokens/s since the last call (one logging interval)."""
        rate = self.window_tokens / self.window_seconds if self.window_seconds > 0 else 0.0
        self.window_tokens, self.window_seconds = 0, 0.0
        return rate


# ------------------------------------------------------------------------------ the recipe


def train(config: TrainConfig) -> Path:
    """Train as `config` says and return the run directory (its contents: corral/rundir.py)."""
    accelerator = _make_accelerator(config)
    with claim_run_dir(config, accelerator):
        return _train(setup(config, accelerator))


def _train(run: TrainingRun) -> Path:
    from tqdm.auto import tqdm

    config = run.config
    main = run.accelerator.is_main_process
    resumed = run.resumed_from is not None
    metrics = MetricsLogger(
        run.run_dir, config, enabled=main, resume_step=run.step if resumed else None
    )
    progress = tqdm(
        total=run.total_steps, initial=run.step, disable=not main, desc="train", dynamic_ncols=True
    )
    speed = Throughput()
    last_checkpoint = run.resumed_from
    started = time.time()
    try:
        with _StopFlag() as stop:
            if run.step == 0 and run.val_examples:
                # The starting point, so "the loss went down" can be read off metrics.jsonl.
                metrics.log({"step": 0, "epoch": 0.0, **_eval_fields(evaluate(run)), "time": 0.0})
            while run.step < run.total_steps:
                result = train_step(run, step_batches(run), stop_requested=stop.requested)
                speed.add(result.tokens, result.seconds)
                progress.update(1)
                record = _log_record(run, result, speed, started, progress)
                if record is not None:
                    metrics.log(record)
                if _checkpoint_due(run, result):
                    last_checkpoint = save_checkpoint(
                        run.accelerator, run.run_dir, _trainer_state(run), config.save_total_limit
                    )
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


# Files a run writes before its first checkpoint: a folder holding only these is an interrupted start.
RUN_START_FILES = {CONFIG_FILE, METRICS_FILE, "tensorboard", CHECKPOINTS_DIR}


@contextlib.contextmanager
def claim_run_dir(config: TrainConfig, accelerator: Any) -> Iterator[None]:
    """One launch at a time writes a run directory, and never over a finished run unless asked.

    The main process checks and locks the folder; every process learns the verdict before any of
    them does work, so a refused launch stops whole instead of hanging in a collective.
    """
    from accelerate.utils import broadcast_object_list

    run_dir = Path(config.output_dir)
    with contextlib.ExitStack() as held:
        refusal: CorralError | None = None
        if accelerator.is_main_process:
            try:
                check_output_path(run_dir, folder=True, what="output_dir")
                held.enter_context(exclusive_output(run_dir, what="run directory"))
                prepare_run_dir(config, run_dir)
            except CorralError as exc:
                refusal = exc
        verdict = [None if refusal is None else str(refusal)]
        broadcast_object_list(verdict, from_process=0)
        if refusal is not None:
            raise refusal
        if verdict[0] is not None:
            raise UsageError(verdict[0])
        yield


def prepare_run_dir(config: TrainConfig, run_dir: Path) -> None:
    """Refuse an output_dir that holds another run or other files, unless asked to replace it."""
    if not run_dir.exists():
        return
    if latest_checkpoint(run_dir) is not None:
        if config.resume:
            return  # continue it
        if not config.overwrite_output_dir:
            raise ConfigError(
                f"{run_dir} holds checkpoints of an earlier run: set resume=auto to continue it, "
                "overwrite_output_dir=true to replace it, or choose another output_dir"
            )
    else:
        found = sorted(e.name for e in run_dir.iterdir() if not e.name.startswith("."))
        if not set(found) - RUN_START_FILES:
            return  # empty, or a run stopped before its first checkpoint: start it afresh
        if not config.overwrite_output_dir:
            what = "a finished run" if has_run_info(run_dir) else "other files"
            raise ConfigError(
                f"{run_dir} holds {what} ({', '.join(found[:5])}"
                f"{', ...' if len(found) > 5 else ''}): choose another output_dir, or set "
                "overwrite_output_dir=true to replace it"
            )
    # Replacing: the earlier run's record and checkpoints go; its weights are overwritten.
    for name in (CHECKPOINTS_DIR, RUN_INFO_FILE, SUMMARY_FILE, METRICS_FILE):
        path = run_dir / name
        if path.is_dir():
            shutil.rmtree(path)
        else:
            path.unlink(missing_ok=True)


def setup(config: TrainConfig, accelerator: Any) -> TrainingRun:
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
    run_dir = Path(config.output_dir)
    say(f"corral train: resolved config\n{config_to_yaml(config)}")
    set_seed(config.seed)

    # Data first: every data problem is reported here, before the model is loaded.
    with quiet_transformers():
        tokenizer = load_tokenizer(config.model)
    template = get_template(config.template, tokenizer)
    objective = rl_objective(config)
    if objective is not None:
        train_examples, val_examples, report = objective.prepare_examples(tokenizer, template)
    else:
        train_examples, val_examples, report = prepare_examples(config, tokenizer, template)
    unit = "pairs" if config.method in PREFERENCE_METHODS else "examples"
    unit = "prompts" if objective is not None else unit
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
        run_dir.mkdir(parents=True, exist_ok=True)
        save_config(config, run_dir / CONFIG_FILE)
    with quiet_transformers():
        model = build_model(config, tokenizer, local_process_index=accelerator.local_process_index)
    trainable, total = count_parameters(model)
    say(f"model: {config.model} ({config.method}): {trainable:,} trainable of {total:,} parameters")
    say(f"precision: {precision_name(accelerator)} (precision={config.precision})")
    if objective is not None:
        say(objective.describe())
    if config.method == "dpo":
        say(
            f"dpo: beta {config.beta}, loss {config.loss_type}; the policy starts from "
            + (
                f"the adapter of {config.init_adapter} (its LoRA settings); reference policy: "
                "the base with that adapter, frozen"
                if config.init_adapter
                else "a fresh adapter; reference policy: the base (adapter disabled)"
            )
        )
    optimizer = build_optimizer(config, model)
    scheduler = build_scheduler(config, optimizer, total_steps)
    if config.method != "full":
        register_adapter_only_hooks(accelerator)
    model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)

    if objective is not None:
        # The rollout later iterations reuse goes into every checkpoint (main process's only).
        accelerator.register_for_checkpointing(objective)
    step = 0
    resume_from = resolve_resume(config, run_dir)
    if resume_from is not None:
        accelerator.load_state(str(resume_from))
        step = read_trainer_state(resume_from)["step"]
        say(f"resumed from {resume_from} at step {step}")
    if accelerator.device.type == "cpu":
        # Softmax over a 49K vocabulary leaves most probabilities (and their gradients) below
        # fp32's normal range; x86 arithmetic on such denormals is tens of times slower. Flushing
        # them to zero changes the loss by less than 1e-38 and keeps every step at full speed.
        torch.set_flush_denormal(True)
    say(
        f"training: {total_steps} steps ({steps_per_epoch} per epoch), "
        f"{accelerator.num_processes} process(es), micro-batch {config.micro_batch_size} x "
        f"{config.gradient_accumulation_steps} accumulation, run dir {run_dir}"
    )
    return TrainingRun(
        config=config,
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
        run_dir=run_dir,
        resumed_from=resume_from,
        step=step,
        objective=objective,
    )


def rl_objective(config: TrainConfig) -> Any:
    """Online RL's objective (method grpo), or None for the methods this loop runs itself.

    The one place the loop asks for GRPO, until the loop takes one objective per method: where
    `run.objective` is set, the loop's data, batches, loss units, loss, step metrics, evaluation
    and summary come from it (training/grpo_objective.py).
    """
    if config.method not in RL_METHODS:
        return None
    from corral.training.grpo_objective import GRPOObjective

    return GRPOObjective(config)


def prepare_examples(config: TrainConfig, tokenizer: Any, template: Any) -> tuple[list, list, Any]:
    """(train examples, validation examples, tokenization report); bad data raises RecordError.

    For dpo and reward, the examples are preference pairs (training.preference.PreferencePair).
    """
    if config.method in PREFERENCE_METHODS:
        from corral.training.preference import prepare_pairs

        return prepare_pairs(config, tokenizer, template)
    records = load_records(config.data, split=config.data_split)
    train_records, val_records = split_validation(records, config.val_size, config.seed)
    common = {
        "max_length": config.max_length,
        "truncation": config.truncation,
        "train_on_inputs": config.train_on_inputs,
        "source": config.data,
    }
    tokenize = tokenize_records
    if records and "messages" in records[0]:
        from corral.training.conversations import tokenize_conversations

        # Conversations: the loss on every answer; the prompt is never trained.
        common.pop("train_on_inputs")
        tokenize = tokenize_conversations
    train_examples, report = tokenize(train_records, tokenizer, template, **common)
    val_examples: list = []
    if val_records:
        # The validation split may lose every record to max_length without being an error.
        try:
            val_examples, _ = tokenize(val_records, tokenizer, template, **common)
        except RecordError:
            val_examples = []
    return train_examples, val_examples, report


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


def _make_accelerator(config: TrainConfig) -> Any:
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


def resolve_resume(config: TrainConfig, run_dir: Path) -> Path | None:
    if not config.resume:
        return None
    if config.resume == "auto":
        return latest_checkpoint(run_dir)
    checkpoint = Path(config.resume)
    if not (checkpoint / "trainer_state.json").is_file():
        raise ConfigError(f"key 'resume': {checkpoint} is not a complete checkpoint folder")
    return checkpoint


# ------------------------------------------------------------------------------ one step


def step_batches(run: TrainingRun) -> list[dict[str, Any]]:
    """This process's forward passes for optimizer step `run.step` (the same on a resume)."""
    if run.objective is not None:
        return run.objective.make_batches(run)
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
    # Each micro-batch may run as several forward passes of at most max_tokens_per_forward
    # tokens: the same examples, the same gradient, bounded activation memory.
    return [
        collate_examples(run, [run.train_examples[i] for i in chunk])
        for indices in micro
        for chunk in split_by_token_budget(indices, run.lengths, config.max_tokens_per_forward)
    ]


def collate_examples(run: TrainingRun, examples: list) -> dict[str, Any]:
    """One forward pass's batch: padded or packed examples, or pairs (chosen rows, then rejected)."""
    from corral.training.batches import collate
    from corral.training.preference import collate_pairs

    return (collate_pairs if run.pairs else collate)(
        examples,
        packing=run.config.packing,
        pad_token_id=run.tokenizer.pad_token_id,
        row_capacity=run.config.max_length,
    )


def batch_loss(run: TrainingRun, batch: dict[str, Any]) -> tuple[Any, dict[str, float]]:
    """(the loss summed over the batch's units, metric sums): where the methods differ.

    lora, qlora, full: cross-entropy summed over trained tokens; dpo: the DPO loss summed over
    pairs (reference and policy log-probabilities of the same model); reward: the pairwise ranking
    loss summed over pairs. `loss_units` gives what each sum is divided by.
    """
    from corral.training.batches import completion_loss_sum
    from corral.training.preference import dpo_loss_sum, reward_loss_sum

    if run.objective is not None:
        return run.objective.loss_sum(run, batch)
    method = run.config.method
    if method == "dpo":
        return dpo_loss_sum(
            run.model,
            batch,
            run.device,
            peft_model=run.accelerator.unwrap_model(run.model),
            beta=run.config.beta,
            loss_type=run.config.loss_type,
        )
    if method == "reward":
        return reward_loss_sum(run.model, batch, run.device)
    loss_sum, _ = completion_loss_sum(run.model, batch, run.device)
    return loss_sum, {}


def loss_units(run: TrainingRun, batch: dict[str, Any]) -> int:
    """What the loss is a mean over: trained tokens (SFT) or pairs (dpo, reward)."""
    if run.objective is not None:
        return run.objective.loss_units(batch)
    if run.pairs:
        return batch["num_pairs"]
    return int((batch["targets"] != -100).sum())


def metric_names(run: TrainingRun) -> tuple[str, ...]:
    """The metrics besides the loss that steps and evaluations report (none for SFT)."""
    from corral.training.preference import PAIR_METRICS

    return PAIR_METRICS.get(run.config.method, ())


def train_step(
    run: TrainingRun, batches: list[dict[str, Any]], *, stop_requested: bool
) -> StepResult:
    """Forward and backward over `batches`, then one optimizer and scheduler step."""
    import torch

    started = time.monotonic()
    accelerator, model, device, world = run.accelerator, run.model, run.device, run.world
    # Normalise by the trained tokens (or pairs) of the whole step on every process, so the
    # gradient is the per-unit mean however the units fall across forward passes and ranks (data
    # parallel averages gradients over ranks, hence the factor `world`).
    local_units = sum(loss_units(run, b) for b in batches)
    global_units = accelerator.reduce(
        torch.tensor(float(local_units), device=device), reduction="sum"
    ).item()
    scale = world / max(global_units, 1.0)
    if run.engine_accumulates:
        scale *= run.config.gradient_accumulation_steps  # DeepSpeed divides by its accumulation
    loss_sum_total = 0.0
    nonfinite = 0.0
    names = metric_names(run)
    metric_sums = [0.0] * len(names)
    for position, batch in enumerate(batches):
        if run.engine_accumulates:
            context = accelerator.accumulate(model)
        elif position == len(batches) - 1:
            context = contextlib.nullcontext()
        else:
            context = accelerator.no_sync(model)  # gradients all-reduced once per step
        with context:
            loss_sum, sums = batch_loss(run, batch)
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
    return StepResult(
        loss=float(agreed[0]) / max(global_units, 1.0),
        tokens=int(agreed[3]),
        seconds=time.monotonic() - started,
        grad_norm=grad_norm,
        stop_requested=bool(agreed[2] > 0),
        metrics={
            **{name: float(agreed[4 + i]) / max(global_units, 1.0) for i, name in enumerate(names)},
            **({} if run.objective is None else run.objective.step_metrics(run)),
        },
    )


def _log_record(
    run: TrainingRun, result: StepResult, speed: Throughput, started: float, progress: Any
) -> dict[str, Any] | None:
    """The metrics row of this step (training every logging_steps, eval every eval_steps)."""
    config, step = run.config, run.step
    last = step == run.total_steps
    record: dict[str, Any] | None = None
    if step % config.logging_steps == 0 or last:
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
    if (config.eval_steps and step % config.eval_steps == 0) or last:
        evaluation = evaluate(run)
        if evaluation is not None:
            record = record or {
                "step": step,
                "epoch": round(step / run.steps_per_epoch, 4),
                "time": round(time.time() - started, 3),
            }
            record.update(_eval_fields(evaluation))
            run.latest_eval = {"step": step, **evaluation}
            if run.accelerator.is_main_process:
                accuracy = evaluation.get("rewards/accuracies")
                reward = evaluation.get("reward")  # grpo: the held-out reward
                progress.write(
                    f"step {step}: eval_loss {evaluation['loss']:.4f}"
                    + ("" if accuracy is None else f", eval reward accuracy {accuracy:.3f}")
                    + ("" if reward is None else f", held-out reward {reward:.3f}")
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


def _trainer_state(run: TrainingRun) -> dict[str, Any]:
    return {
        "step": run.step,
        "total_steps": run.total_steps,
        "steps_per_epoch": run.steps_per_epoch,
    }


# ------------------------------------------------------------------------------ evaluate


def evaluate(run: TrainingRun) -> dict[str, float] | None:
    """Validation metrics (None without validation data): `loss`, the mean loss per trained token
    (per pair for dpo and reward), and for pairs the reward metrics, means per pair."""
    import torch

    if run.objective is not None:
        return run.objective.evaluate(run)
    if not run.val_examples:
        return None
    config, device, model = run.config, run.device, run.model
    names = metric_names(run)
    model.eval()
    shard = run.val_examples[run.accelerator.process_index :: run.world]
    sums = torch.zeros(2 + len(names), dtype=torch.float64, device=device)
    with torch.no_grad():
        for start in range(0, len(shard), config.micro_batch_size):
            batch = collate_examples(run, shard[start : start + config.micro_batch_size])
            loss_sum, metric_sums = batch_loss(run, batch)
            values = [loss_sum.item(), loss_units(run, batch), *(metric_sums[n] for n in names)]
            sums += torch.tensor(values, dtype=torch.float64, device=device)
    model.train()
    sums = run.accelerator.reduce(sums, reduction="sum")
    means = [float(total / sums[1]) for total in sums[2:]]
    return {"loss": float(sums[0] / sums[1]), **dict(zip(names, means, strict=True))}


# ------------------------------------------------------------------------------ save


def save_final(run: TrainingRun) -> None:
    """The run directory's top level: adapter (or full weights), tokenizer, run_info.json."""
    from accelerate.utils import DistributedType
    from corral.training.model import REFERENCE_ADAPTER

    import corral
    from corral.models import resolve_model

    accelerator = run.accelerator
    accelerator.wait_for_everyone()
    state_dict = None
    if accelerator.distributed_type in (DistributedType.FSDP, DistributedType.DEEPSPEED):
        state_dict = accelerator.get_state_dict(run.model)  # gathers the shards on the main process
    unwrapped = accelerator.unwrap_model(run.model)
    if accelerator.is_main_process:
        # An adapter run carries the chat template too: vLLM serves a LoRA module with the base's
        # tokenizer, and takes this folder's template with --chat-template RUN/chat_template.jinja.
        full_weights = run.config.method == "full"
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
            base_model=run.config.model,
            base_model_path=resolve_model(run.config.model),
            method=run.config.method,
            template=run.template,
            max_length=run.config.max_length,
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
    }
    if run.objective is not None:
        summary.update(run.objective.summary_fields(run))
    if run.pairs:
        # Pairs, not examples, for dpo and reward; the final metrics of this session.
        summary["method"] = run.config.method
        summary["train_metrics"] = _rounded(run.latest_train)
        summary["eval_metrics"] = _rounded(run.latest_eval)
        if run.config.method == "reward":
            # The held-out pairwise accuracy: how often the reward model ranks chosen first.
            summary["pairwise_accuracy"] = run.latest_eval.get("rewards/accuracies")
    atomic_write_text(run.run_dir / SUMMARY_FILE, json.dumps(summary, indent=2) + "\n")


def _rounded(metrics: dict[str, float]) -> dict[str, float]:
    return {name: round(value, 6) for name, value in metrics.items()}


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
