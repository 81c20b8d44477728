"""The run journal: accepted tasks appended as JSONL, one fsynced commit per round.

Layout, one JSON object per line:

    {"kind": "header", "fingerprint": {...}}            what run this is (checked on resume)
    {"kind": "task", "instruction": ..., "instances": [...], ...}   accepted in this round
    {"kind": "commit", "round": r, "tasks": n, "drops": {...}, "teacher": {...}, ...}
    {"kind": "batch", "key": k, "batch_id": b}          a Batch API batch, journaled when sent

A round's task lines and its commit line are written with one `write`, then flushed and fsynced.
On open, everything after the last complete commit line (a round cut short by a crash, or half a
line) is cut off, so a resumed run sees exactly the rounds that were committed: nothing lost that
was committed, nothing counted twice. Batch lines are kept even after the last commit (they are
written back after the cut): a batch sent and paid for before a crash is polled on resume, not
sent again.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from corral.errors import RecordError

JOURNAL_VERSION = 1


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
    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        self._handle = None

    def open(self, fingerprint: dict[str, Any]) -> JournalState:
        """Start a new journal, or recover a committed one whose fingerprint matches."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        state = JournalState()
        if self.path.exists() and self.path.stat().st_size > 0:
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
        for raw in data.split(b"\n")[:-1]:  # the piece after the last newline is incomplete
            line_no += 1
            offset += len(raw) + 1
            try:
                entry = json.loads(raw)
            except json.JSONDecodeError:
                break  # a torn write: nothing after it was committed
            kind = entry.get("kind")
            if line_no == 1:
                if kind != "header":
                    raise RecordError(self.path, "not a Corral generation journal", line=1)
                if entry.get("fingerprint") != fingerprint:
                    raise FingerprintMismatch(
                        _describe_mismatch(entry.get("fingerprint"), fingerprint)
                    )
                keep_bytes = offset
            elif kind == "task":
                pending.append(entry)
            elif kind == "batch":
                state.batches[entry["key"]] = entry["batch_id"]
                batch_lines.append((offset, raw.decode("utf-8") + "\n"))
            elif kind == "commit":
                state.tasks.extend(pending)
                pending = []
                state.rounds = int(entry.get("round", state.rounds + 1))
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


def _describe_mismatch(old: Any, new: dict[str, Any]) -> str:
    if not isinstance(old, dict):
        return "the journal's header is not readable"
    changed = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
    return ", ".join(f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in changed[:4])
