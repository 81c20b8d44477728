"""A run directory is never overwritten by accident, has one writer at a time, and a bad training
value stops the run in a second, before any model loads, with the key named."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from corral.training.config import TrainConfig
from servers import wait_until

from corral.config import load_config
from corral.errors import ConfigError
from corral.rundir import RunDir

REPO = Path(__file__).resolve().parents[1]
SMOKE = REPO / "configs" / "training" / "smoke.yaml"
SMOKE_DATA = REPO / "configs" / "training" / "smoke_alpaca.json"


def config(run_dir: Path, *overrides: str) -> TrainConfig:
    return load_config(TrainConfig, SMOKE, [f"output_dir={run_dir}", *overrides])


def prepare_run_dir(config: TrainConfig, run_dir: Path) -> None:
    """What a launch does to its output_dir before training (under the lock)."""
    RunDir(run_dir).prepare(resume=bool(config.resume), overwrite=config.overwrite_output_dir)


def train_py(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "train.py", "--config", str(SMOKE), *args],
        cwd=REPO,
        env={**os.environ, "TOKENIZERS_PARALLELISM": "false"},
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def test_a_finished_run_without_checkpoints_is_not_replaced_unless_asked(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    for name in ("run_info.json", "adapter_model.safetensors", "metrics.jsonl"):
        (run / name).write_text("{}")
    with pytest.raises(ConfigError, match="holds a finished run .*overwrite_output_dir=true"):
        prepare_run_dir(config(run), run)
    with pytest.raises(ConfigError, match="holds a finished run"):
        prepare_run_dir(config(run, "resume=auto"), run)  # nothing to resume from
    prepare_run_dir(config(run, "overwrite_output_dir=true"), run)
    assert sorted(p.name for p in run.iterdir()) == ["adapter_model.safetensors"]


def test_other_files_are_not_a_run(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "notes.txt").write_text("mine")
    with pytest.raises(ConfigError, match=r"holds other files \(notes.txt\)"):
        prepare_run_dir(config(run), run)


def test_checkpoints_need_resume_or_overwrite(tmp_path):
    run = tmp_path / "run"
    checkpoint = run / "checkpoints" / "checkpoint-3"
    checkpoint.mkdir(parents=True)
    (checkpoint / "trainer_state.json").write_text('{"step": 3}')
    with pytest.raises(ConfigError, match="set resume=auto to continue it"):
        prepare_run_dir(config(run), run)
    prepare_run_dir(config(run, "resume=auto"), run)
    assert checkpoint.is_dir()  # continued, not cleared
    prepare_run_dir(config(run, "overwrite_output_dir=true"), run)
    assert not (run / "checkpoints").exists()


def test_a_start_interrupted_before_its_first_checkpoint_starts_again(tmp_path):
    run = tmp_path / "run"
    (run / "tensorboard").mkdir(parents=True)
    (run / "corral_config.yaml").write_text("model: embedded\n")
    (run / "metrics.jsonl").write_text('{"step": 0}\n')
    prepare_run_dir(config(run), run)  # no error


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("learning_rate=-1", "key 'learning_rate': must be above 0"),
        ("lora_dropout=1.5", r"key 'lora_dropout': must be in \[0, 1\)"),
        ("max_steps=-1", "key 'max_steps': must be 0 or more"),
        ("lora_target_modules=[q_proj", "'\\[q_proj' is not a linear layer of embedded"),
        ("lora_target_modules=[qkv]", "'qkv' is not a linear layer of embedded; choose from"),
    ],
)
def test_bad_values_stop_before_the_model_loads(override, message, tmp_path):
    result = train_py(override, f"output_dir={tmp_path / 'run'}", timeout=120)
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("train.py: error:")
    import re

    assert re.search(message, last), last
    assert "model: embedded (lora)" not in result.stdout  # stopped before the model was built


@pytest.mark.slow
def test_one_writer_per_run_directory_and_a_killed_one_never_blocks(tmp_path):
    run = tmp_path / "run"
    args = [
        "model=tiny-random",
        f"data={SMOKE_DATA}",
        f"output_dir={run}",
        "report_to=[none]",
        "max_steps=400",
        "save_steps=1",
        "resume=auto",
    ]
    log = open(tmp_path / "first.log", "w")  # noqa: SIM115 - closed below
    first = subprocess.Popen(
        [sys.executable, "train.py", "--config", str(SMOKE), *args],
        cwd=REPO,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        wait_until(
            lambda: (run / "checkpoints").is_dir() and any((run / "checkpoints").iterdir()),
            timeout=180,
            what="the first run's checkpoint",
            alive=lambda: None if first.poll() is None else f"exited {first.returncode}",
        )
        second = train_py(*args)
        assert second.returncode == 2, second.stderr
        assert f"another corral process (pid {first.pid}) is writing this run directory" in (
            second.stderr
        )
    finally:
        os.kill(first.pid, signal.SIGKILL)
        first.wait()
        log.close()
    # The killed run's lock is gone with it: a resume is not blocked.
    resumed = train_py(*args[:-3], "max_steps=2", "resume=auto")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
