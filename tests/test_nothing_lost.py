"""Nothing paid for is lost, nothing written is false: damaged journals, finished datasets and
changed settings are refused in one line, with nothing dropped or rewritten."""

from __future__ import annotations

import json
import os

import pytest
from corral.data_gen.manifest import run_paths
from openai_test_server import OpenAITestServer

from corral.cli import main as corral_main
from corral.records import read_alpaca


def generate_args(server: OpenAITestServer, output, *extra: str, n: int = 12) -> list[str]:
    return [
        "generate",
        "--base-url",
        server.base_url,
        "--model",
        "canned-teacher",
        "--num-instructions",
        str(n),
        "--output",
        str(output),
        "--no-progress",
        "concurrency=2",
        "requests_per_batch=2",
        "tasks_per_request=6",
        "backoff_base=0.01",
        *extra,
    ]


@pytest.fixture(scope="module")
def server():
    """One teacher for the module: its URL is part of a run's fingerprint."""
    with OpenAITestServer() as server:
        yield server


@pytest.fixture(scope="module")
def finished_run(server, tmp_path_factory):
    """A finished run's files (bytes), to copy into each test."""
    folder = tmp_path_factory.mktemp("finished")
    output = folder / "data.json"
    assert corral_main(generate_args(server, output)) == 0
    return {path.name: path.read_bytes() for path in run_paths(output)}


def restore(files: dict[str, bytes], folder) -> tuple:
    for name, data in files.items():
        (folder / name).write_bytes(data)
    return run_paths(folder / "data.json")


# ------------------------------------------------------------------ 1. damaged journals


def _task_line(lines: list[str]) -> int:
    """Index of a task line with committed rounds after it (the middle of the journal)."""
    tasks = [i for i, line in enumerate(lines) if json.loads(line)["kind"] == "task"]
    return tasks[len(tasks) // 2]


DAMAGE = {
    "invalid JSON": lambda line: line[: len(line) // 2],
    "a list": lambda line: "[]",
    "a string": lambda line: '"hello"',
    "a task without instruction": lambda line: json.dumps({"kind": "task", "instances": []}),
    "a task whose instances are not records": lambda line: json.dumps(
        {"kind": "task", "instruction": "Name two rivers.", "instances": ["Nile"]}
    ),
    "a batch without batch_id": lambda line: json.dumps({"kind": "batch", "key": "k"}),
    "a commit with a non-numeric round": lambda line: json.dumps(
        {"kind": "commit", "round": "three", "tasks": 1}
    ),
    "an unknown kind": lambda line: json.dumps({"kind": "note"}),
}


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_a_damaged_line_in_the_middle_of_a_journal_is_refused(
    server, damage, finished_run, tmp_path, capsys
):
    output, journal, manifest = restore(finished_run, tmp_path)
    output.unlink()  # killed before the dataset was written: the rerun must read the journal
    lines = journal.read_text().splitlines()
    at = _task_line(lines)
    lines[at] = DAMAGE[damage](lines[at])
    journal.write_text("\n".join(lines) + "\n")
    before = journal.read_bytes()
    before_requests = server.stats["requests"]
    code = corral_main(generate_args(server, output))
    assert server.stats["requests"] == before_requests
    err = capsys.readouterr().err
    assert code == 2
    assert f"{journal}: line {at + 1}:" in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1
    assert journal.read_bytes() == before  # nothing dropped, nothing rewritten
    assert not output.exists()


def test_only_a_torn_last_piece_is_dropped(server, finished_run, tmp_path, capsys):
    output, journal, _ = restore(finished_run, tmp_path)
    output.unlink()
    committed = journal.read_bytes()
    journal.write_bytes(committed + b'{"kind": "task", "instruction": "Half a li')
    before_requests = server.stats["requests"]
    assert corral_main(generate_args(server, output)) == 0
    assert server.stats["requests"] == before_requests  # every committed round was kept
    assert journal.read_bytes() == committed
    assert len(read_alpaca(output)) == 12


# ------------------------------------------------------------------ 2. a finished dataset


@pytest.mark.parametrize("left", ["output", "manifest"])
def test_a_finished_dataset_without_its_journal_is_not_replaced(
    server, left, finished_run, tmp_path, capsys
):
    output, journal, manifest = restore(finished_run, tmp_path)
    journal.unlink()
    (manifest if left == "output" else output).unlink()
    kept = (output if left == "output" else manifest).read_bytes()
    before_requests = server.stats["requests"]
    code = corral_main(generate_args(server, output, n=5))
    assert server.stats["requests"] == before_requests
    err = capsys.readouterr().err
    assert code == 2 and "--overwrite" in err and "journal" in err
    assert (output if left == "output" else manifest).read_bytes() == kept
    assert not journal.exists()
    assert corral_main([*generate_args(server, output, n=5), "--overwrite"]) == 0
    assert len(read_alpaca(output)) == 5


# ------------------------------------------------------------------ 3. changed settings


@pytest.mark.parametrize(
    "override, named",
    [
        ("temperature=0.5", "temperature: 1.0 -> 0.5"),
        ("top_p=0.9", "top_p: 1.0 -> 0.9"),
        ("tasks_per_request=8", "tasks_per_request: 6 -> 8"),
        ("max_tokens=512", "max_tokens: 3072 -> 512"),
        ("min_instruction_words=6", "min_instruction_words: 4 -> 6"),
        ("blocklist=[]", "blocklist: "),
    ],
)
def test_a_changed_setting_is_refused_naming_it(
    override, named, server, finished_run, tmp_path, capsys
):
    output, journal, manifest = restore(finished_run, tmp_path)
    before = {p: p.read_bytes() for p in (output, journal, manifest)}
    code = corral_main([*generate_args(server, output), override])
    err = capsys.readouterr().err
    assert code == 2 and named in err, err
    assert {p: p.read_bytes() for p in before} == before  # the manifest does not lie


def test_speed_settings_may_change_on_resume(server, finished_run, tmp_path):
    output, journal, manifest = restore(finished_run, tmp_path)
    args = generate_args(server, output, "concurrency=4", "max_retries=2", n=16)
    assert corral_main(args) == 0
    assert len(read_alpaca(output)) == 16
    assert json.loads(manifest.read_text())["resumed"] is True


# ------------------------------------------------------------------ 7. a teacher that fails


def test_a_teacher_that_answers_500_to_everything_stops_the_run(tmp_path, capsys):
    import time

    output = tmp_path / "data.json"
    _, journal, _ = run_paths(output)
    # Two good rounds of two requests, then HTTP 500 forever.
    with OpenAITestServer(faults=[None] * 4 + ["500"] * 5000) as server:
        started = time.monotonic()
        args = [a for a in generate_args(server, output, n=200) if a != "--no-progress"]
        code = corral_main(args)
        seconds = time.monotonic() - started
    err = capsys.readouterr().err
    assert code == 2 and seconds < 30
    line = [text for text in err.splitlines() if text.startswith("corral: error:")]
    assert len(line) == 1 and server.base_url in line[0] and "HTTP 500" in line[0]
    assert "failed the last 16 requests in a row" in line[0]
    # The progress bar showed the errors as they came, before the run stopped.
    assert "errors=" in err
    # What was answered before is journaled and resumes.
    entries = [json.loads(x) for x in journal.read_text().splitlines()]
    commits = [entry for entry in entries if entry["kind"] == "commit"]
    assert len(commits) >= 2 and commits[1]["tasks"] > 0
    assert sum(1 for entry in entries if entry["kind"] == "task") == commits[-1]["tasks"]


def test_a_teacher_that_never_answers_stops_after_its_patience(tmp_path, capsys):
    import time

    output = tmp_path / "data.json"
    with OpenAITestServer(faults=["slow"] * 50, slow_seconds=20) as server:
        started = time.monotonic()
        args = generate_args(server, output, "teacher_patience=2", "request_timeout=120")
        code = corral_main(args)
        seconds = time.monotonic() - started
    err = capsys.readouterr().err
    assert code == 2 and seconds < 15, seconds
    assert f"the teacher at {server.base_url} gave no usable answer for 2 s" in err
    assert "no request has come back" in err and len(err.strip().splitlines()) == 1


def test_estimate_against_a_failing_teacher_exits_non_zero(tmp_path, capsys):
    output = tmp_path / "data.json"
    with OpenAITestServer(faults=["500"] * 500) as server:
        code = corral_main([*generate_args(server, output), "max_retries=1", "--estimate"])
    err = capsys.readouterr().err
    assert code == 2 and server.base_url in err, err
    assert "answered none of the 4 probe requests (8 attempts; errors: http_500 8)" in err
    assert not (tmp_path / "data.estimate.json").exists()


def test_a_judge_that_answers_500_stops_score_naming_it(tmp_path, capsys):
    data = tmp_path / "data.json"
    data.write_text(json.dumps([{"instruction": f"Say {i}.", "output": str(i)} for i in range(40)]))
    with OpenAITestServer(faults=["500"] * 500) as server:
        code = corral_main(
            ["score", str(data), "--output", str(tmp_path / "scored.json"), "--judge-base-url",
             server.base_url, "--judge-model", "j"]
        )  # fmt: skip
    err = capsys.readouterr().err
    assert code == 2 and server.base_url in err and "HTTP 500" in err, err
    assert "errors=" in err  # the progress bar counted them as they came
    assert "replies held none" not in err
    assert not (tmp_path / "scored.json").exists()


# ------------------------------------------------------------------ 8. one line, not a traceback


def one_error_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("corral: error: ") and "Traceback" not in err
    return lines[0]


@pytest.mark.skipif(not os.path.isdir("/proc/self"), reason="needs /proc")
def test_an_output_in_a_folder_nothing_can_be_written_to_is_one_line(tmp_path, capsys):
    """Root passes every permission check; /proc takes no new files from anyone."""
    data = tmp_path / "data.json"
    data.write_text(json.dumps([{"instruction": "Say hi.", "output": "hi"}]))
    assert corral_main(["dedup", str(data), "--output", "/proc/corral-out.json"]) == 2
    assert "cannot write in /proc" in one_error_line(capsys.readouterr().err)


def test_an_unknown_model_name_offline_is_one_line_before_loading(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    data = tmp_path / "in.jsonl"
    data.write_text(json.dumps({"instruction": "Say hi."}) + "\n")
    argv = ["infer", "--model", "does-not/exist-xyz", "--input", str(data), "--output",
            str(tmp_path / "out.jsonl")]  # fmt: skip
    assert corral_main(argv) == 2
    line = one_error_line(capsys.readouterr().err)
    assert "does-not/exist-xyz: no such model folder" in line and "offline" in line
    assert not (tmp_path / "out.jsonl").exists()


def test_serve_finds_a_port_in_use_before_loading_the_model(capsys):
    import socket
    import time

    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    port = taken.getsockname()[1]
    try:
        started = time.monotonic()
        # A model that would take long to load, or not load at all: the port is checked first.
        code = corral_main(["serve", "--model", "does-not/exist-xyz", "--port", str(port)])
        seconds = time.monotonic() - started
    finally:
        taken.close()
    line = one_error_line(capsys.readouterr().err)
    assert code == 2 and f"127.0.0.1:{port}: cannot listen there" in line
    assert "choose another --port" in line and seconds < 5


def test_a_corrupt_lineage_sidecar_is_one_line_in_report(server, finished_run, tmp_path, capsys):
    from corral.data_gen.lineage import lineage_path

    output, _, _ = restore(finished_run, tmp_path)
    lineage = lineage_path(output)
    lineage.write_text('{"seed_tasks": ["seed_task_0"]}\n{"seed_tasks": ["seed_t\n')
    code = corral_main(["report", str(output), "--output", str(tmp_path / "r.html")])
    line = one_error_line(capsys.readouterr().err)
    assert code == 2 and f"{lineage}: line 2: not valid JSON" in line
    assert not (tmp_path / "r.html").exists()


# ------------------------------------------------------------------ 9. weights and the umask


def test_weights_follow_the_umask_in_runs_checkpoints_and_merges(tmp_path):
    """safetensors creates 0600 files; every other output follows the umask, weights too."""
    import stat
    import subprocess
    import sys
    from pathlib import Path

    from corral.training.export import merge_run

    repo = Path(__file__).resolve().parents[1]
    run = tmp_path / "run"
    umask = 0o002  # a group-shared run folder
    result = subprocess.run(
        [sys.executable, "-c", f"import os, runpy, sys; os.umask({umask}); sys.argv = sys.argv[1:];"
         " runpy.run_path('train.py', run_name='__main__')", "train.py", "--config",
         "configs/training/smoke.yaml", "model=tiny-random", f"output_dir={run}",
         "report_to=[none]", "max_steps=2", "save_steps=1", "val_size=0"],
        cwd=repo, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    previous = os.umask(umask)
    try:
        merged = merge_run(run, tmp_path / "merged")
    finally:
        os.umask(previous)
    weights = [
        run / "adapter_model.safetensors",
        *sorted((run / "checkpoints").rglob("*.safetensors")),
        merged / "model.safetensors",
    ]
    assert len(weights) >= 3 and all(path.is_file() for path in weights)
    modes = {path.relative_to(tmp_path): oct(stat.S_IMODE(path.stat().st_mode)) for path in weights}
    assert set(modes.values()) == {oct(0o666 & ~umask)}, modes


# ------------------------------------------------------------------ 10. the server's limits


@pytest.fixture(scope="module")
def tiny_server(tiny_model_path):
    from corral.inference.loading import load_for_inference
    from corral.inference.server import build_server
    from servers import app_on_a_thread

    loaded = load_for_inference("tiny-random", template="alpaca")
    app = build_server(loaded, model_name="tiny", max_batch_size=4, max_prompts_per_request=8)
    with app_on_a_thread(app) as base:
        yield base


def test_a_completions_request_holds_at_most_the_cap_of_prompts(tiny_server):
    import httpx

    body = {"model": "tiny", "max_tokens": 1, "temperature": 0}
    over = httpx.post(f"{tiny_server}/v1/completions", json={**body, "prompt": ["hi"] * 9})
    assert over.status_code == 400
    error = over.json()["error"]
    assert error["param"] == "prompt" and "at most 8 prompts per request, got 9" in error["message"]
    at_cap = httpx.post(f"{tiny_server}/v1/completions", json={**body, "prompt": ["hi"] * 8})
    assert at_cap.status_code == 200 and len(at_cap.json()["choices"]) == 8


@pytest.mark.parametrize(
    "path, field, value",
    [
        ("chat/completions", "tools", [{"type": "function", "function": {"name": "f"}}]),
        ("chat/completions", "tool_choice", "required"),
        ("chat/completions", "response_format", {"type": "json_object"}),
        ("completions", "best_of", 3),
        ("completions", "suffix", " and so on."),
    ],
)
def test_fields_the_server_does_not_honour_are_400_naming_them(tiny_server, path, field, value):
    import httpx

    body = {"model": "tiny", "max_tokens": 1}
    body |= {"prompt": "hi"} if path == "completions" else {"messages": [{"role": "user", "content": "hi"}]}  # fmt: skip
    refused = httpx.post(f"{tiny_server}/v1/{path}", json={**body, field: value})
    assert refused.status_code == 400 and refused.json()["error"]["param"] == field
    assert f"'{field}' is not supported" in refused.json()["error"]["message"]
    # Their neutral values (what some clients always send) change nothing and pass.
    neutral = {"tools": [], "tool_choice": "none", "response_format": {"type": "text"},
               "best_of": 1, "suffix": ""}[field]  # fmt: skip
    assert httpx.post(f"{tiny_server}/v1/{path}", json={**body, field: neutral}).status_code == 200


def test_logit_bias_is_honoured(tiny_server):
    import httpx

    body = {"model": "tiny", "max_tokens": 3, "temperature": 0, "prompt": "hi"}
    plain = httpx.post(f"{tiny_server}/v1/completions", json=body).json()
    forced = httpx.post(
        f"{tiny_server}/v1/completions", json={**body, "logit_bias": {"42": 100}}
    ).json()
    assert forced["choices"][0]["text"] != plain["choices"][0]["text"]
    assert forced["usage"]["completion_tokens"] == 3
