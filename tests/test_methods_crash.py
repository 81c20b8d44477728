"""Magpie and Evol-Instruct runs killed with SIGKILL resume to exactly N records, none lost or
duplicated (the same journal as the other modes; see test_data_gen_crash.py)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from openai_test_server import OpenAITestServer
from test_data_gen_crash import commits, committed_tasks, kill_when

from corral.records import read_alpaca

REPO_ROOT = Path(__file__).resolve().parents[1]
TARGET = 30


def start_run(mode: str, base_url: str, output: Path) -> subprocess.Popen:
    command = [
        sys.executable, "-m", "corral.cli", "generate", "--mode", mode,
        "--base-url", base_url, "--model", "canned-teacher",
        "--num-instructions", str(TARGET), "--output", str(output), "--no-progress",
        "concurrency=2", "requests_per_batch=2", "backoff_base=0.01",
        *(["magpie_tokenizer=embedded"] if mode == "magpie" else []),
    ]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    return subprocess.Popen(
        command, cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )


@pytest.mark.long
@pytest.mark.parametrize("mode", ["magpie", "evol"])
def test_sigkill_then_resume_gives_the_exact_count(tmp_path, mode, embedded_model_path):
    output = tmp_path / f"{mode}.json"
    journal = tmp_path / f"{mode}.journal.jsonl"
    started = [0.0]
    kill_points = [
        lambda: commits(journal) >= 1,
        lambda: commits(journal) >= 3 and time.monotonic() - started[0] > 0.05,
        lambda: len(committed_tasks(journal)) >= TARGET // 2,
        lambda: len(committed_tasks(journal)) >= TARGET - 5,
    ]
    killed = 0
    before: list[dict] = []
    with OpenAITestServer(
        latency=0.03, faults=["429", None, "500"] * 3, retry_after=0.05
    ) as server:
        for condition in kill_points:
            started[0] = time.monotonic()
            proc = start_run(mode, server.base_url, output)
            killed += kill_when(proc, condition, timeout=180)
            now = committed_tasks(journal)
            assert now[: len(before)] == before  # committed rounds are never lost
            before = now
        proc = start_run(mode, server.base_url, output)
        _, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 0, stderr.decode()[-2000:]
    assert killed >= 3
    records = read_alpaca(output)
    assert len(records) == TARGET
    assert len({r["instruction"] for r in records}) == TARGET
    assert [r["instruction"] for r in records] == [
        t["instruction"] for t in committed_tasks(journal)
    ]
    lineage = [json.loads(line) for line in open(tmp_path / f"{mode}.lineage.jsonl")]
    assert [line["instruction"] for line in lineage] == [r["instruction"] for r in records]
    if mode == "evol":
        kept = {r["instruction"] for r in records}
        # Every ancestor after the root seed is a record of this run, committed before its child.
        order = {r["instruction"]: i for i, r in enumerate(records)}
        for line in lineage:
            for step in line["ancestors"][1:]:
                assert step["instruction"] in kept
                assert order[step["instruction"]] < order[line["instruction"]]
    manifest = json.loads((tmp_path / f"{mode}.manifest.json").read_text())
    assert manifest["resumed"] is True and manifest["counts"]["instructions"] == TARGET
