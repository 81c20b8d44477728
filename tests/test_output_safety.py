"""Nothing lost: no command overwrites its own input, an output that cannot be written stops the
command before any work, one process writes an output at a time, written files get a plain
open()'s permissions, and a teacher that cannot be reached fails fast, with its URL."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from openai_test_server import OpenAITestServer
from servers import wait_until

from corral.cli import main as corral_main
from corral.errors import UsageError
from corral.fileio import atomic_write_text, check_output_path, exclusive_output
from corral.records import write_alpaca

REPO = Path(__file__).resolve().parents[1]
RECORDS = [
    {"instruction": "Name a color of the sky.", "input": "", "output": "Blue."},
    {"instruction": "Name a colour of the sky.", "input": "", "output": "Blue."},
    {"instruction": "Add two and three.", "input": "", "output": "5"},
]


@pytest.fixture
def data(tmp_path) -> Path:
    path = tmp_path / "data.json"
    write_alpaca(path, RECORDS)
    return path


def _same_bytes_after(path: Path, argv: list[str], capsys) -> str:
    before = path.read_bytes()
    assert corral_main(argv) == 2
    assert path.read_bytes() == before
    return capsys.readouterr().err


@pytest.mark.parametrize("spelling", ["same", "symlink", "dotdot"])
def test_dedup_never_overwrites_its_input(data, tmp_path, capsys, spelling):
    if spelling == "same":
        output = data
    elif spelling == "symlink":
        output = tmp_path / "link.json"
        output.symlink_to(data)
    else:
        (tmp_path / "sub").mkdir()
        output = tmp_path / "sub" / ".." / "data.json"
    err = _same_bytes_after(data, ["dedup", str(data), "--output", str(output)], capsys)
    assert "would overwrite the input" in err and len(err.strip().splitlines()) == 1


def test_generate_never_overwrites_its_seed_tasks(data, capsys):
    err = _same_bytes_after(
        data,
        ["generate", "--seed-tasks", str(data), "--output", str(data), "--base-url",
         "http://127.0.0.1:9/v1", "--no-progress"],
        capsys,
    )  # fmt: skip
    assert "would overwrite the input" in err


def test_an_output_that_is_a_directory_stops_before_any_work(data, tmp_path, capsys):
    folder = tmp_path / "out"
    folder.mkdir()
    with OpenAITestServer() as server:
        code = corral_main(
            ["generate", "--base-url", server.base_url, "--output", str(folder),
             "--num-instructions", "2", "--no-progress"]
        )  # fmt: skip
        assert server.stats["requests"] == 0  # nothing paid for
    assert code == 2
    assert "is a directory; the output must be a file path" in capsys.readouterr().err
    assert corral_main(["dedup", str(data), "--output", str(folder)]) == 2
    assert "is a directory" in capsys.readouterr().err


def test_an_input_that_is_a_directory_is_one_line(tmp_path, capsys):
    assert corral_main(["dedup", str(tmp_path), "--output", str(tmp_path / "o.json")]) == 2
    err = capsys.readouterr().err
    assert "is a directory; expected a JSON or JSONL file" in err and "Traceback" not in err


def test_an_output_under_a_file_cannot_be_written(data):
    with pytest.raises(UsageError, match="is not a folder"):
        check_output_path(data / "x.json")


def test_unreachable_teacher_fails_fast_with_its_url(tmp_path, capsys):
    started = time.monotonic()
    code = corral_main(
        ["generate", "--base-url", "http://127.0.0.1:9/v1", "--output", str(tmp_path / "o.json"),
         "--num-instructions", "2", "--no-progress"]
    )  # fmt: skip
    assert code == 2
    err = capsys.readouterr().err
    assert "cannot reach the teacher at http://127.0.0.1:9/v1" in err
    assert time.monotonic() - started < 60  # one check, not rounds of retried requests
    assert not (tmp_path / "o.journal.jsonl").exists()


def test_a_teacher_that_goes_away_stops_the_run(tmp_path, capsys):
    """Connection errors from a server that went away: the run stops, the journal keeps what
    was accepted, and the message says what happened and how to resume."""
    server = OpenAITestServer(latency=0.05).start()
    # From 1.5 s on, every request has its connection closed unanswered (as a crashed server's).
    stopper = threading.Timer(1.5, server.add_faults, args=(["drop"] * 10_000,))
    stopper.start()
    try:
        code = corral_main(
            ["generate", "--base-url", server.base_url, "--output", str(tmp_path / "o.json"),
             "--num-instructions", "100000", "--no-progress", "max_retries=1",
             "backoff_base=0.01", "backoff_cap=0.02", "concurrency=2"]
        )  # fmt: skip
    finally:
        stopper.cancel()
        server.stop()
    assert code == 2
    err = capsys.readouterr().err
    assert f"lost the teacher at {server.base_url}" in err and "resume" in err


def test_a_second_writer_is_refused_with_the_first_ones_pid(tmp_path):
    output = tmp_path / "o.json"
    with exclusive_output(output):
        holder = subprocess.run(
            [sys.executable, "-c",
             "import sys\nfrom corral.fileio import exclusive_output\n"
             f"with exclusive_output({str(output)!r}): pass"],
            capture_output=True, text=True, cwd=REPO, timeout=60,
        )  # fmt: skip
    assert holder.returncode != 0
    assert f"another corral process (pid {os.getpid()}) is writing this output" in holder.stderr
    with exclusive_output(output):  # released: free again
        pass
    assert not output.with_name("o.json.lock").exists()


@pytest.mark.slow
def test_two_generate_runs_on_one_output_and_a_killed_lock_holder(tmp_path):
    output = tmp_path / "o.json"
    with OpenAITestServer(latency=0.3) as server:
        argv = [
            sys.executable, "-m", "corral.cli", "generate", "--base-url", server.base_url,
            "--output", str(output), "--num-instructions", "40", "--no-progress",
            "concurrency=1",
        ]  # fmt: skip
        first = subprocess.Popen(argv, cwd=REPO, stderr=subprocess.PIPE, text=True)
        try:
            wait_until(
                lambda: output.with_name("o.json.lock").exists() and server.stats["requests"] > 0,
                timeout=60,
                what="the first generate run",
            )
            second = subprocess.run(argv, cwd=REPO, capture_output=True, text=True, timeout=60)
            assert second.returncode == 2
            assert f"another corral process (pid {first.pid})" in second.stderr
        finally:
            first.kill()
            first.wait()
        # The lock died with its holder: the same command resumes.
        third = subprocess.run(argv, cwd=REPO, capture_output=True, text=True, timeout=300)
        assert third.returncode == 0, third.stderr


@pytest.mark.parametrize("umask", [0o022, 0o077])
def test_written_files_follow_the_umask_like_open(tmp_path, umask):
    previous = os.umask(umask)
    try:
        atomic_write_text(tmp_path / "out.json", "{}")
        with open(tmp_path / "plain.json", "w") as handle:
            handle.write("{}")
    finally:
        os.umask(previous)
    mode = stat.S_IMODE((tmp_path / "out.json").stat().st_mode)
    assert mode == stat.S_IMODE((tmp_path / "plain.json").stat().st_mode) == 0o666 & ~umask


def test_a_killed_writers_temporary_file_is_removed_by_the_next_write(tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True).stdout.strip()  # fmt: skip
    leftover = tmp_path / f".out.json.{dead}.abc123.tmp"
    leftover.write_bytes(b"x" * 1000)
    mine = tmp_path / f".out.json.{os.getpid()}.def456.tmp"  # a live writer's: kept
    mine.write_bytes(b"y")
    atomic_write_text(tmp_path / "out.json", json.dumps({"ok": True}))
    assert not leftover.exists() and mine.exists()
    assert json.loads((tmp_path / "out.json").read_text()) == {"ok": True}


def test_a_built_folder_gets_a_plain_mkdirs_permissions(tmp_path):
    from corral.fileio import temporary_folder_beside

    previous = os.umask(0o022)
    try:
        folder = temporary_folder_beside(tmp_path / "export")
        plain = tmp_path / "plain"
        plain.mkdir()
    finally:
        os.umask(previous)
    assert stat.S_IMODE(folder.stat().st_mode) == stat.S_IMODE(plain.stat().st_mode) == 0o755


def test_a_truncated_adapter_is_one_line_for_infer_and_export(lora_run, tmp_path, capsys, data):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(lora_run, run)
    weights = run / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])
    for argv in (
        ["infer", "--run", str(run), "--input", str(data), "--output", str(tmp_path / "a.json")],
        ["export", str(run), "--merge", str(tmp_path / "merged")],
    ):
        assert corral_main(argv) == 2
        err = capsys.readouterr().err
        assert "adapter_model.safetensors: truncated" in err and "Traceback" not in err
    assert not (tmp_path / "merged").exists()


def test_eval_and_report_never_overwrite_their_inputs(data, tmp_path, capsys):
    eval_set = tmp_path / "eval.json"
    write_alpaca(eval_set, RECORDS)
    before = eval_set.read_bytes()
    assert corral_main(["eval", "--eval-set", str(eval_set), "--output", str(eval_set)]) == 2
    assert eval_set.read_bytes() == before
    assert corral_main(["report", str(data), "-o", str(data)]) == 2
    assert "would overwrite the input" in capsys.readouterr().err
    assert corral_main(["eval", "--eval-set", str(eval_set), "--limit", "0"]) == 2
    assert "--limit must be at least 1" in capsys.readouterr().err


def test_report_on_a_file_that_is_not_utf8_is_one_line(tmp_path, capsys):
    bad = tmp_path / "bad.json"
    bad.write_bytes(b'[{"instruction": "\xff\xfe"}]')
    assert corral_main(["report", str(bad), "-o", str(tmp_path / "r.html")]) == 2
    err = capsys.readouterr().err
    assert "not UTF-8" in err and "Traceback" not in err


def test_an_eval_whose_judge_is_down_fails_visibly(tmp_path, capsys):
    eval_set = tmp_path / "eval.json"
    write_alpaca(eval_set, RECORDS[:1])
    code = corral_main(
        ["eval", "--eval-set", str(eval_set), "--base", "tiny-random", "--tuned", "tiny-random",
         "--judge-base-url", "http://127.0.0.1:9/v1", "--output", str(tmp_path / "e.json")]
    )  # fmt: skip
    assert code == 2
    assert "cannot reach the teacher at http://127.0.0.1:9/v1" in capsys.readouterr().err
    assert not (tmp_path / "e.json").exists()
