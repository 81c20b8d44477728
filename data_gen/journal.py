"""The run journal: accepted tasks appended as JSONL, one fsynced commit per round.

Layout, one JSON object per line:

    {"kind": "header", "fingerprint": {...}}            what run this is (checked on resume)
    {"kind": "task", "instruction": ..., "instances": [...], ...}   accepted in this round
    {"kind": "commit", "round": r, "tasks": n, "drops": {...}, "teacher": {...}, ...}
    {"kind": "batch", "key": k, "batch_id": b}          a Batch API batch, journaled when sent

A round's task lines and its commit line are written with one `write`, then flushed and fsynced.
On open, everything after the last complete commit line (a round cut short by a crash, or half a
line) is cut off, so a resumed run sees exactly the rounds that were committed: nothing lost that
was committed, nothing counted twice. A crash can only tear the piece after the last newline; any
other line that is not a well-formed entry (invalid JSON, a missing field) means the file was
damaged or edited, and the journal is refused with its line number: cutting there would delete,
and pay again for, every round after it. Batch lines are kept even after the last commit (they are
written back after the cut): a batch sent and paid for before a crash is polled on resume, not
sent again.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from corral.errors import RecordError

# Version 2 headers hold every setting that changes what the teacher is asked; a version 1
# header lacks some, and only the settings it holds are compared on resume.
JOURNAL_VERSION = 2


@dataclass
class JournalState:
    """What the committed rounds hold."""

    tasks: list[dict[str, Any]] = field(default_factory=list)
    rounds: int = 0
    last_commit: dict[str, Any] = field(default_factory=dict)
    resumed: bool = False
    batches: dict[str, str] = field(default_factory=dict)  # request hash -> batch id


class FingerprintMismatch(ValueError):
    """The journal on disk belongs to a run with different settings."""


class Journal:
    def __init__(
        self,
        path: str | os.PathLike,
        *,
        task_problem: Callable[[dict[str, Any]], str | None] | None = None,
    ) -> None:
        """`task_problem(entry)`: what is wrong with a task line, or None (default: a generated
        task with instances or a conversation)."""
        self.path = Path(path)
        self.task_problem = task_problem or generated_task_problem
        self._handle = None

    def open(self, fingerprint: dict[str, Any]) -> JournalState:
        """Start a new journal, or recover a committed one whose fingerprint matches."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        state = JournalState()
        if self.path.exists() and b"\n" in self.path.read_bytes():
            state, keep_bytes, cut_batches = self._recover(fingerprint)
            with open(self.path, "r+b") as handle:
                handle.truncate(keep_bytes)
                handle.flush()
                os.fsync(handle.fileno())
            self._handle = open(self.path, "a", encoding="utf-8")  # noqa: SIM115
            if cut_batches:
                self._write_durably("".join(cut_batches))
            return state
        self._handle = open(self.path, "w", encoding="utf-8")  # noqa: SIM115
        header = {"kind": "header", "version": JOURNAL_VERSION, "fingerprint": fingerprint}
        self._write_durably(json.dumps(header, ensure_ascii=False) + "\n")
        return state

    def _recover(self, fingerprint: dict[str, Any]) -> tuple[JournalState, int, list[str]]:
        """(state, bytes to keep, batch lines after them to write back)."""
        data = self.path.read_bytes()
        state = JournalState(resumed=True)
        pending: list[dict[str, Any]] = []
        batch_lines: list[tuple[int, str]] = []
        keep_bytes = 0
        offset = 0
        line_no = 0
        for raw in data.split(b"\n")[:-1]:  # the piece after the last newline is torn
            line_no += 1
            offset += len(raw) + 1
            entry = _parse_entry(self.path, raw, line_no, self.task_problem)
            kind = entry["kind"]
            if line_no == 1:
                if kind != "header":
                    raise RecordError(self.path, "not a Corral generation journal", line=1)
                changed = _changed_settings(entry["fingerprint"], fingerprint, entry.get("version"))
                if changed:
                    raise FingerprintMismatch(changed)
                keep_bytes = offset
            elif kind == "task":
                pending.append(entry)
            elif kind == "batch":
                state.batches[entry["key"]] = entry["batch_id"]
                batch_lines.append((offset, raw.decode("utf-8") + "\n"))
            elif kind == "commit":
                state.tasks.extend(pending)
                pending = []
                state.rounds = entry.get("round", state.rounds + 1)
                state.last_commit = entry
                keep_bytes = offset
        if keep_bytes == 0:
            raise RecordError(self.path, "the journal has no header line; delete it to start over")
        return state, keep_bytes, [line for end, line in batch_lines if end > keep_bytes]

    def commit(self, tasks: list[dict[str, Any]], summary: dict[str, Any]) -> None:
        """Append a round's accepted tasks and its commit line, durably."""
        lines = [json.dumps({"kind": "task", **task}, ensure_ascii=False) for task in tasks]
        lines.append(json.dumps({"kind": "commit", **summary}, ensure_ascii=False))
        self._write_durably("\n".join(lines) + "\n")

    def record_batch(self, key: str, batch_id: str) -> None:
        """Note, durably and at once, a batch that was just sent (see the module docstring)."""
        line = {"kind": "batch", "key": key, "batch_id": batch_id}
        self._write_durably(json.dumps(line) + "\n")

    def _write_durably(self, text: str) -> None:
        assert self._handle is not None, "journal not open"
        self._handle.write(text)
        self._handle.flush()
        os.fsync(self._handle.fileno())

    def close(self) -> None:
        if self._handle is not None:
            self._handle.close()
            self._handle = None


_REQUIRED_FIELDS: dict[str, dict[str, tuple[type, ...]]] = {
    "header": {"fingerprint": (dict,)},
    "task": {},
    "batch": {"key": (str,), "batch_id": (str,)},
    "commit": {"round": (int,)},
}


def _parse_entry(
    path: Path, raw: bytes, line_no: int, task_problem: Callable[[dict[str, Any]], str | None]
) -> dict[str, Any]:
    """One complete journal line, checked for what resuming reads from it."""

    def refuse(reason: str) -> RecordError:
        return RecordError(
            path,
            f"{reason}; the journal was damaged or edited (a crash only tears the last line): "
            "repair or remove this line, or re-run with --overwrite to start over",
            line=line_no,
        )

    try:
        entry = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise refuse(f"not valid JSON ({exc})") from None
    if not isinstance(entry, dict):
        raise refuse(f"expected a JSON object, got {type(entry).__name__}")
    kind = entry.get("kind")
    if kind not in _REQUIRED_FIELDS:
        raise refuse(f"unknown entry kind {kind!r}")
    if (kind == "header") != (line_no == 1):
        raise refuse("the header must be the first line, and only the first")
    for name, types in _REQUIRED_FIELDS[kind].items():
        value = entry.get(name)
        if not isinstance(value, types) or isinstance(value, bool):
            raise refuse(f"a {kind} entry needs '{name}' ({types[0].__name__}), got {value!r}")
    problem = task_problem(entry) if kind == "task" else None
    if problem:
        raise refuse(problem)
    return entry


def generated_task_problem(entry: dict[str, Any]) -> str | None:
    """A generated task holds its instruction and instances (input, output) or a conversation
    (role, content): what the dataset is written from."""
    if not isinstance(entry.get("instruction"), str):
        return f"a task entry needs 'instruction' (str), got {entry.get('instruction')!r}"
    if "conversation" in entry:
        turns = entry["conversation"]
        if not isinstance(turns, list) or not all(
            isinstance(t, dict) and isinstance(t.get("role"), str) and isinstance(
                t.get("content"), str
            )
            for t in turns
        ):  # fmt: skip
            return "a task's 'conversation' must be a list of {role, content}"
        return None
    instances = entry.get("instances")
    if not isinstance(instances, list) or not all(
        isinstance(i, dict) and isinstance(i.get("input"), str) and isinstance(i.get("output"), str)
        for i in instances
    ):
        return "a task's 'instances' must be a list of {input, output} strings"
    return None


def _changed_settings(old: dict[str, Any], new: dict[str, Any], version: Any) -> str:
    """The settings whose value differs, each as `name: old -> new`; empty when none does."""
    names = set(old) | set(new)
    if version == 1:
        names = set(old) | {"eval_set_sha256_16"}  # settings it did not record are not compared
    missing = object()
    changed = sorted(k for k in names if old.get(k, missing) != new.get(k, missing))
    return ", ".join(f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in changed)
