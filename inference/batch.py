"""`corral infer`: fill in the `output` of every Alpaca record in a file, resumably.

Answers are appended to `OUTPUT.partial.jsonl` as each one finishes (each line `{"index",
"output"}`, after a header line that ties the file to its input and model), so an interrupted run
picks up where it stopped. When every record is answered, OUTPUT is written atomically and the partial file
is removed; OUTPUT therefore only ever holds a complete result.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from corral.inference.engine import GenerationEvent, GenerationResult
from corral.inference.generation import answer_from_result, record_prompt
from corral.inference.loading import LoadedModel
from corral.inference.params import SamplingParams

from corral.errors import UsageError
from corral.fileio import check_output_path, exclusive_output
from corral.records import read_alpaca, write_alpaca

PARTIAL_SUFFIX = ".partial.jsonl"
SYNC_SECONDS = 1.0


@dataclass
class BatchSummary:
    records: int
    answered_now: int
    resumed: int
    end_marker_found: int
    stopped_for_length: int
    generated_tokens: int
    seconds: float
    decode_steps: int  # forward passes that advanced every running answer by one token


def partial_path(output: Path) -> Path:
    return output.with_name(output.name + PARTIAL_SUFFIX)


def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _read_partial(path: Path, header: dict[str, Any], total: int) -> dict[int, str]:
    """Answers saved by an earlier run, if that run used the same input, model and settings."""
    if not path.is_file():
        return {}
    done: dict[int, str] = {}
    with open(path, encoding="utf-8") as handle:
        lines = handle.read().splitlines()
    if not lines:
        return {}
    try:
        saved_header = json.loads(lines[0])
    except json.JSONDecodeError:
        saved_header = None
    if saved_header != header:
        raise UsageError(
            f"{path}: left by a run with a different input, model or settings; "
            "delete it to start over, or rerun with the same arguments to resume"
        )
    for number, line in enumerate(lines[1:], start=2):
        try:
            entry = json.loads(line)
        except json.JSONDecodeError:
            if number == len(lines):
                break  # the last line was cut short by the interruption: answer that record again
            raise UsageError(
                f"{path}: line {number}: not valid JSON; delete the file to start over"
            ) from None
        index = entry.get("index")
        if isinstance(index, int) and 0 <= index < total and isinstance(entry.get("output"), str):
            done[index] = entry["output"]
    return done


def run_batch_inference(
    loaded: LoadedModel,
    input_path: str | os.PathLike,
    output_path: str | os.PathLike,
    params: SamplingParams,
    *,
    batch_size: int = 8,
    progress: bool = True,
) -> BatchSummary:
    """Answer every record of `input_path` and write them, `output` filled, to `output_path`.

    Every prompt goes to the engine at once; it keeps `batch_size` of them generating and admits
    the next as soon as one finishes (continuous batching), so a short answer never waits for the
    longest answer of a fixed chunk. Each answer is appended to the partial file as it finishes.
    """
    input_path, output_path = Path(input_path), Path(output_path)
    check_output_path(output_path, inputs=(input_path,))
    check_output_path(partial_path(output_path), inputs=(input_path,), what="progress file")
    with exclusive_output(output_path):
        return _answer_file(loaded, input_path, output_path, params, batch_size, progress)


def _answer_file(
    loaded: LoadedModel,
    input_path: Path,
    output_path: Path,
    params: SamplingParams,
    batch_size: int,
    progress: bool,
) -> BatchSummary:
    from tqdm import tqdm

    started = time.monotonic()
    records = read_alpaca(input_path, require_output=False)
    header = {
        "corral_partial": 1,
        "input_sha256": _file_sha256(input_path),
        "model": loaded.name,
        "template": loaded.template.name,
        "max_new_tokens": params.max_new_tokens,
        "temperature": params.temperature,
        "top_p": params.top_p,
        "top_k": params.top_k,
        "seed": params.seed,
    }
    partial = partial_path(output_path)
    done = _read_partial(partial, header, len(records))
    resumed = len(done)
    # Shortest prompts first: requests admitted together have similar lengths, little padding.
    todo = sorted(
        (i for i in range(len(records)) if i not in done),
        key=lambda i: len(records[i]["instruction"]) + len(records[i].get("input") or ""),
    )
    engine = loaded.make_engine(batch_size)
    end_found = length_stops = tokens = 0

    partial.parent.mkdir(parents=True, exist_ok=True)
    fresh = not partial.is_file() or not done
    with open(partial, "w" if fresh else "a", encoding="utf-8") as sink:
        if fresh:
            sink.write(json.dumps(header) + "\n")
            _sync(sink)
        bar = tqdm(
            total=len(records),
            initial=resumed,
            unit="record",
            desc="answering",
            disable=not progress,
        )
        last_sync = time.monotonic()
        # The engine reports finished requests through callbacks; they are written here, between
        # steps, so a failing write stops the run instead of vanishing inside a callback.
        finished: list[tuple[int, GenerationResult]] = []
        for index in todo:

            def on_event(event: GenerationEvent, index: int = index) -> None:
                if event.result is not None:
                    finished.append((index, event.result))

            engine.submit(record_prompt(loaded, records[index]), params, on_event)
        try:
            more = bool(todo)
            while more:
                more = engine.step()
                for index, result in finished:
                    answer = answer_from_result(loaded, records[index], result)
                    done[index] = answer.text
                    end_found += answer.end_marker_found
                    length_stops += answer.finish_reason == "length"
                    tokens += answer.completion_tokens
                    line = {"index": index, "output": answer.text}
                    sink.write(json.dumps(line, ensure_ascii=False) + "\n")
                    bar.update(1)
                finished.clear()
                sink.flush()
                if time.monotonic() - last_sync >= SYNC_SECONDS:
                    _sync(sink)  # a crash regenerates at most the last second's answers
                    last_sync = time.monotonic()
        finally:
            _sync(sink)
            bar.close()

    write_alpaca(output_path, [{**record, "output": done[i]} for i, record in enumerate(records)])
    partial.unlink(missing_ok=True)
    return BatchSummary(
        records=len(records),
        answered_now=len(todo),
        resumed=resumed,
        end_marker_found=end_found,
        stopped_for_length=length_stops,
        generated_tokens=tokens,
        seconds=time.monotonic() - started,
        decode_steps=engine.stats.decode_steps,
    )


def _sync(handle: Any) -> None:
    handle.flush()
    os.fsync(handle.fileno())
