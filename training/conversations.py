"""Multi-turn supervised tuning data: conversations -> token ids with loss on every answer.

Vicuna and Guanaco trained on whole conversations (ShareGPT, OASST1) with the loss on every
assistant turn, not only the last. A conversation is cut into pieces by its template
(`PromptTemplate.conversation_segments`, or the tokenizer's own chat template rendered turn by
turn); each piece is tokenized on its own and the ids concatenated, so the boundary between what
the model is shown and what it must learn to write is exact for every tokenizer. Answers and their
end markers are trained; system and user turns, and everything the template adds around them, are
not. Pure Python over token ids, like training/data.py.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from corral.training.data import IGNORE_INDEX, TokenizationReport, TokenizedExample, tokenize_each

from corral.templates import PromptTemplate, chat_conversation_segments


def conversation_pieces(
    tokenizer: Any, template: PromptTemplate, messages: Sequence[dict[str, str]]
) -> list[tuple[str, bool]]:
    """(text, trained) pieces of a conversation in the run's template."""
    if template.name == "chat":
        return chat_conversation_segments(tokenizer, template, messages)
    return template.conversation_segments(messages)


def tokenize_conversation(
    messages: Sequence[dict[str, str]],
    index: int,
    tokenizer: Any,
    template: PromptTemplate,
    *,
    max_length: int,
    truncation: str = "drop",
) -> tuple[TokenizedExample | None, str]:
    """One conversation as an example; ("kept" | "truncated" | "too_long") like tokenize_record.

    With truncation=truncate, a conversation longer than max_length keeps its first max_length
    tokens (turns that do not fit are lost; the cut turn is trained up to the cut), as long as at
    least one answer token remains.
    """
    input_ids: list[int] = []
    labels: list[int] = []
    # Instruction templates start with the tokenizer's usual special tokens (BOS), like a
    # single-turn prompt; a chat template renders its own.
    if template.name != "chat":
        input_ids = list(tokenizer("", add_special_tokens=True)["input_ids"])
        labels = [IGNORE_INDEX] * len(input_ids)
    eos_id = getattr(tokenizer, "eos_token_id", None)
    for text, trained in conversation_pieces(tokenizer, template, messages):
        ids = list(tokenizer(text, add_special_tokens=False)["input_ids"])
        if (
            trained
            and template.end_marker == getattr(tokenizer, "eos_token", None)
            and eos_id is not None
            and (not ids or ids[-1] != eos_id)
        ):
            ids.append(eos_id)  # a tokenizer that does not parse special-token text: stop is real
        input_ids += ids
        labels += ids if trained else [IGNORE_INDEX] * len(ids)
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
    """Tokenize every conversation; raise RecordError when none fits `max_length`."""
    return tokenize_each(
        conversations,
        lambda conversation, index: tokenize_conversation(
            conversation["messages"],
            index,
            tokenizer,
            template,
            max_length=max_length,
            truncation=truncation,
        ),
        unit="conversation",
        field_name="messages",
        max_length=max_length,
        truncation=truncation,
        source=source,
    )
