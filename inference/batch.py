"""`corral infer`: fill in the `output` of every Alpaca record in a file, resumably.

Answers are appended to `OUTPUT.partial.jsonl` batch by batch (each line `{"index", "output"}`,
after a header line that ties the file to its input and model), so an interrupted run picks up
where it stopped. When every record is answered, OUTPUT is written atomically and the partial file
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

from corral.cli import UsageError
from corral.records import read_alpaca, write_alpaca
from inference.engine import GenerationEngine
from inference.generation import answer_records
from inference.loading import LoadedModel
from inference.params import SamplingParams

PARTIAL_SUFFIX = ".partial.jsonl"


@dataclass
class BatchSummary:
    records: int
    answered_now: int
    resumed: int
    end_marker_found: int
    stopped_for_length: int
    generated_tokens: int
    seconds: float


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
    """Answer every record of `input_path` and write them, `output` filled, to `output_path`."""
    from tqdm import tqdm

    started = time.monotonic()
    input_path, output_path = Path(input_path), Path(output_path)
    if input_path.resolve() == output_path.resolve():
        raise UsageError(f"{output_path}: the output must not overwrite the input file")
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
    # Shortest prompts first within each batch keeps left padding small.
    todo = sorted(
        (i for i in range(len(records)) if i not in done),
        key=lambda i: len(records[i]["instruction"]) + len(records[i].get("input") or ""),
    )
    engine = GenerationEngine(
        loaded.model,
        loaded.tokenizer,
        max_batch_size=batch_size,
        context_length=loaded.context_length,
    )
    end_found = length_stops = tokens = 0

    partial.parent.mkdir(parents=True, exist_ok=True)
    fresh = not partial.is_file() or not done
    with open(partial, "w" if fresh else "a", encoding="utf-8") as sink:
        if fresh:
            sink.write(json.dumps(header) + "\n")
        bar = tqdm(
            total=len(records),
            initial=resumed,
            unit="record",
            desc="answering",
            disable=not progress,
        )
        for start in range(0, len(todo), batch_size):
            chunk = todo[start : start + batch_size]
            answers = answer_records(loaded, engine, [records[i] for i in chunk], params)
            for index, answer in zip(chunk, answers, strict=True):
                done[index] = answer.text
                end_found += answer.end_marker_found
                length_stops += answer.finish_reason == "length"
                tokens += answer.completion_tokens
                sink.write(
                    json.dumps({"index": index, "output": answer.text}, ensure_ascii=False) + "\n"
                )
            sink.flush()
            os.fsync(sink.fileno())
            bar.update(len(chunk))
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
    )
