"""A teacher's reasoning, kept apart from its answer. Pure.

Reasoning models think before they answer: OpenAI-compatible servers with a reasoning parser
(vLLM, SGLang, DeepSeek's API) return the thinking as `reasoning_content` beside the answer, and
raw completions carry it inline as `<think>…</think>`. Either way the thinking must not end up in
a record's `output` (a model trained on that would print its scratchpad); it goes to the record's
own `reasoning` field instead, so training can use it or drop it.
"""

from __future__ import annotations

import re

THINK_CLOSE = "</think>"
_OPEN = re.compile(r"^\s*<think>", re.IGNORECASE)


def split_reasoning(text: str) -> tuple[str, str]:
    """(reasoning, answer) of a reply. A reply whose template opened the think block in the prompt
    starts inside it, so a lone `</think>` also ends reasoning; a think block that never closes
    (cut off while thinking) leaves no answer."""
    opened = _OPEN.match(text)
    body = text[opened.end() :] if opened else text
    close = body.lower().find(THINK_CLOSE)
    if close >= 0:
        return body[:close].strip(), body[close + len(THINK_CLOSE) :].strip()
    if opened:
        return body.strip(), ""
    return "", text.strip()


def reasoning_and_answer(text: str, reasoning_content: str = "") -> tuple[str, str]:
    """The reasoning (from the API's field, else the text's think block) and the answer."""
    inline, answer = split_reasoning(text)
    return (reasoning_content.strip() or inline), answer
