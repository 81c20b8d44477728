"""Where each generated record came from: `OUTPUT.lineage.jsonl`, one line per record.

A line holds the record's position in the output and its task's instance, the round and request
that produced it, the seed tasks (by id) and machine instructions shown in that request's prompt,
the teacher and its sampling settings, and its similarity to what came before: the nearest earlier
instruction with its ROUGE-L (from the novelty filter), and, as Stanford Alpaca kept them, its 10
most similar earlier instructions and its average similarity to all of them (seeds and kept
instructions before it). The Alpaca JSON itself stays plain.

The lineage of each task travels in the crash-safe journal with the task, and the file is written
atomically when the run finishes, so a resumed run has exactly one line per record.
"""

from __future__ import annotations

import json
import os
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from corral.errors import RecordError
from corral.fileio import atomic_open
from corral.rouge import rouge_tokens

MOST_SIMILAR = 10
_METHOD_KEYS = ("operation", "generation", "ancestors", "system_prompt")
_BLOCK = 512  # rows scored at once: memory stays at a block x all instructions


def lineage_path(output: str | os.PathLike) -> Path:
    """`x.lineage.jsonl` beside `x.json`."""
    output = Path(output)
    stem = output.with_suffix("") if output.suffix else output
    return Path(f"{stem}.lineage.jsonl")


def similarity_profile(
    earlier_then_kept: Sequence[str], first_kept: int
) -> list[tuple[dict[str, float], float]]:
    """For each text from `first_kept` on: its most similar earlier texts and the mean ROUGE-L.

    ROUGE-L F1 over rouge_score's tokens is 2·LCS/(m+n), which is exactly the normalised Indel
    similarity of the token sequences; rapidfuzz computes it for whole blocks in C++, so the
    all-pairs profile of 52K instructions takes seconds, not the hours of a Python loop.
    """
    from rapidfuzz.distance import Indel
    from rapidfuzz.process import cdist

    vocabulary: dict[str, int] = {}
    # One character per distinct token (from the supplementary planes: no surrogates).
    encoded = [
        "".join(chr(0x10000 + vocabulary.setdefault(t, len(vocabulary))) for t in rouge_tokens(s))
        for s in earlier_then_kept
    ]
    profile: list[tuple[dict[str, float], float]] = []
    for start in range(first_kept, len(encoded), _BLOCK):
        stop = min(start + _BLOCK, len(encoded))
        scores = cdist(
            encoded[start:stop],
            encoded[:stop],
            scorer=Indel.normalized_similarity,
            dtype=np.float64,
            workers=-1,
        )
        for row, position in enumerate(range(start, stop)):
            before = scores[row, :position]
            if before.size == 0:
                profile.append(({}, 0.0))
                continue
            top = np.argsort(-before, kind="stable")[:MOST_SIMILAR]
            similar = {earlier_then_kept[i]: round(float(before[i]), 4) for i in top}
            profile.append((similar, round(float(before.mean()), 4)))
    return profile


def write_lineage(
    path: Path,
    tasks: Sequence[dict[str, Any]],
    seed_instructions: Sequence[str],
    *,
    teacher: dict[str, Any],
    sampling: dict[str, Any],
) -> int:
    """One line per record of `tasks` (in output order), written atomically; returns the count."""
    profile = similarity_profile(
        [*seed_instructions, *(t["instruction"] for t in tasks)], len(seed_instructions)
    )
    written = 0
    with atomic_open(path) as handle:
        for task, (similar, average) in zip(tasks, profile, strict=True):
            origin = task.get("lineage") or {}
            for instance in range(len(task["instances"])):
                line = {
                    "record": written,
                    "instruction": task["instruction"],
                    "instance": instance,
                    "round": origin.get("round"),
                    "request": origin.get("request"),
                    "seed_tasks": origin.get("seeds"),
                    "machine_instructions": origin.get("machine", []),
                    "teacher": teacher,
                    "sampling": sampling,
                    "nearest_instruction": task.get("nearest_instruction"),
                    "rouge_l": task.get("rouge_l"),
                    "most_similar_instructions": similar,
                    "avg_similarity_score": average,
                    # Evol-Instruct: the operation, generation and chain from the root seed;
                    # Magpie: the steering system prompt.
                    **{key: origin[key] for key in _METHOD_KEYS if key in origin},
                }
                handle.write(json.dumps(line, ensure_ascii=False) + "\n")
                written += 1
    return written


def records_per_seed(path: str | os.PathLike) -> Counter:
    """How many kept records each seed task's presence in a prompt led to (from a lineage file)."""
    counts: Counter = Counter()
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise RecordError(path, f"cannot read the lineage file: {exc}") from None
    for line_no, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            entry = json.loads(line)
        except json.JSONDecodeError as exc:
            raise RecordError(path, f"not valid JSON ({exc.msg})", line=line_no) from None
        seeds = entry.get("seed_tasks") if isinstance(entry, dict) else None
        if not isinstance(entry, dict) or not isinstance(seeds, list | None):
            raise RecordError(path, "expected an object whose seed_tasks is a list", line=line_no)
        counts.update(seed if isinstance(seed, str | int) else str(seed) for seed in seeds or [])
    return counts
