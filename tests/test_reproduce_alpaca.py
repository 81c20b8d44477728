"""scripts/reproduce_alpaca.sh --dry-run: every command it would run, and each one is valid."""

from __future__ import annotations

import shlex
import subprocess
from pathlib import Path

import pytest

from corral.cli import build_parser
from corral.config import load_config

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "scripts" / "reproduce_alpaca.sh"


def dry_run(*args: str) -> list[list[str]]:
    result = subprocess.run(
        ["bash", str(SCRIPT), "--dry-run", *args], capture_output=True, text=True, cwd=REPO
    )
    assert result.returncode == 0, result.stderr
    assert "nothing was run" in result.stdout
    return [
        shlex.split(line.split("] ", 1)[1])
        for line in result.stdout.splitlines()
        if line.startswith("[")
    ]


def _check_train_command(argv: list[str]) -> tuple[str, object]:
    """The accelerate config exists and the training preset loads with the given overrides."""
    from training.config import TrainConfig

    assert argv[1:3] == ["launch", "--config_file"]
    assert (REPO / argv[3]).is_file()
    script_at = argv.index("train.py")
    preset, overrides = argv[script_at + 2], argv[script_at + 3 :]
    assert argv[script_at + 1] == "--config"
    return argv[3], load_config(TrainConfig, REPO / preset, overrides)


def test_full_recipe_dry_run_prints_the_four_steps():
    generate, train, evaluate, report = dry_run("--teacher-base-url", "http://127.0.0.1:8000/v1")
    parser = build_parser()
    gen_args = parser.parse_args(generate[1:])
    assert gen_args.num_instructions == 52000 and gen_args.base_url == "http://127.0.0.1:8000/v1"
    assert Path(gen_args.seed_tasks).name == "seed_tasks.jsonl"
    accel_config, config = _check_train_command(train)
    assert accel_config.endswith("fsdp.yaml") and "--num_processes" in train
    assert config.method == "full" and config.learning_rate == 2e-5 and config.resume == "auto"
    assert config.data == gen_args.output
    eval_args = parser.parse_args(evaluate[1:])
    assert eval_args.tuned == config.output_dir and eval_args.judge_base_url
    report_args = parser.parse_args(report[1:])
    assert report_args.inputs == [gen_args.output, config.output_dir, eval_args.output]


@pytest.mark.parametrize(
    ("method", "gpus", "accel"), [("lora", "8", "ddp"), ("qlora", "1", "single_device")]
)
def test_lora_and_qlora_recipes(method, gpus, accel):
    train = dry_run("--method", method, "--gpus", gpus)[1]
    accel_config, config = _check_train_command(train)
    assert Path(accel_config).stem == accel
    assert config.method == method


def test_scaled_down_uses_the_embedded_model_on_cpu_presets():
    generate, train, evaluate, _ = dry_run("--scaled-down")
    gen_args = build_parser().parse_args(generate[1:])
    assert gen_args.num_instructions <= 10
    _, config = _check_train_command(train)
    assert config.model == "embedded" and config.max_steps > 0
    assert build_parser().parse_args(evaluate[1:]).judge == "embedded"


def test_bad_option_exits_2():
    result = subprocess.run(
        ["bash", str(SCRIPT), "--method", "rlhf"], capture_output=True, text=True
    )
    assert result.returncode == 2 and "--method must be" in result.stderr
