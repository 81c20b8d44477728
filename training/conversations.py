"""Multi-turn supervised tuning data: conversations -> token ids with loss on every answer.

Vicuna and Guanaco trained on whole conversations (ShareGPT, OASST1) with the loss on every
assistant turn, not only the last. A conversation is cut into pieces by its template
(`PromptTemplate.conversation_segments`, or the tokenizer's own chat template rendered turn by
turn). Its ids are built by `corral.served_tokens.tokenize_turns` from the prompts Corral serves:
the prompt for each answer is rendered and encoded whole, exactly as `chat`, `serve` and `infer`
send it, so the served prompt for turn k is the training ids up to that answer, token for token.
Answers and their end markers are trained; system and user turns, and everything the template adds
around them, are not. Where a tokenizer merges across an answer's boundary, so that no ids can be
both, the conversation is still trained and the departure is counted in the report.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from corral.training.data import IGNORE_INDEX, TokenizationReport, TokenizedExample, tokenize_each

from corral.served_tokens import ServedDeparture, render_conversation, tokenize_turns
from corral.templates import PromptTemplate, chat_conversation_segments


def conversation_pieces(
    tokenizer: Any, template: PromptTemplate, messages: Sequence[dict[str, str]]
) -> list[tuple[str, bool]]:
    """(text, trained) pieces of a conversation in the run's template."""
    if template.name == "chat":
        return chat_conversation_segments(tokenizer, template, messages)
    return template.conversation_segments(messages)


def conversation_turns(
    tokenizer: Any, template: PromptTemplate, messages: Sequence[dict[str, str]]
) -> tuple[list[tuple[str, str]], str]:
    """([(served prompt, answer and end marker), ...], text after the last answer).

    Each prompt is what the server renders for the conversation up to that answer; the pieces
    must agree with it (they come from the same template), or the template is refused.
    """
    answered = [
        position
        for position, message in enumerate(messages)
        if message["role"] == "assistant"
        and position > 0
        and messages[position - 1]["role"] == "user"
    ]
    turns: list[tuple[str, str]] = []
    text = ""
    for piece, trained in conversation_pieces(tokenizer, template, messages):
        if trained:
            prompt = render_conversation(tokenizer, template, messages[: answered[len(turns)]])
            if prompt != text:
                raise ValueError(
                    f"template {template.name!r} renders a conversation's turns differently from "
                    "the prompt it serves for them; it cannot be trained turn by turn"
                )
            turns.append((prompt, piece))
        text += piece
    tail = text[len(turns[-1][0]) + len(turns[-1][1]) :] if turns else text
    return turns, tail


def tokenize_conversation(
    messages: Sequence[dict[str, str]],
    index: int,
    tokenizer: Any,
    template: PromptTemplate,
    *,
    max_length: int,
    truncation: str = "drop",
    departures: list[ServedDeparture] | None = None,
) -> tuple[TokenizedExample | None, str]:
    """One conversation as an example; ("kept" | "truncated" | "too_long") like tokenize_record.

    With truncation=truncate, a conversation longer than max_length keeps its first max_length
    tokens (turns that do not fit are lost; the cut turn is trained up to the cut), as long as at
    least one answer token remains. Where a served prompt departs from the ids trained on, the
    departure is added to `departures` when given.
    """
    turns, tail = conversation_turns(tokenizer, template, messages)
    built = tokenize_turns(tokenizer, template, turns, tail)
    if departures is not None:
        departures += built.departures
    input_ids = built.input_ids
    labels = [
        token if trained else IGNORE_INDEX
        for token, trained in zip(built.input_ids, built.trained, strict=True)
    ]
    status = "kept"
    if len(input_ids) > max_length:
        trained_in_window = any(label != IGNORE_INDEX for label in labels[1:max_length])
        if truncation != "truncate" or not trained_in_window:
            return None, "too_long"
        input_ids, labels = input_ids[:max_length], labels[:max_length]
        status = "truncated"
    return TokenizedExample(input_ids=input_ids, labels=labels, index=index), status


def tokenize_conversations(
    conversations: Sequence[dict[str, Any]],
    tokenizer: Any,
    template: PromptTemplate,
    *,
    max_length: int,
    truncation: str = "drop",
    source: str = "data",
) -> tuple[list[TokenizedExample], TokenizationReport]:
    """Tokenize every conversation; raise RecordError when none fits `max_length`.

    The report counts the conversations whose served prompts depart from their training ids and
    describes the first departure, so the run says it once when it starts.
    """
    departed: list[int] = []
    first: list[ServedDeparture] = []

    def tokenize_one(conversation: dict[str, Any], index: int) -> tuple[Any, str]:
        found: list[ServedDeparture] = []
        result = tokenize_conversation(
            conversation["messages"],
            index,
            tokenizer,
            template,
            max_length=max_length,
            truncation=truncation,
            departures=found,
        )
        if found:
            departed.append(index)
            first[:] = first or found[:1]
        return result

    examples, report = tokenize_each(
        conversations,
        tokenize_one,
        unit="conversation",
        field_name="messages",
        max_length=max_length,
        truncation=truncation,
        source=source,
    )
    if departed:
        report.served_departures = len(departed)
        report.departure = f"conversation {departed[0]}: {first[0].describe(template.name)}"
    return examples, report
