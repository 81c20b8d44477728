"""Dolly-style response extraction and the text side of streaming: pure, no torch, no transformers.

A template's prompt ends right after its response marker, so the answer starts at the first
generated token; it ends at the first end marker the model produces. Markers are matched on the
token ids actually generated when they are single tokens (a special `<|im_end|>`, `</s>`), and by a
text search of the decoded generation otherwise (`### End` is two tokens and tokenizes differently
after a newline than on its own). Only the generated part is ever searched: the user's instruction
may itself contain `### Response:` or `### End`, and the prompt is never returned.

`decode` is any callable from token ids to text (a tokenizer's `decode` with special tokens kept),
which keeps this module testable with a toy vocabulary.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

Decode = Callable[[Sequence[int]], str]

# A partial UTF-8 character decodes to the replacement character until its last byte arrives.
_INCOMPLETE_CHARACTER = "\ufffd"


@dataclass(frozen=True)
class ResponseMarkers:
    """The strings that delimit an answer, with their token ids when each is a single token."""

    response_marker: str
    end_marker: str
    response_marker_id: int | None = None
    end_marker_id: int | None = None


@dataclass(frozen=True)
class ExtractedResponse:
    """An answer cut out of a generation, with what was (not) found on the way."""

    text: str
    end_marker_found: bool
    response_marker_found: bool

    @property
    def finish_reason(self) -> str:
        """`stop` when the model closed its answer with the end marker, else `length`."""
        return "stop" if self.end_marker_found else "length"


def extract_response(
    generated_ids: Sequence[int],
    decode: Decode,
    markers: ResponseMarkers,
    *,
    prompt_ends_with_response_marker: bool = True,
    stop: Sequence[str] = (),
) -> ExtractedResponse:
    """The answer in `generated_ids` (the new tokens only, never the prompt).

    With `prompt_ends_with_response_marker` (every template prompt) the answer starts at the first
    generated token; otherwise it starts after the first response marker the model generates, and
    when the model generates none the whole generation is returned with `response_marker_found`
    False. The answer ends before the first end marker; without one (a length stop) it is the text
    generated so far. `stop` strings cut the answer too. Surrounding whitespace is stripped.
    """
    ids = list(generated_ids)
    response_found = prompt_ends_with_response_marker
    start = 0
    if not response_found and markers.response_marker_id is not None:
        if markers.response_marker_id in ids:
            start = ids.index(markers.response_marker_id) + 1
            response_found = True
    ids = ids[start:]

    end_found = False
    if markers.end_marker_id is not None and markers.end_marker_id in ids:
        ids = ids[: ids.index(markers.end_marker_id)]
        end_found = True
    text = decode(ids)

    if not response_found and markers.response_marker:
        # The marker is not one token: look for its text in what the model wrote.
        position = text.find(markers.response_marker)
        if position >= 0:
            text = text[position + len(markers.response_marker) :]
            response_found = True
    if not end_found and markers.end_marker:
        position = text.find(markers.end_marker)
        if position >= 0:
            text = text[:position]
            end_found = True
    text, stopped = cut_at_stop_strings(text, stop)
    return ExtractedResponse(
        text=text.strip(),
        end_marker_found=end_found or stopped,
        response_marker_found=response_found,
    )


def cut_at_stop_strings(text: str, stop: Sequence[str]) -> tuple[str, bool]:
    """`text` before the first stop string to be completed, and whether one was.

    "First completed" (the earliest end, the longer stop on a tie), not "first to start": a
    generation stops as soon as a stop string is complete, so with stops `a` and `XaX` the text
    `XaX` stops at `a`, however the text arrived (whole, or a character at a time).
    """
    best: tuple[int, int] | None = None  # (end, start) of the stop that completes first
    for s in stop:
        if not s:
            continue
        start = text.find(s)
        if start >= 0:
            candidate = (start + len(s), start)
            if best is None or candidate < best:
                best = candidate
    if best is None:
        return text, False
    return text[: best[1]], True


class IncrementalDetokenizer:
    """Turns a stream of token ids into text deltas whose concatenation is the decoded text.

    Decoding token by token breaks words whose bytes span tokens and drops the spaces some
    tokenizers attach to the next token, so each step decodes a short window that starts a few
    tokens back and emits only what that window adds, holding back an incomplete character.
    """

    def __init__(self, decode: Decode) -> None:
        self._decode = decode
        self._ids: list[int] = []
        self._prefix_offset = 0  # the window starts here
        self._read_offset = 0  # text up to here has been emitted

    def push(self, token_id: int) -> str:
        """Add one token; return the new text it completes (possibly empty)."""
        self._ids.append(token_id)
        emitted = self._decode(self._ids[self._prefix_offset : self._read_offset])
        window = self._decode(self._ids[self._prefix_offset :])
        if len(window) > len(emitted) and not window.endswith(_INCOMPLETE_CHARACTER):
            self._prefix_offset = self._read_offset
            self._read_offset = len(self._ids)
            return window[len(emitted) :]
        return ""

    def flush(self) -> str:
        """Whatever is still held back when the stream ends."""
        emitted = self._decode(self._ids[self._prefix_offset : self._read_offset])
        window = self._decode(self._ids[self._prefix_offset :])
        self._prefix_offset = self._read_offset = len(self._ids)
        return window[len(emitted) :] if len(window) > len(emitted) else ""


class StopStringMatcher:
    """Streams text while watching for stop strings, which may arrive split across deltas.

    Text that could still be the beginning of a stop string is held back until it is known not to
    be, so a client never receives part of a stop sequence.
    """

    def __init__(self, stop: Sequence[str]) -> None:
        self._stop = tuple(s for s in stop if s)
        self._held = ""
        self.stopped = False

    def push(self, delta: str) -> str:
        """Add generated text; return the part that is safe to emit. Sets `stopped` on a match."""
        if self.stopped:
            return ""
        if not self._stop:
            return delta
        buffer = self._held + delta
        text, found = cut_at_stop_strings(buffer, self._stop)
        if found:
            self._held = ""
            self.stopped = True
            return text
        hold = _longest_partial_stop(buffer, self._stop)
        self._held = buffer[len(buffer) - hold :] if hold else ""
        return buffer[: len(buffer) - hold]

    def flush(self) -> str:
        """The held-back text, once the generation has ended without a stop string."""
        held, self._held = self._held, ""
        return "" if self.stopped else held


def _longest_partial_stop(text: str, stop: Sequence[str]) -> int:
    """Length of the longest suffix of `text` that is a proper prefix of a stop string."""
    best = 0
    for s in stop:
        for length in range(min(len(s) - 1, len(text)), best, -1):
            if text.endswith(s[:length]):
                best = length
                break
    return best
