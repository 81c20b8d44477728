"""SIGKILL at any moment of `corral score` and `corral export`: a rerun finishes with nothing lost
or asked twice beyond what was in flight, and a killed export leaves no half-written model.

Each test kills the real command (a child process) at several moments of its work, then reruns
it to the end and checks what it wrote."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from openai_test_server import OpenAITestServer

from corral.records import read_alpaca, write_alpaca
from corral.rundir import read_run_info

pytestmark = pytest.mark.long  # real processes killed and rerun: a minute or more in all

REPO = Path(__file__).resolve().parents[1]


def corral_process(*args: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "corral.cli", *args],
        cwd=REPO,
        env={**os.environ, "TOKENIZERS_PARALLELISM": "false"},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def kill_after(process: subprocess.Popen, seconds: float) -> bool:
    """SIGKILL `process` after `seconds` unless it has ended; whether it was killed."""
    try:
        process.wait(timeout=seconds)
        return False
    except subprocess.TimeoutExpired:
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=30)
        return True


def test_a_killed_score_resumes_and_asks_each_record_once_beyond_what_was_in_flight(tmp_path):
    records = [{"instruction": f"Name the colour number {n}.", "output": "Red"} for n in range(60)]
    source, scored = tmp_path / "data.json", tmp_path / "scored.json"
    write_alpaca(source, records)
    asked: list[str] = []
    lock = threading.Lock()

    def judge(prompt: str, request: dict) -> str:
        time.sleep(0.2)  # a judge that takes its time, so a kill lands mid-run
        with lock:
            asked.append(prompt)
        return "4\nfine"

    with OpenAITestServer(judge) as server:
        argv = ["score", str(source), "--output", str(scored), "--judge-base-url",
                server.base_url, "--judge-model", "j", "--concurrency", "4", "--quiet"]  # fmt: skip
        kills = 0
        for delay in (1.2, 1.6, 2.0, 2.4, 2.8):
            kills += kill_after(corral_process(*argv), delay)
        finished = corral_process(*argv)
        out, err = finished.communicate(timeout=300)
        assert finished.returncode in (0, 2), err[-2000:]
        if finished.returncode == 2:  # an earlier run had finished: refused, not paid again
            assert "holds a finished scoring" in err
        asked_before_rerun = len(asked)
        again = corral_process(*argv)
        _, err = again.communicate(timeout=300)
        assert again.returncode == 2 and "--overwrite" in err
        assert len(asked) == asked_before_rerun  # a finished scoring is not asked again
    assert kills >= 1, "no run was killed: the kill moments came after the work ended"
    kept = read_alpaca(scored)
    assert [r["instruction"] for r in kept] == [r["instruction"] for r in records]
    assert all(r["score"] == 4.0 for r in kept)
    # Each record was asked once, except those in flight when a process died (the judge's
    # concurrency, 4 here, at most per kill): never recorded, so they are asked again.
    assert len(records) <= len(asked) <= len(records) + kills * 4
    assert {p for p in asked} and len(set(asked)) == len(records)


def test_a_killed_export_leaves_no_half_model_and_a_rerun_completes(lora_run, tmp_path):
    out = tmp_path / "merged"
    killed = 0
    for delay in (2.0, 4.0, 6.0):
        killed += kill_after(corral_process("export", str(lora_run), "--merge", str(out)), delay)
        # A kill leaves either nothing at `out` or the whole export, never a part of it.
        if out.exists():
            assert read_run_info(out).kind == "merged"
            break
    assert killed >= 1, "no export was killed: the kill moments came after the work ended"
    if not out.exists():
        finished = corral_process("export", str(lora_run), "--merge", str(out))
        _, err = finished.communicate(timeout=300)
        assert finished.returncode == 0, err[-2000:]
    info = read_run_info(out)
    assert info.kind == "merged" and Path(info.merged_from).resolve() == lora_run.resolve()
    assert json.loads((out / "config.json").read_text())["model_type"] == "llama"
    # The killed attempts' temporary folders are gone once a write to the same output succeeded.
    assert [p.name for p in tmp_path.iterdir() if p.name != "merged"] == []
