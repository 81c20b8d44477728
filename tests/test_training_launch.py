"""How `train.py` behaves under the launchers users type: `python train.py` and
`accelerate launch train.py`, with the errors a user can make."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from servers import free_port

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
    assert result.returncode == 1  # the launcher's status for any failure of its script
    said = [line for line in result.stderr.splitlines() if line.startswith("train.py: error:")]
    assert said == [
        "train.py: error: ./typo: no such model folder (exit status 2; accelerate launch reports "
        "any failure as 1, and its traceback below adds nothing: -q hides it)"
    ]
    assert "ModelNotFoundError" not in result.stderr  # no traceback from train.py itself
    # With -q the launcher keeps its own traceback to itself: the error line is the last one.
    quiet = run(
        [ACCELERATE, "launch", "-q", "train.py", "--config", str(SMOKE), "model=./typo"],
        timeout=300,
    )
    assert quiet.returncode != 0
    assert (
        quiet.stderr.strip()
        .splitlines()[-1]
        .startswith("train.py: error: ./typo: no such model folder (exit status 2;")
    )


SMOKE_DATA = REPO / "configs" / "training" / "smoke_alpaca.json"


def tiny_run_args(run_dir: Path) -> list[str]:
    return [
        "--config",
        str(SMOKE),
        "model=tiny-random",
        f"data={SMOKE_DATA}",
        f"output_dir={run_dir}",
        "report_to=[none]",
        "max_steps=3",
        "micro_batch_size=2",
        "gradient_accumulation_steps=2",
        "packing=false",
    ]


@pytest.mark.slow
def test_processes_that_do_not_form_one_group_are_stopped(tmp_path):
    """An FSDP config on a machine without GPUs: accelerate starts two lone processes."""
    run_dir = tmp_path / "run"
    result = run(
        [
            ACCELERATE, "launch", "--config_file", str(REPO / "configs/accelerate/fsdp.yaml"),
            "--num_processes", "2", "--main_process_port", str(free_port()),
            "train.py", *tiny_run_args(run_dir),
        ]
    )  # fmt: skip
    assert result.returncode != 0
    said = [line for line in result.stderr.splitlines() if line.startswith("train.py: error:")]
    assert len(said) == 1, result.stderr  # one process speaks for the launch
    assert "started 2 processes but they did not join one process group" in said[0]
    assert "ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu --num_processes 2" in said[0]
    assert not run_dir.exists()  # nothing was written


def _adapter(run_dir: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(run_dir / "adapter_model.safetensors"))


@pytest.mark.slow
def test_two_nodes_on_one_machine_train_the_same_adapter_as_one_node(tmp_path):
    """The two-node launch, rehearsed with two `accelerate launch` commands over 127.0.0.1
    (CPU, gloo), reaches the adapter of the one-node 2-process run."""
    import torch

    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1"}
    one_node = tmp_path / "one_node"
    single = subprocess.run(
        [
            ACCELERATE, "launch", "--multi_gpu", "--num_processes", "2",
            "--main_process_port", str(free_port()), "train.py", *tiny_run_args(one_node),
        ],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert single.returncode == 0, single.stderr[-3000:]

    two_nodes = tmp_path / "two_nodes"
    port = str(free_port())
    nodes = []
    for rank in (0, 1):
        log = open(tmp_path / f"node{rank}.log", "w")  # noqa: SIM115 - closed below
        nodes.append(
            (
                subprocess.Popen(
                    [
                        ACCELERATE, "launch", "--multi_gpu", "--num_machines", "2",
                        "--num_processes", "2", "--machine_rank", str(rank),
                        "--main_process_ip", "127.0.0.1", "--main_process_port", port,
                        "train.py", *tiny_run_args(two_nodes),
                    ],
                    cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT,
                ),
                log,
            )
        )  # fmt: skip
    for process, log in nodes:
        try:
            process.wait(timeout=600)
        finally:
            log.close()
            if process.poll() is None:
                process.kill()
    for rank, (process, _) in enumerate(nodes):
        assert process.returncode == 0, (tmp_path / f"node{rank}.log").read_text()[-3000:]

    summary = json.loads((two_nodes / "train_summary.json").read_text())
    assert summary["world_size"] == 2
    expected, actual = _adapter(one_node), _adapter(two_nodes)
    assert expected.keys() == actual.keys()
    for name in expected:
        torch.testing.assert_close(actual[name], expected[name], rtol=1e-5, atol=1e-6)
