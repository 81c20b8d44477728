"""Prompt data for online RL, and the built-in verifiable task that shows learning on a CPU.

Prompt records: a JSON list or JSONL of `{"prompt": str, ...}`. An optional `input` string is
rendered as the template's input (as for Alpaca records); every other field (`answer`, a test
case, an id) is kept and reaches the reward functions as a list aligned with the completions.
Errors name the file, the line (JSONL) or record index (JSON) and the field.

The built-in task (`arithmetic_records`): small-number arithmetic questions with a numeric
`answer`, generated deterministically from a seed; the preset's data files
(configs/training/grpo_arithmetic.jsonl) are its output for seed 0, and a test checks they still
are. The embedded 135M model answers about half of them right before training, so GRPO groups mix
right and wrong answers (a learning signal) and held-out accuracy has room to rise.
"""

from __future__ import annotations

import os
import random
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from corral.errors import RecordError
from corral.records import iter_json_objects


def validate_prompt_record(
    obj: dict[str, Any], path: str | os.PathLike, location: dict[str, int]
) -> dict[str, Any]:
    """Check one prompt record: `prompt` a non-empty string, `input` (if any) a string."""
    if "prompt" not in obj:
        raise RecordError(path, "missing required field", field="prompt", **location)
    for name in ("prompt", "input"):
        if name not in obj:
            continue
        value = obj[name]
        if not isinstance(value, str):
            hint = (
                " (conversational prompts are not supported: give the user's message as a string;"
                " the run's template renders it)"
                if isinstance(value, list)
                else ""
            )
            raise RecordError(
                path,
                f"expected a string, got {type(value).__name__}{hint}",
                field=name,
                **location,
            )
    if not obj["prompt"].strip():
        raise RecordError(path, "prompt is empty", field="prompt", **location)
    return dict(obj)


def read_prompt_records(
    path: str | os.PathLike, *, required_fields: Sequence[str] = ()
) -> list[dict[str, Any]]:
    """Read and check prompt records; `required_fields` (what the reward functions read) must be
    in every record."""
    if not str(path):
        raise RecordError(
            "<config>", "no prompt data: set data=PATH (JSON or JSONL of {prompt, ...})"
        )
    if not Path(path).expanduser().is_file():
        raise RecordError(path, "file not found (prompt data is a JSON or JSONL file)")
    records = []
    for obj, location in iter_json_objects(Path(path).expanduser()):
        record = validate_prompt_record(obj, path, location)
        for name in required_fields:
            if name not in record:
                raise RecordError(
                    path,
                    "missing field a reward function reads",
                    field=name,
                    **location,
                )
        records.append(record)
    if not records:
        raise RecordError(path, "no records: the file holds an empty list")
    return records


# ---------------------------------------------------------------- the built-in task


ANSWER_FORMAT = " Answer with the number only."


def arithmetic_records(seed: int = 0, count: int = 256) -> list[dict[str, Any]]:
    """`count` distinct small-number questions with their numeric answers, the same for a seed:
    additions (1-20 + 1-9), subtractions (6-30 - 1-5) and successors (1-98), a third each on
    average."""
    rng = random.Random(seed)
    seen: set[str] = set()
    records = []
    while len(records) < count:
        kind = rng.choice(("add", "subtract", "next"))
        if kind == "add":
            a, b = rng.randint(1, 20), rng.randint(1, 9)
            prompt, answer = f"What is {a} + {b}?", a + b
        elif kind == "subtract":
            a, b = rng.randint(6, 30), rng.randint(1, 5)
            prompt, answer = f"What is {a} - {b}?", a - b
        else:
            a = rng.randint(1, 98)
            prompt, answer = f"What number comes after {a}?", a + 1
        if prompt in seen:
            continue
        seen.add(prompt)
        records.append({"prompt": prompt + ANSWER_FORMAT, "answer": str(answer), "kind": kind})
    return records


if __name__ == "__main__":
    # Writes the built-in task as a prompt file:
    #   python -m corral.training.rl_data SEED COUNT OUT.jsonl
    # (the preset's configs/training/grpo_arithmetic.jsonl is `0 256`).
    import json
    import sys

    from corral.fileio import atomic_write_text

    seed, count, out = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
    lines = [json.dumps(record) for record in arithmetic_records(seed, count)]
    atomic_write_text(out, "\n".join(lines) + "\n")
