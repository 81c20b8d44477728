"""Every training and accelerate config loads, and each starts with the command that uses it."""

from __future__ import annotations

from pathlib import Path

import pytest
from corral.training.config import TrainConfig

from corral.config import ConfigError, load_config

REPO = Path(__file__).resolve().parents[1]
TRAINING_CONFIGS = sorted((REPO / "configs" / "training").glob("*.yaml"))
ACCELERATE_CONFIGS = sorted((REPO / "configs" / "accelerate").glob("*.yaml"))


def test_the_expected_presets_exist():
    assert {p.stem for p in TRAINING_CONFIGS} >= {
        "smoke",
        "alpaca_full_7b",
        "alpaca_lora_7b",
        "qlora_7b",
    }
    assert {p.stem for p in ACCELERATE_CONFIGS} >= {
        "single_device",
        "ddp",
        "fsdp",
        "deepspeed_zero2",
        "deepspeed_zero3",
        "two_nodes",
    }


@pytest.mark.parametrize("path", TRAINING_CONFIGS, ids=lambda p: p.name)
def test_training_config_loads_and_names_its_command(path):
    config = load_config(TrainConfig, path)
    first = path.read_text().splitlines()[0]
    assert (
        first.startswith("# ") and "train.py" in first and f"configs/training/{path.name}" in first
    )
    if "smoke" in path.stem:
        assert config.model == "embedded"  # the CPU versions the tests run
    else:
        assert "7b" in path.stem and config.model != "embedded"


@pytest.mark.parametrize("path", ACCELERATE_CONFIGS, ids=lambda p: p.name)
def test_accelerate_config_loads_and_names_its_command(path):
    from accelerate.commands.config.config_args import load_config_from_file

    config = load_config_from_file(str(path))
    first = path.read_text().splitlines()[0]
    assert "accelerate launch" in first and f"configs/accelerate/{path.name}" in first
    assert config.num_processes >= 1
    # Precision belongs to the training config; an accelerate file must not silently override it.
    assert config.mixed_precision in (None, "no")


def test_presets_match_the_published_recipes():
    full = load_config(TrainConfig, REPO / "configs/training/alpaca_full_7b.yaml")
    assert (full.learning_rate, full.epochs, full.max_length, full.lr_scheduler) == (
        2e-5,
        3,
        512,
        "cosine",
    )
    assert full.micro_batch_size * full.gradient_accumulation_steps * 8 == 128
    lora = load_config(TrainConfig, REPO / "configs/training/alpaca_lora_7b.yaml")
    assert (lora.lora_r, lora.lora_alpha, lora.lora_target_modules) == (8, 16, ["q_proj", "v_proj"])
    assert lora.micro_batch_size * lora.gradient_accumulation_steps == 128
    qlora = load_config(TrainConfig, REPO / "configs/training/qlora_7b.yaml")
    assert (qlora.method, qlora.lora_r, qlora.max_grad_norm, qlora.lr_scheduler) == (
        "qlora",
        64,
        0.3,
        "constant",
    )
    assert qlora.lora_target_modules == ["all-linear"] and qlora.gradient_checkpointing


def test_invalid_values_are_config_errors():
    with pytest.raises(ConfigError, match="micro_batch_size"):
        load_config(TrainConfig, None, ["micro_batch_size=0"])
    with pytest.raises(ConfigError, match="method"):
        load_config(TrainConfig, None, ["method=ia3"])
    with pytest.raises(ConfigError, match="report_to"):
        load_config(TrainConfig, None, ["report_to=[mlflow]"])


def test_demo_config_is_valid():
    from corral.training.demo import demo_config

    config = demo_config("data.json", "runs/demo", epochs=1)
    assert (config.template, config.method, config.epochs, config.data) == (
        "dolly",
        "lora",
        1.0,
        "data.json",
    )
