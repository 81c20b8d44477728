"""Parse teacher completions back into tasks and instances. Pure functions over strings.

Completion models continue the prompt, so their text starts in the middle of the open item
(`4. Instruction:` was the prompt's last line). Chat models often restart the list, add prose
around it, or decorate markers with Markdown (`**4. Instruction:**`). Each parser accepts both:
text before the first marker counts as the open item only when it looks like one (a single line
not ending in a colon), otherwise it is prose and ignored.

When the teacher stopped because it ran out of tokens (`finish_reason == "length"`), the last item
is cut short and is dropped; the parsers report how many items they dropped and why.
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass, field

from corral.data_gen.prompts import NO_INPUT

# Drop reasons the parsers report (filters.py reports the rest).
TRUNCATED = "truncated"
INCOMPLETE = "incomplete"
UNPARSEABLE = "unparseable"

_DECORATION = r"[ \t#*>_`-]*"
_ALPACA_MARKER = re.compile(
    rf"(?im)^{_DECORATION}(\d+)\s*[.)]\s*\**\s*(instruction|input|output)\s*\**\s*:\**"
)
_TASK_MARKER = re.compile(r"(?im)^[ \t#*>_`-]*task\s*(\d+)\s*\**\s*[:.)]\**")
_EXAMPLE_MARKER = re.compile(r"(?im)^[ \t#*>_`-]*example\s*\d+\s*\**\s*:?\**[ \t]*$")
_FIELD_MARKER = re.compile(r"(?im)^[ \t#*>_`-]*(input|output|class label)\s*\**\s*:\**")
_NO_INPUT_VALUES = {NO_INPUT.lower(), "<no input>", "no input", "noinput", "none", "n/a", ""}


@dataclass
class ParseResult:
    """What a completion held, and how many items were dropped by reason."""

    items: list[dict[str, str]] = field(default_factory=list)
    drops: Counter = field(default_factory=Counter)


def clean_field(text: str) -> str:
    """Strip a field: whitespace, a trailing `###` separator, stray Markdown emphasis."""
    text = text.strip()
    while text.endswith("###"):
        text = text[:-3].rstrip()
    text = text.strip("*").strip()
    return text


def clean_input(text: str) -> str:
    text = clean_field(text)
    return "" if text.lower() in _NO_INPUT_VALUES else text


def _looks_like_open_item(prefix: str) -> bool:
    prefix = prefix.strip()
    return bool(prefix) and "\n" not in prefix and not prefix.endswith(":")


def parse_alpaca_tasks(completion: str, finish_reason: str = "stop") -> ParseResult:
    """Split an Alpaca-mode completion into {instruction, input, output} records."""
    result = ParseResult()
    markers = list(_ALPACA_MARKER.finditer(completion))
    prefix = completion[: markers[0].start()] if markers else completion
    # (kind, start of text, end of text) per field, in order.
    fields: list[tuple[str, int, int]] = []
    if not markers:
        result.drops[UNPARSEABLE] += 1
        return result
    # Text before the first marker is the open item's instruction when an Input/Output marker
    # follows it (a continuation); before an Instruction marker it is a chat model's preamble.
    if prefix.strip() and markers[0].group(2).lower() != "instruction":
        fields.append(("instruction", 0, markers[0].start()))
    for i, marker in enumerate(markers):
        end = markers[i + 1].start() if i + 1 < len(markers) else len(completion)
        fields.append((marker.group(2).lower(), marker.end(), end))

    items: list[dict[str, str]] = []
    current: dict[str, str] | None = None
    for kind, start, end in fields:
        value = completion[start:end]
        if kind == "instruction":
            current = {"instruction": clean_field(value)}
            items.append(current)
        elif current is not None and kind not in current:
            current[kind] = value
    if not items:
        result.drops[UNPARSEABLE] += 1
        return result
    if finish_reason == "length":
        items.pop()
        result.drops[TRUNCATED] += 1
    for item in items:
        if not item.get("instruction") or "output" not in item or not clean_field(item["output"]):
            result.drops[INCOMPLETE] += 1
            continue
        result.items.append(
            {
                "instruction": item["instruction"],
                "input": clean_input(item.get("input", "")),
                "output": clean_field(item["output"]),
            }
        )
    return result


def parse_bootstrap_instructions(completion: str, finish_reason: str = "stop") -> ParseResult:
    """Split a Self-Instruct bootstrap completion (`Task N:` lines) into instructions."""
    result = ParseResult()
    markers = list(_TASK_MARKER.finditer(completion))
    prefix = completion[: markers[0].start()] if markers else completion
    chunks = []
    if _looks_like_open_item(prefix) or (not markers and prefix.strip()):
        chunks.append(prefix)
    for i, marker in enumerate(markers):
        end = markers[i + 1].start() if i + 1 < len(markers) else len(completion)
        chunks.append(completion[marker.end() : end])
    instructions = [" ".join(clean_field(c).split()) for c in chunks]
    instructions = [text for text in instructions if text]
    if not instructions:
        result.drops[UNPARSEABLE] += 1
        return result
    if finish_reason == "length":
        instructions.pop()
        result.drops[TRUNCATED] += 1
    result.items = [{"instruction": text} for text in instructions]
    return result


def parse_classification_answer(completion: str) -> bool | None:
    """Yes -> True, No -> False, anything else -> None (the caller picks a default)."""
    match = re.search(r"[A-Za-z]+", completion)
    if not match:
        return None
    word = match.group(0).lower()
    if word in ("yes", "true"):
        return True
    if word in ("no", "false"):
        return False
    return None


def _split_fields(block: str) -> dict[str, str]:
    """`Input:` / `Output:` / `Class label:` fields of one example block (first of each kept)."""
    found: dict[str, str] = {}
    markers = list(_FIELD_MARKER.finditer(block))
    for i, marker in enumerate(markers):
        end = markers[i + 1].start() if i + 1 < len(markers) else len(block)
        found.setdefault(marker.group(1).lower(), block[marker.end() : end])
    return found


def parse_instances(
    completion: str, *, is_classification: bool, finish_reason: str = "stop"
) -> ParseResult:
    """Instances of one task, as {input, output}; output-first text for classification."""
    result = ParseResult()
    if is_classification:
        text = completion
        if not re.match(r"(?is)^\s*[#*]*\s*class label\s*:", text):
            text = "Class label:" + text
        starts = [m.start() for m in re.finditer(r"(?im)^[ \t#*>_`-]*class label\s*\**\s*:", text)]
        blocks = [
            text[s : (starts[i + 1] if i + 1 < len(starts) else len(text))]
            for i, s in enumerate(starts)
        ]
    else:
        text = completion
        if not _EXAMPLE_MARKER.match(text.lstrip("\n")) and not re.match(
            r"(?is)^\s*[#*]*\s*input\s*:", text
        ):
            text = "Input:" + text
        starts = [m.start() for m in _EXAMPLE_MARKER.finditer(text)]
        if not starts or text[: starts[0]].strip():
            starts.insert(0, 0)
        blocks = [
            text[s : (starts[i + 1] if i + 1 < len(starts) else len(text))]
            for i, s in enumerate(starts)
        ]
    instances = []
    for block in blocks:
        fields = _split_fields(block)
        output_key = "class label" if is_classification else "output"
        if output_key not in fields:
            if block.strip() and _EXAMPLE_MARKER.sub("", block).strip():
                instances.append(None)  # a started but incomplete example
            continue
        output = clean_field(fields[output_key])
        instances.append({"input": clean_input(fields.get("input", "")), "output": output})
    if not instances:
        result.drops[UNPARSEABLE] += 1
        return result
    if finish_reason == "length":
        instances.pop()
        result.drops[TRUNCATED] += 1
    for inst in instances:
        if inst is None or not inst["output"]:
            result.drops[INCOMPLETE] += 1
        else:
            result.items.append(inst)
    return result


_SPEAKER_LABEL = re.compile(r"(?im)^[ \t*_]*(user|assistant)[ \t*_]*:")


def parse_turn(completion: str, finish_reason: str = "stop") -> str | None:
    """One conversation turn the teacher wrote (self-chat), or None when it is unusable.

    A leading speaker label is dropped and anything from the next label on (the teacher going on
    to write the other side) is cut; a turn cut off by the length limit, or of fewer than two
    words, is unusable.
    """
    text = completion.strip()
    label = _SPEAKER_LABEL.match(text)
    if label:
        text = text[label.end() :].strip()
    following = _SPEAKER_LABEL.search(text)
    if following:
        text = text[: following.start()].strip()
        finish_reason = "stop"  # the turn itself was complete
    if finish_reason == "length" or len(text.split()) < 2:
        return None
    return text
