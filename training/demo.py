"""The training step of `corral demo`: a short LoRA run that visibly changes the model.

The demo trains with the Dolly template, whose end marker `### End` the base model never writes
on its own: after training, answers to held-out instructions end with it, a difference anyone can
see and count. Sized for a two-core CPU: a few epochs over 20-40 records in about two minutes.
"""

from __future__ import annotations

import os
from pathlib import Path

from corral.training.config import TrainConfig
from corral.training.loop import train

from corral.config import load_config

DEMO_TRAINING = [
    "template=dolly",
    "method=lora",
    "lora_r=16",
    "lora_alpha=32",
    "lora_dropout=0.0",
    "lora_target_modules=[q_proj,k_proj,v_proj,o_proj]",
    "precision=fp32",
    "max_length=384",
    "truncation=truncate",
    "micro_batch_size=4",
    "max_tokens_per_forward=768",
    "epochs=3",
    "learning_rate=1e-3",
    "lr_scheduler=cosine",
    "warmup_steps=2",
    "val_size=0",
    "save_steps=0",
    "save_total_limit=1",
    "logging_steps=1",
    "report_to=[none]",
]


def demo_config(
    data: str | os.PathLike, output_dir: str | os.PathLike, *, model: str = "embedded", **overrides
) -> TrainConfig:
    """The demo's training config; `overrides` are extra config keys (e.g. epochs=1)."""
    extra = [f"{key}={value}" for key, value in overrides.items()]
    return load_config(
        TrainConfig,
        None,
        [*DEMO_TRAINING, f"model={model}", f"data={data}", f"output_dir={output_dir}", *extra],
    )


def train_demo_adapter(
    data: str | os.PathLike, output_dir: str | os.PathLike, *, model: str = "embedded", **overrides
) -> Path:
    """Train the demo LoRA on an Alpaca file in this process; returns the run directory."""

    return train(demo_config(data, output_dir, model=model, **overrides))
