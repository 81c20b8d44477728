"""`corral generate --api batch`: rounds as OpenAI Batch API batches on a loopback server that
implements files and batches, an expiring and a partly failing batch, and a run killed while it
waits that resumes by polling the batch it already paid for."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from corral.data_gen.config import GenerateConfig
from corral.data_gen.pipeline import generate_dataset
from openai_test_server import OpenAITestServer
from servers import wait_until

from corral.records import read_alpaca

REPO = Path(__file__).resolve().parents[1]


def config(server, output: Path, **settings) -> GenerateConfig:
    return GenerateConfig(
        base_url=server.base_url, model="t", api="batch", output=str(output),
        batch_poll_seconds=0.05, **{"num_instructions": 15, "concurrency": 2, **settings},
    )  # fmt: skip


def journal_batches(output: Path) -> list[str]:
    journal = output.with_name(output.stem + ".journal.jsonl")
    return [
        json.loads(line)["batch_id"]
        for line in journal.read_text().splitlines()
        if json.loads(line).get("kind") == "batch"
    ]


@pytest.mark.parametrize("mode", ["alpaca", "self-instruct"])
def test_every_round_is_a_batch_and_the_data_is_the_same_kind(tmp_path, mode):
    output = tmp_path / "data.json"
    with OpenAITestServer(batch_seconds=0.1) as server:
        result = generate_dataset(config(server, output, mode=mode), progress=False)
        created = server.stats["batches_created"]
        direct = server.stats["requests"] - server.stats.get("ok", 0)
    assert len(read_alpaca(output)) >= 15
    assert created >= 1 and direct == 0  # every completion came through a batch
    assert len(journal_batches(output)) == created
    assert result.manifest["teacher"]["api"] == "batch"
    assert result.manifest["requests"] > 0 and result.manifest["tokens"]["completion"] > 0


def test_an_expired_and_a_partly_failed_batch_count_their_missing_answers(tmp_path):
    output = tmp_path / "data.json"
    with OpenAITestServer(batch_faults=["expire", "partial"]) as server:
        result = generate_dataset(config(server, output, concurrency=3), progress=False)
    manifest = result.manifest
    # Rounds of 3 requests: 2 unfinished in the expired batch, 1 failed line in the next.
    assert manifest["failed_requests"] == 3
    assert "batch_expired" in manifest["request_errors"]
    assert manifest["counts"]["dropped"]["request_failed"] == manifest["failed_requests"]
    assert len(read_alpaca(output)) == 15


def test_a_batch_that_fails_validation_stops_the_run_in_one_line(tmp_path, capsys):
    from corral.cli import main as corral_main

    with OpenAITestServer(batch_faults=["failed"]) as server:
        code = corral_main(
            ["generate", "--base-url", server.base_url, "--api", "batch", "--output",
             str(tmp_path / "d.json"), "--no-progress", "batch_poll_seconds=0.05"]
        )  # fmt: skip
    assert code == 2
    assert "failed validation: invalid_request: injected validation failure" in (
        capsys.readouterr().err
    )


@pytest.mark.slow
def test_a_run_killed_while_waiting_polls_its_batch_instead_of_paying_again(tmp_path):
    output = tmp_path / "data.json"
    server = OpenAITestServer(batch_seconds=3.0).start()
    try:
        argv = [
            sys.executable, "-m", "corral.cli", "generate", "--base-url", server.base_url,
            "--api", "batch", "--output", str(output), "--num-instructions", "15",
            "--no-progress", "batch_poll_seconds=0.05",
        ]  # fmt: skip
        first = subprocess.Popen(argv, cwd=REPO, stderr=subprocess.DEVNULL, start_new_session=True)
        journal = output.with_name("data.journal.jsonl")
        wait_until(
            lambda: journal.is_file() and '"kind": "batch"' in journal.read_text(),
            timeout=60,
            what="the first batch in the journal",
        )
        os.killpg(first.pid, signal.SIGKILL)
        first.wait()
        assert server.stats["batches_created"] == 1
        sent = journal_batches(output)
        resumed = subprocess.run(argv, cwd=REPO, capture_output=True, text=True, timeout=120)
        assert resumed.returncode == 0, resumed.stderr
        assert f"batch {sent[0]}: resuming the wait" in resumed.stderr
    finally:
        server.stop()
    assert journal_batches(output)[0] == sent[0]
    # One batch per round: the killed round's batch was polled, not created again.
    rounds = sum(
        1 for line in journal.read_text().splitlines() if json.loads(line)["kind"] == "commit"
    )
    assert server.stats["batches_created"] == rounds
    assert len(read_alpaca(output)) == 15


def test_unreadable_lines_of_a_batch_result_are_named_and_the_rest_kept(tmp_path, capsys):
    output = tmp_path / "data.json"
    logged: list[str] = []
    with OpenAITestServer(batch_faults=["garbled"]) as server:
        result = generate_dataset(
            config(server, output, concurrency=3), progress=False, log=logged.append
        )
    problems = [text for text in logged if "result file" in text]
    # The first request's line is cut in half; then a list, a string and four unknown requests.
    assert len(problems) == 7, logged
    assert "line 1: not valid JSON" in problems[0]
    assert "line 4: expected a JSON object, got list" in problems[1]
    assert "custom_id 'request-x' names no request" in problems[3]
    assert "custom_id 'request-999'" in problems[4]
    assert all(len(text.splitlines()) == 1 for text in problems)
    # Only the garbled answer is lost: the other two of that batch were used.
    assert result.manifest["failed_requests"] == 1
    assert len(read_alpaca(output)) == 15
