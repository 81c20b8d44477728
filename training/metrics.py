"""A run's metrics: `metrics.jsonl` always (main process), TensorBoard and W&B when configured.

A resumed run rewrites the history after its checkpoint, so no step appears twice in any of them.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from typing import Any

from corral.training.config import TrainConfig

from corral.fileio import atomic_write_text
from corral.rundir import RunDir


class MetricsLogger:
    """metrics.jsonl always (main process); TensorBoard and W&B when configured."""

    def __init__(
        self, run_dir: RunDir, config: TrainConfig, *, enabled: bool, resume_step: int | None
    ) -> None:
        self.enabled = enabled
        self.path = run_dir.metrics_file
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
                log_dir=str(run_dir.tensorboard_dir), purge_step=(resume_step or 0) + 1
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
                    name=run_dir.root.name,
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
