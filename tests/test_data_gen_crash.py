"""Crash safety: a run killed with SIGKILL at any moment resumes to exactly N valid records."""

from __future__ import annotations

import contextlib
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from corral.data_gen.config import GenerateConfig
from corral.data_gen.journal import Journal
from corral.data_gen.manifest import run_paths
from corral.data_gen.pipeline import generate_dataset, load_seeds, run_fingerprint
from openai_test_server import OpenAITestServer
from servers import wait_until

from corral.records import read_alpaca

REPO_ROOT = Path(__file__).resolve().parents[1]
TARGET = 60


def committed_tasks(journal: Path) -> list[dict]:
    """Tasks of the committed rounds, read the way a reader without Corral would."""
    if not journal.exists():
        return []
    tasks, pending = [], []
    for raw in journal.read_bytes().split(b"\n")[:-1]:
        try:
            entry = json.loads(raw)
        except json.JSONDecodeError:
            break
        if entry.get("kind") == "task":
            pending.append(entry)
        elif entry.get("kind") == "commit":
            tasks += pending
            pending = []
    return tasks


def commits(journal: Path) -> int:
    return journal.read_bytes().count(b'"kind": "commit"') if journal.exists() else 0


def start_run(base_url: str, output: Path) -> subprocess.Popen:
    command = [
        sys.executable,
        "-m",
        "corral.cli",
        "generate",
        "--base-url",
        base_url,
        "--model",
        "canned-teacher",
        "--num-instructions",
        str(TARGET),
        "--output",
        str(output),
        "--no-progress",
        "concurrency=2",
        "requests_per_batch=2",
        "tasks_per_request=6",
        "backoff_base=0.01",
    ]
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    return subprocess.Popen(
        command, cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )


def kill_when(proc: subprocess.Popen, condition, timeout: float = 60.0) -> bool:
    """SIGKILL `proc` as soon as `condition()` holds (or, on a machine too slow to get there in
    `timeout`, wherever it is then); False if it finished first."""
    with contextlib.suppress(TimeoutError):
        wait_until(
            lambda: proc.poll() is not None or condition(),
            timeout=timeout,
            what="the run neither finished nor reached the kill point",
            interval=0.005,
        )
    if proc.poll() is not None:
        return False
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    return True


@pytest.mark.slow
def test_sigkill_at_several_points_then_resume(tmp_path):
    output = tmp_path / "run" / "alpaca.json"
    _, journal, manifest = run_paths(output)
    started_at = [0.0]
    # Kill points: during start-up (before any commit), right after the first commit, in the
    # middle of later rounds (torn writes included when the kill lands mid-round), and late.
    kill_points = [
        lambda: time.monotonic() - started_at[0] > 0.3,
        lambda: commits(journal) >= 1,
        lambda: commits(journal) >= 3 and time.monotonic() - started_at[0] > 0.05,
        lambda: len(committed_tasks(journal)) >= TARGET // 2,
        lambda: len(committed_tasks(journal)) >= TARGET - 8,
    ]
    # And at arbitrary moments: wherever the run happens to be.
    rng = random.Random(7)
    for _ in range(3):
        delay = rng.uniform(0.5, 2.5)
        kill_points.insert(-1, lambda delay=delay: time.monotonic() - started_at[0] > delay)
    killed = 0
    before_kill: list[dict] = []
    with OpenAITestServer(
        latency=0.03, faults=["429", None, "500"] * 3, retry_after=0.05
    ) as server:
        for condition in kill_points:
            started_at[0] = time.monotonic()
            proc = start_run(server.base_url, output)
            if kill_when(proc, condition):
                killed += 1
            else:  # it finished: it must have resumed and finished well, not refused the journal
                assert proc.returncode == 0, proc.stderr.read().decode()[-2000:]
            # Nothing committed before a kill is ever lost: the journal only grows by rounds.
            now = committed_tasks(journal)
            assert now[: len(before_kill)] == before_kill
            before_kill = now
            # The Alpaca JSON appears only whole, at the end (a kill may land right after it).
            if output.exists():
                assert len(read_alpaca(output)) == TARGET
        proc = start_run(server.base_url, output)
        stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 0, stderr.decode()[-2000:]
    # How many kills landed before a run finished depends on the machine's speed; what is checked
    # after each kill, and below, is that none of them lost or duplicated data.
    print(f"{killed} of {len(kill_points)} runs killed before they finished")
    records = read_alpaca(output)
    assert len(records) == TARGET
    assert len({r["instruction"] for r in records}) == TARGET
    # The final file is the committed journal, in order: none lost, none duplicated.
    assert [r["instruction"] for r in records] == [
        t["instruction"] for t in committed_tasks(journal)
    ]
    assert [r["instruction"] for r in records[: len(before_kill)]] == [
        t["instruction"] for t in before_kill
    ]
    data = json.loads(manifest.read_text())
    assert data["counts"]["instructions"] == TARGET and data["resumed"] is True


def test_a_torn_last_line_is_cut_off_on_resume(tmp_path):
    config = GenerateConfig(output=str(tmp_path / "d.json"), base_url="http://127.0.0.1:9/v1")
    _, seeds_info = load_seeds(config)
    fingerprint = run_fingerprint(config, seeds_info)
    path = tmp_path / "d.journal.jsonl"
    journal = Journal(path)
    journal.open(fingerprint)
    task = {
        "instruction": "Name three rivers in Africa please.",
        "instances": [{"input": "", "output": "Nile"}],
    }
    journal.commit([task], {"round": 1, "tasks": 1})
    journal.close()
    with open(path, "a") as handle:  # a round cut short by a crash: tasks without their commit
        handle.write(json.dumps({"kind": "task", **task}) + "\n" + '{"kind": "commit", "rou')
    journal = Journal(path)
    state = journal.open(fingerprint)
    journal.close()
    assert state.resumed and state.rounds == 1
    assert [t["instruction"] for t in state.tasks] == [task["instruction"]]
    assert path.read_text().count('"kind": "task"') == 1 and path.read_text().endswith("}\n")


def test_a_finished_journal_is_finalized_without_a_teacher(tmp_path):
    """Killed after the last commit but before the Alpaca JSON was written: no requests needed."""
    with OpenAITestServer() as server:
        config = GenerateConfig(
            output=str(tmp_path / "d.json"),
            base_url=server.base_url,
            num_instructions=6,
            concurrency=2,
        )
        generate_dataset(config, progress=False, log=lambda _: None)
        Path(config.output).unlink()
        requests = server.stats["requests"]
        result = generate_dataset(config, progress=False, log=lambda _: None)
        assert server.stats["requests"] == requests
    assert len(read_alpaca(result.output_path)) == 6
