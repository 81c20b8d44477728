"""Hooks into a training run, for tools that watch it (scripts/gpu_check.py, the benchmarks, tests).

    class Timer(TrainingCallback):
        def on_step_end(self, run, result, batches):
            print(run.step, result.loss, result.seconds)

    train(config, callbacks=[Timer()])

The loop calls every callback, in order, at each point below. A callback observes: it must not
change the run (its model, optimizer or position), or resume would no longer be exact.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any


class TrainingCallback:
    """Override the points you need; the others do nothing."""

    def on_setup(self, run: Any) -> None:
        """After setup: data, model, optimizer and the resume point are ready (`run.step`)."""

    def on_step_begin(self, run: Any, batches: list[dict[str, Any]]) -> None:
        """Before optimizer step `run.step + 1`, with this process's forward passes."""

    def on_step_end(self, run: Any, result: Any, batches: list[dict[str, Any]]) -> None:
        """After the optimizer step (`run.step` counts it); `result` is a loop.StepResult."""

    def on_evaluate(self, run: Any, evaluation: dict[str, float]) -> None:
        """After an evaluation at step `run.step` (0: before training), on every process."""

    def on_save(self, run: Any, checkpoint: Path) -> None:
        """After a checkpoint is complete (renamed into place) on every process."""
