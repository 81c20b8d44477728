"""scripts/reproduce_alpaca.sh --dry-run: every command it would run, and each one is valid.

The dry run only checks that the seed tasks and the evaluation set exist, so most tests pass
placeholder files; the one about the default paths needs the Self-Instruct reference data."""

from __future__ import annotations

import shlex
import subprocess
from pathlib import Path

import pytest

from corral.cli import build_parser
from corral.config import load_config

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "scripts" / "reproduce_alpaca.sh"


def dry_run(*args: str) -> tuple[list[list[str]], str]:
    """The commands the dry run prints, in order, and its stderr."""
    result = subprocess.run(
        ["bash", str(SCRIPT), "--dry-run", *args], capture_output=True, text=True, cwd=REPO
    )
    assert result.returncode == 0, result.stderr
    assert "nothing was run" in result.stdout
    commands = [
        shlex.split(line.split("] ", 1)[1])
        for line in result.stdout.splitlines()
        if line.startswith("[")
    ]
    return commands, result.stderr


@pytest.fixture
def data_files(tmp_path) -> list[str]:
    """Placeholder seed tasks and evaluation set (a dry run only checks that they exist)."""
    seeds = tmp_path / "seed_tasks.jsonl"
    eval_set = tmp_path / "user_oriented_instructions.jsonl"
    for path in (seeds, eval_set):
        path.write_text("")
    return ["--seed-tasks", str(seeds), "--eval-set", str(eval_set)]


def _check_train_command(argv: list[str]) -> tuple[str, object]:
    """The accelerate config exists and the training preset loads with the given overrides."""
    from corral.training.config import TrainConfig

    assert argv[1:3] == ["launch", "--config_file"]
    assert (REPO / argv[3]).is_file()
    script_at = argv.index("train.py")
    preset, overrides = argv[script_at + 2], argv[script_at + 3 :]
    assert argv[script_at + 1] == "--config"
    return argv[3], load_config(TrainConfig, REPO / preset, overrides)


def test_full_recipe_dry_run_prints_the_four_steps(data_files):
    seeds, eval_set = Path(data_files[1]), Path(data_files[3])
    (generate, train, evaluate, report), _ = dry_run(
        "--teacher-base-url", "http://127.0.0.1:8000/v1", *data_files
    )
    parser = build_parser()
    gen_args = parser.parse_args(generate[1:])
    assert gen_args.num_instructions == 52000 and gen_args.base_url == "http://127.0.0.1:8000/v1"
    assert Path(gen_args.seed_tasks) == seeds
    accel_config, config = _check_train_command(train)
    assert accel_config.endswith("fsdp.yaml") and "--num_processes" in train
    assert config.method == "full" and config.learning_rate == 2e-5 and config.resume == "auto"
    assert config.data == gen_args.output
    eval_args = parser.parse_args(evaluate[1:])
    assert Path(eval_args.eval_set) == eval_set
    assert eval_args.tuned == config.output_dir and eval_args.judge_base_url
    report_args = parser.parse_args(report[1:])
    assert report_args.inputs == [gen_args.output, config.output_dir, eval_args.output]
    assert Path(report_args.seed_tasks) == seeds


def test_defaults_are_the_self_instruct_reference_data(seed_tasks_path, user_oriented_path):
    """Without --seed-tasks or --eval-set: the 175 seeds and the user-oriented set in ../shared."""
    (generate, _, evaluate, _), stderr = dry_run()
    parser = build_parser()
    assert Path(parser.parse_args(generate[1:]).seed_tasks).resolve() == seed_tasks_path.resolve()
    assert Path(parser.parse_args(evaluate[1:]).eval_set).resolve() == user_oriented_path.resolve()
    assert stderr == ""


def test_a_missing_evaluation_set_drops_the_evaluation_step_and_says_so(data_files, tmp_path):
    missing = tmp_path / "no_eval_set.jsonl"
    (generate, train, report), stderr = dry_run(*data_files[:2], "--eval-set", str(missing))
    assert generate[1] == "generate" and "train.py" in train and report[1] == "report"
    assert f"evaluation set not found at {missing}" in stderr and "Skipping evaluation" in stderr
    report_args = build_parser().parse_args(report[1:])
    assert not any(path.endswith("eval.json") for path in report_args.inputs)


@pytest.mark.parametrize(
    ("method", "gpus", "accel"), [("lora", "8", "ddp"), ("qlora", "1", "single_device")]
)
def test_lora_and_qlora_recipes(method, gpus, accel, data_files):
    train = dry_run("--method", method, "--gpus", gpus, *data_files)[0][1]
    accel_config, config = _check_train_command(train)
    assert Path(accel_config).stem == accel
    assert config.method == method


def test_scaled_down_uses_the_embedded_model_on_cpu_presets(data_files):
    (generate, train, evaluate, _), _ = dry_run("--scaled-down", *data_files)
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


def test_estimate_runs_only_the_estimate(data_files):
    (estimate,), _ = dry_run("--estimate", "--teacher-base-url", "http://h/v1", *data_files)
    args = build_parser().parse_args(estimate[1:])
    assert args.estimate and args.num_instructions == 52000


def test_score_filter_trains_on_the_audited_best(data_files):
    commands, _ = dry_run("--score-filter", "4.5", *data_files)
    generate, score, audit, train = commands[:4]
    parser = build_parser()
    gen_args, score_args, audit_args = (parser.parse_args(c[1:]) for c in (generate, score, audit))
    assert score_args.input == gen_args.output and score_args.judge_base_url
    assert audit_args.data == score_args.output and audit_args.min_score == 4.5
    _, config = _check_train_command(train)
    assert config.data == audit_args.fix != gen_args.output


def test_dpo_recipe_trains_sft_then_dpo_from_it_and_judges_dpo_against_sft(data_files):
    (generate, sft, preferences, dpo, evaluate, report), _ = dry_run("--recipe", "dpo", *data_files)
    parser = build_parser()
    _, sft_config = _check_train_command(sft)
    assert sft_config.method == "lora"
    pref_args = parser.parse_args(preferences[1:])
    assert pref_args.mode == "preferences"
    assert f"preference_prompts={parser.parse_args(generate[1:]).output}" in pref_args.overrides
    assert f"answer_sources=[teacher,{sft_config.output_dir}]" in pref_args.overrides
    _, dpo_config = _check_train_command(dpo)
    assert dpo_config.method == "dpo" and dpo_config.init_adapter == sft_config.output_dir
    assert dpo_config.data == pref_args.output and dpo_config.template == sft_config.template
    assert dpo_config.model == sft_config.model
    eval_args = parser.parse_args(evaluate[1:])
    assert (eval_args.base, eval_args.tuned) == (sft_config.output_dir, dpo_config.output_dir)
    assert dpo_config.output_dir in parser.parse_args(report[1:]).inputs


def test_scaled_down_dpo_recipe_trains_on_the_hand_written_pairs(data_files):
    (_, sft, dpo, evaluate, _), stderr = dry_run("--recipe", "dpo", "--scaled-down", *data_files)
    _, sft_config = _check_train_command(sft)
    _, dpo_config = _check_train_command(dpo)
    assert dpo_config.method == "dpo" and dpo_config.init_adapter == sft_config.output_dir
    assert dpo_config.data.endswith("smoke_preferences.jsonl") and Path(dpo_config.data).is_file()
    assert (dpo_config.model, dpo_config.template) == (sft_config.model, sft_config.template)
    assert "smoke_preferences.jsonl" in stderr
    eval_args = build_parser().parse_args(evaluate[1:])
    assert (eval_args.base, eval_args.tuned) == (sft_config.output_dir, dpo_config.output_dir)


@pytest.mark.parametrize("scaled", [False, True])
def test_vicuna_recipe_generates_conversations_and_trains_the_vicuna_format(data_files, scaled):
    args = ["--recipe", "vicuna", *data_files] + (["--scaled-down"] if scaled else [])
    (generate, train, evaluate, report), _ = dry_run(*args)
    gen_args = build_parser().parse_args(generate[1:])
    assert gen_args.mode == "conversations" and gen_args.output.endswith("conversations.json")
    _, config = _check_train_command(train)
    assert config.template == "vicuna" and config.data == gen_args.output
    assert config.method == ("lora" if scaled else "full")
    assert build_parser().parse_args(evaluate[1:]).tuned == config.output_dir


def test_a_dpo_recipe_needs_lora():
    result = subprocess.run(
        ["bash", str(SCRIPT), "--dry-run", "--recipe", "dpo", "--method", "qlora"],
        capture_output=True, text=True, cwd=REPO,
    )  # fmt: skip
    assert result.returncode == 2 and "--method lora" in result.stderr
