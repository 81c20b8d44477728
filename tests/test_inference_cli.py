"""`corral infer` (batched, resumable) and `corral chat` (streamed, multi-turn) as real commands."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from corral.records import read_alpaca, write_alpaca

REPO = Path(__file__).resolve().parents[1]

RECORDS = [
    {"instruction": "Name a color.", "input": "", "id": "a"},
    {"instruction": "Add the numbers.", "input": "2 and 3"},
    {"instruction": "Say hello.", "output": "old answer"},
    {"instruction": "Give a synonym for quick.", "input": ""},
    {"instruction": "Translate to French.", "input": "cat"},
]


def corral(
    *args: str, stdin: str | None = None, timeout: float = 300
) -> subprocess.CompletedProcess:
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false"}
    return subprocess.run(
        [sys.executable, "-m", "corral.cli", *args],
        cwd=REPO,
        env=env,
        input=stdin,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@pytest.mark.slow
def test_infer_fills_outputs_and_keeps_other_fields(tmp_path, tiny_model_path):
    source = tmp_path / "in.jsonl"
    write_alpaca(source, RECORDS)
    out = tmp_path / "answers.json"
    done = corral(
        "infer",
        "--model",
        "tiny-random",
        "--template",
        "dolly",
        "--input",
        str(source),
        "--output",
        str(out),
        "--max-new-tokens",
        "5",
        "--batch-size",
        "2",
    )
    assert done.returncode == 0, done.stderr
    assert "wrote 5 records" in done.stdout
    answered = read_alpaca(out)
    assert [r["instruction"] for r in answered] == [r["instruction"] for r in RECORDS]
    assert answered[0]["id"] == "a" and answered[1]["input"] == "2 and 3"
    assert answered[2]["output"] != "old answer"
    assert not (tmp_path / "answers.json.partial.jsonl").exists()


def test_infer_bad_input_names_file_record_and_field(tmp_path):
    source = tmp_path / "bad.json"
    source.write_text(json.dumps([{"instruction": "ok"}, {"instruction": 7}]))
    done = corral(
        "infer",
        "--model",
        "tiny-random",
        "--input",
        str(source),
        "--output",
        str(tmp_path / "o.json"),
    )
    assert done.returncode == 2
    assert (
        str(source) in done.stderr and "record 1" in done.stderr and "'instruction'" in done.stderr
    )
    assert not (tmp_path / "o.json").exists()


def test_infer_resumes_after_an_interruption(tmp_path, monkeypatch):
    """A run that dies after its first batch leaves its answers in the partial file; the rerun
    keeps them, answers only the rest, and writes the complete output."""
    import inference.batch as batch
    from inference.generation import templated_params
    from inference.loading import load_for_inference

    loaded = load_for_inference("tiny-random", template="alpaca")
    params = templated_params(loaded, max_new_tokens=4)
    source = tmp_path / "in.json"
    write_alpaca(source, RECORDS)
    out = tmp_path / "out.jsonl"

    real_answer_records = batch.answer_records
    calls = []

    def dies_on_second_batch(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real_answer_records(*args, **kwargs)

    monkeypatch.setattr(batch, "answer_records", dies_on_second_batch)
    with pytest.raises(KeyboardInterrupt):
        batch.run_batch_inference(loaded, source, out, params, batch_size=2, progress=False)
    assert not out.exists()
    lines = batch.partial_path(out).read_text().splitlines()
    saved = {json.loads(line)["index"]: json.loads(line)["output"] for line in lines[1:]}
    assert len(saved) == 2

    monkeypatch.setattr(batch, "answer_records", real_answer_records)
    # Tamper with a saved answer: the rerun must take it from the partial file, not regenerate it.
    first = min(saved)
    lines[1 + list(saved).index(first)] = json.dumps(
        {"index": first, "output": "FROM PARTIAL FILE"}
    )
    batch.partial_path(out).write_text("\n".join(lines) + "\n")
    summary = batch.run_batch_inference(loaded, source, out, params, batch_size=2, progress=False)
    assert (summary.resumed, summary.answered_now, summary.records) == (2, 3, 5)
    answered = read_alpaca(out)
    assert answered[first]["output"] == "FROM PARTIAL FILE"
    assert not batch.partial_path(out).exists()

    # A partial file from different settings is refused rather than silently mixed in.
    batch.partial_path(out).write_text(json.dumps({"corral_partial": 1, "model": "other"}) + "\n")
    from corral.cli import UsageError

    with pytest.raises(UsageError, match="different input, model or settings"):
        batch.run_batch_inference(loaded, source, out, params, batch_size=2, progress=False)


@pytest.mark.slow
def test_chat_streams_multi_turn_answers(embedded_model_path):
    done = corral(
        "chat",
        "--model",
        "embedded",
        "--max-new-tokens",
        "8",
        "--temperature",
        "0",
        stdin="What is 2 plus 2?\n/reset\nSay goodbye.\n/exit\nnever read\n",
    )
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert "(new conversation)" in lines
    before, after = done.stdout.split("(new conversation)")
    assert before.strip() and after.strip()  # one answer per turn
    assert "never read" not in done.stdout
