"""How `train.py` behaves under the launchers users type: `python train.py` and
`accelerate launch train.py`, with the errors a user can make."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
ACCELERATE = str(Path(sys.executable).with_name("accelerate"))
SMOKE = REPO / "configs" / "training" / "smoke.yaml"


def run(cmd: list[str], timeout: float = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false"}
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("model=./typo", "./typo: no such model folder"),
        ("data=./missing.json", "missing.json"),
    ],
)
def test_a_bad_model_or_data_path_is_one_line_and_exit_2(override, message, tmp_path):
    result = run(
        [sys.executable, "train.py", "--config", str(SMOKE), override, f"output_dir={tmp_path}"]
    )
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith("train.py: error: ")
    assert message in result.stderr


@pytest.mark.slow
def test_under_accelerate_launch_the_script_itself_prints_one_line(tmp_path):
    result = run(
        [ACCELERATE, "launch", "train.py", "--config", str(SMOKE), "model=./typo"],
        timeout=300,
    )
    assert result.returncode != 0
    assert "train.py: error: ./typo: no such model folder" in result.stderr
    assert "ModelNotFoundError" not in result.stderr  # no traceback from train.py itself
