"""A training run while it trains: what `setup` built and where the run stands (training/loop.py).

Objectives (training/objectives.py) and callbacks (training/callbacks.py) receive it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from corral.training.callbacks import TrainingCallback
from corral.training.config import TrainConfig
from corral.training.objectives import Objective

from corral.rundir import RunDir


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
