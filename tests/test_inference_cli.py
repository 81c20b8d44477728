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


@pytest.mark.slow  # runs `corral infer` processes
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
    """A run that dies after its second answer leaves those answers in the partial file; the rerun
    keeps them, answers only the rest, and writes the complete output."""
    import corral.inference.batch as batch
    from corral.inference.generation import templated_params
    from corral.inference.loading import load_for_inference

    loaded = load_for_inference("tiny-random", template="alpaca")
    params = templated_params(loaded, max_new_tokens=4)
    source = tmp_path / "in.json"
    write_alpaca(source, RECORDS)
    out = tmp_path / "out.jsonl"

    real_answer_from_result = batch.answer_from_result
    calls = []

    def dies_on_third_answer(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real_answer_from_result(*args, **kwargs)

    monkeypatch.setattr(batch, "answer_from_result", dies_on_third_answer)
    with pytest.raises(KeyboardInterrupt):
        batch.run_batch_inference(loaded, source, out, params, batch_size=2, progress=False)
    assert not out.exists()
    lines = batch.partial_path(out).read_text().splitlines()
    saved = {json.loads(line)["index"]: json.loads(line)["output"] for line in lines[1:]}
    assert len(saved) == 2

    monkeypatch.setattr(batch, "answer_from_result", real_answer_from_result)
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
    from corral.errors import UsageError

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


@pytest.mark.slow
def test_infer_lets_the_next_record_start_when_one_finishes(tmp_path, embedded_model_path):
    """Continuous batching: with two slots, one short and two long answers take about one long
    answer's worth of decode steps, not two (a fixed chunk waits for its longest answer)."""
    from corral.inference.batch import run_batch_inference
    from corral.inference.engine import GenerationEngine
    from corral.inference.generation import record_prompt, templated_params
    from corral.inference.loading import load_for_inference

    loaded = load_for_inference("embedded", template="alpaca")
    longest = 32
    params = templated_params(loaded, max_new_tokens=longest)
    candidates = [
        {"instruction": text}
        for text in (
            "Say hello.",
            "What is 2+2?",
            "Name a planet.",
            "Describe the sea.",
            "List three animals.",
            "Write a short story about a lighthouse keeper.",
            "Write a long essay about the history of rivers and the towns beside them.",
            "Explain in detail how a steam engine works.",
        )
    ]
    # How long each answer is when generated alone (greedy: the same inside any batch).
    probe = GenerationEngine(loaded.model, loaded.tokenizer, max_batch_size=8)
    runs = probe.generate([record_prompt(loaded, r) for r in candidates], params)
    lengths = sorted(
        ((r.completion_tokens, r.finish_reason, c) for c, r in zip(candidates, runs, strict=True)),
        key=lambda row: row[0],
    )
    short = [c for n, reason, c in lengths if reason == "stop" and n <= longest // 4]
    long = [c for n, reason, c in lengths if reason == "length"][:2]
    # The short answer has the shortest prompt, so a fixed-chunk run would pair it with a long
    # answer (infer orders records by prompt length) and then run the other long one alone.
    first = min(short, key=lambda c: len(c["instruction"]))
    assert len(long) == 2 and all(len(first["instruction"]) < len(c["instruction"]) for c in long)
    records = [first, *long]

    source = tmp_path / "in.json"
    write_alpaca(source, records)
    summary = run_batch_inference(
        loaded, source, tmp_path / "out.json", params, batch_size=2, progress=False
    )
    assert summary.stopped_for_length == 2
    # The second long answer takes the short one's slot as soon as it is free: about `longest`
    # steps in all. Chunks (short, long) then (long) would take 2 x `longest`.
    assert summary.decode_steps <= longest + longest // 4
