"""Quality filters on generated tasks, each drop with a named reason. Pure: no I/O, no frameworks.

The rules are the ones Stanford Alpaca and Self-Instruct applied (see FIELD_NOTES): instruction
length in words, a whole-word blocklist of things a text model cannot do, bad starts, and for
instances exact duplicates and conflicts (same input, different outputs). The ROUGE-L novelty
filter lives in rouge.py because it keeps state.
"""

from __future__ import annotations

import re
import string
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

# Drop reasons, as they appear in progress bars, summaries and manifests.
TOO_SHORT = "too_short"
TOO_LONG = "too_long"
BLOCKLISTED = "blocklisted"
WRITE_A_PROGRAM = "starts_with_write_a_program"
STARTS_WITH_PUNCTUATION = "starts_with_punctuation"
STARTS_NON_ASCII = "starts_with_non_ascii"
NOT_NOVEL = "not_novel"
CONTAMINATED = "contaminated"  # near an evaluation item, or shares a 13-gram with one
EMPTY_OUTPUT = "empty_output"
DUPLICATE_INSTANCE = "duplicate_instance"
CONFLICTING_INSTANCES = "conflicting_instances"
NO_VALID_INSTANCES = "no_valid_instances"
REQUEST_FAILED = "request_failed"
UNUSABLE_TURN = "unusable_turn"  # conversations: a follow-up or its answer was empty or cut off
OVER_TARGET = "over_target"  # not a quality drop: accepted after the target count was reached

DEFAULT_BLOCKLIST = (
    "image",
    "images",
    "graph",
    "graphs",
    "picture",
    "pictures",
    "file",
    "files",
    "map",
    "maps",
    "draw",
    "plot",
    "go to",
    "video",
    "audio",
    "music",
    "flowchart",
    "diagram",
)


@dataclass(frozen=True)
class InstructionRules:
    """Which instructions to keep before the novelty check."""

    min_words: int = 4
    max_words: int = 150
    blocklist: Sequence[str] = DEFAULT_BLOCKLIST

    def __post_init__(self) -> None:
        words = [re.escape(w.strip()) for w in self.blocklist if w.strip()]
        pattern = re.compile(rf"\b(?:{'|'.join(words)})\b", re.IGNORECASE) if words else None
        object.__setattr__(self, "_blocklist_re", pattern)

    def drop_reason(self, instruction: str) -> str | None:
        """Why this instruction is dropped, or None to keep it."""
        text = instruction.strip()
        words = len(text.split())
        if words < self.min_words:
            return TOO_SHORT
        if words > self.max_words:
            return TOO_LONG
        if self._blocklist_re is not None and self._blocklist_re.search(text):  # type: ignore[attr-defined]
            return BLOCKLISTED
        if text.lower().startswith("write a program"):
            return WRITE_A_PROGRAM
        if text[0] in string.punctuation:
            return STARTS_WITH_PUNCTUATION
        if not text[0].isascii():
            return STARTS_NON_ASCII
        return None


def filter_instances(instances: Iterable[dict[str, str]]) -> tuple[list[dict[str, str]], Counter]:
    """Drop empty outputs, exact duplicates, and instances whose input has conflicting outputs."""
    drops: Counter = Counter()
    unique: list[dict[str, str]] = []
    seen: set[tuple[str, str]] = set()
    for inst in instances:
        key = (inst["input"].strip(), inst["output"].strip())
        if not key[1]:
            drops[EMPTY_OUTPUT] += 1
        elif key in seen:
            drops[DUPLICATE_INSTANCE] += 1
        else:
            seen.add(key)
            unique.append(inst)
    outputs_by_input: dict[str, set[str]] = {}
    for inst in unique:
        outputs_by_input.setdefault(inst["input"].strip(), set()).add(inst["output"].strip())
    kept = []
    kept_without_input = False
    for inst in unique:
        key = inst["input"].strip()
        if not key:
            # A task without input has one answer; its extra answers are not a conflict about
            # the input, so the first is kept rather than losing the task.
            if kept_without_input:
                drops[CONFLICTING_INSTANCES] += 1
            else:
                kept_without_input = True
                kept.append(inst)
        elif len(outputs_by_input[key]) > 1:
            drops[CONFLICTING_INSTANCES] += 1
        else:
            kept.append(inst)
    return kept, drops
