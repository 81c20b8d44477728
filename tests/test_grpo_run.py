"""`method=grpo` end to end through `accelerate launch train.py` on the tiny random LLaMA: the run
directory, GRPO's metrics per step, held-out evaluation with sample completions, and bad input
refused in one line with exit status 2 before anything is written."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
ACCELERATE = str(Path(sys.executable).with_name("accelerate"))
PRESET = REPO / "configs" / "training" / "grpo_smoke.yaml"
# Every test launches train.py (seconds to a minute each): they run with the long tests.
pytestmark = pytest.mark.long


def launch(
    *args: str, timeout: float = 600, launcher: bool = True, processes: int = 1
) -> subprocess.CompletedProcess:
    """`accelerate launch train.py ...` (with `processes` > 1: CPU data parallelism over gloo), or
    `python train.py ...` (whose exit status accelerate's launcher would turn into 1)."""
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}
    cmd = [ACCELERATE, "launch"] if launcher else [sys.executable]
    if processes > 1:
        env["ACCELERATE_USE_CPU"] = "1"
        cmd += ["--multi_gpu", "--num_processes", str(processes)]
    cmd += ["train.py", *args]
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)


def tiny_args(run_dir: Path, *more: str) -> list[str]:
    """The smoke preset on tiny-random with a budget of seconds: 2 steps of 2 prompts x 2
    completions of at most 4 tokens, 4 held-out prompts."""
    return [
        "--config",
        str(PRESET),
        "model=tiny-random",
        f"output_dir={run_dir}",
        "report_to=[none]",
        "max_steps=2",
        "num_generations=2",
        "micro_batch_size=2",
        "gradient_accumulation_steps=2",
        "max_completion_length=4",
        "val_size=4",
        "eval_steps=2",
        "save_steps=1",
        *more,
    ]


def test_a_tiny_grpo_run_writes_its_run_directory_and_metrics(tmp_path):
    run_dir = tmp_path / "grpo"
    result = launch(*tiny_args(run_dir, "beta=0.04", "num_iterations=2"))
    assert result.returncode == 0, result.stderr[-3000:]
    for name in ("adapter_model.safetensors", "run_info.json", "corral_config.yaml"):
        assert (run_dir / name).is_file(), name
    info = json.loads((run_dir / "run_info.json").read_text())
    assert info["method"] == "grpo" and info["kind"] == "adapter"
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    steps = [row for row in rows if "loss" in row]
    assert [row["step"] for row in steps] == [1, 2]
    first = steps[0]
    for name in (
        "reward",
        "reward_std",
        "rewards/final_number/mean",
        "advantage_std",
        "completions/mean_length",
        "completions/clipped_ratio",
        "clip_ratio/region_mean",
        "kl",
        "entropy",
        "time/rollout",
        "time/scoring",
        "time/update",
    ):
        assert name in first, name
    # One rollout serves both steps (num_iterations=2): the second step reports no new rollout.
    assert "reward" not in steps[1] and steps[1]["time/rollout"] == 0.0
    assert 0 <= first["completions/clipped_ratio"] <= 1 and first["completions/mean_length"] <= 4
    evaluations = [row for row in rows if "eval_rewards/final_number/mean" in row]
    assert [row["step"] for row in evaluations] == [0, 2]
    samples = [
        json.loads(line) for line in (run_dir / "eval_samples.jsonl").read_text().splitlines()
    ]
    assert samples and {"step", "prompt", "completion", "answer"} <= set(samples[0])


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("num_generations=1", "key 'num_generations': must be at least 2"),
        ("reward_funcs=[{reward}:missing]", "defines no 'missing'"),
        ("reward_funcs=[{reward}:nan_reward]", "returned nan for completion 0"),
        ("data={bad_data}", "line 2: field 'prompt'"),
    ],
)
def test_bad_input_is_one_line_exit_2_and_nothing_written(tmp_path, override, message):
    reward = tmp_path / "rewards.py"
    reward.write_text(
        "def nan_reward(prompts, completions, **fields):\n    return [float('nan')] * len(completions)\n"
    )
    bad_data = tmp_path / "prompts.jsonl"
    bad_data.write_text('{"prompt": "a", "answer": "1"}\n{"question": "b", "answer": "2"}\n')
    run_dir = tmp_path / "run"
    override = override.format(reward=reward, bad_data=bad_data)
    result = launch(*tiny_args(run_dir, override), launcher=False)
    assert result.returncode == 2, result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("train.py: error:") and message in last, last
    assert not (run_dir / "adapter_model.safetensors").exists()
    assert not (run_dir / "run_info.json").exists()


def test_a_resumed_run_ends_with_the_weights_of_an_uninterrupted_one(tmp_path):
    """Exact resume: stopped after step 1, in the middle of a rollout that serves two steps
    (num_iterations=2), then resumed to step 3; the adapter equals a run that never stopped.
    The same prompts, the same sampled completions, the same reused rollout."""
    import torch
    from safetensors.torch import load_file

    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    # A random model never writes the right number; the user's reward (the completion's length in
    # characters) varies within groups, so advantages and updates are not zero.
    reward = tmp_path / "longer.py"
    reward.write_text(
        "def longer(prompts, completions, **fields):\n    return [len(c) for c in completions]\n"
    )
    common = ("num_iterations=2", "eval_steps=0", "val_size=0", f"reward_funcs=[{reward}:longer]")
    result = launch(*tiny_args(straight, "max_steps=3", *common))
    assert result.returncode == 0, result.stderr[-3000:]
    result = launch(*tiny_args(resumed, "max_steps=1", *common))
    assert result.returncode == 0, result.stderr[-3000:]
    result = launch(*tiny_args(resumed, "max_steps=3", "resume=auto", *common))
    assert result.returncode == 0, result.stderr[-3000:]
    assert "resumed from" in result.stdout + result.stderr
    expected = load_file(str(straight / "adapter_model.safetensors"))
    found = load_file(str(resumed / "adapter_model.safetensors"))
    assert expected.keys() == found.keys()
    for name, tensor in expected.items():
        assert torch.equal(tensor, found[name]), name
    assert any(t.abs().sum() > 0 for n, t in found.items() if "lora_B" in n)


def test_two_processes_roll_out_their_own_prompts_and_end_with_equal_weights(tmp_path):
    """Two CPU processes (DDP over gloo): each rolls out its own prompts, gradients are averaged,
    and the ranks end with the same adapter (the run checks their fingerprints)."""
    run_dir = tmp_path / "ddp"
    reward = tmp_path / "longer.py"
    reward.write_text(
        "def longer(prompts, completions, **fields):\n    return [len(c) for c in completions]\n"
    )
    result = launch(*tiny_args(run_dir, f"reward_funcs=[{reward}:longer]"), processes=2)
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((run_dir / "train_summary.json").read_text())
    assert summary["world_size"] == 2 and summary["steps"] == 2
    assert len(set(summary["rank_fingerprints"])) == 1 and len(summary["rank_fingerprints"]) == 2
    first = json.loads((run_dir / "metrics.jsonl").read_text().splitlines()[1])
    assert first["step"] == 1 and first["reward_std"] > 0


def test_deepspeed_chats_third_step_grpo_on_a_reward_model_run(tmp_path, tiny_model_path):
    """reward_model=RUN (a method=reward run directory) scores the rollouts: the run trains on
    it alone, and its scores are logged as rewards/reward_model/*."""
    from model_runs import random_reward_run

    reward_run = random_reward_run(tmp_path / "rm", "tiny-random", tiny_model_path, template="chat")
    run_dir = tmp_path / "grpo-rm"
    result = launch(*tiny_args(run_dir, "reward_funcs=[]", f"reward_model={reward_run}"))
    assert result.returncode == 0, result.stderr[-3000:]
    steps = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    first = next(row for row in steps if "loss" in row)
    assert first["rewards/reward_model/std"] > 0 and first["advantage_std"] > 0
    assert "eval_rewards/reward_model/mean" in steps[-1]
