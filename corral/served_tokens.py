"""The token ids Corral serves and the token ids it trains on, built by one function.

`chat`, `serve` and `infer` prompt a model with `served_prompt_ids`: the conversation so far
rendered in the run's template (`render_conversation`) and encoded whole (`encode_prompt`).
Training builds its examples from exactly those prompts (`tokenize_turns`): for each answer, the
prompt served for it is encoded the same way, the ids already laid down must be its beginning, and
what it adds is appended untrained; then the answer and its end marker are appended, trained. So
the prompt served for turn k is the training ids up to that turn's answer, token for token, and
untrained text is never cut where the server does not cut it (a system block and the first user
turn, the blank line after an answer and the next turn, are one string to the tokenizer).

What this cannot give by construction is a merge across a trained boundary: when the tokenizer
joins the end of an answer with the text after it (or splits an answer differently alone than in
context), the next served prompt re-encodes the answer differently from the ids trained on. Then
the untrained text is appended on its own and the departure is recorded (`ServedDeparture`), so a
run can say which template and which boundary, once, when it starts.

The price: a conversation with n answers encodes n growing prefixes instead of its text once.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from corral.templates import PromptTemplate, encode_prompt


def render_conversation(
    tokenizer: Any, template: PromptTemplate, messages: Sequence[dict[str, str]]
) -> str:
    """The prompt for a conversation that ends with a user message, in the run's template.

    With `chat` the tokenizer's own chat template renders every turn; instruction templates replay
    earlier turns in their own format (`PromptTemplate.format_conversation`).
    """
    if not messages or messages[-1].get("role") != "user":
        raise ValueError("the last message must come from the user")
    if template.name == "chat":
        return tokenizer.apply_chat_template(
            list(messages), tokenize=False, add_generation_prompt=True
        )
    return template.format_conversation(messages)


def served_prompt_ids(
    tokenizer: Any, template: PromptTemplate, messages: Sequence[dict[str, str]]
) -> list[int]:
    """The token ids Corral sends the model for a conversation ending with a user message."""
    return encode_prompt(tokenizer, template, render_conversation(tokenizer, template, messages))


def encode_answer(tokenizer: Any, template: PromptTemplate, text: str) -> list[int]:
    """Token ids of an answer and its end marker; EOS is guaranteed last when EOS is the marker."""
    ids = list(tokenizer(text, add_special_tokens=False)["input_ids"])
    eos_id = getattr(tokenizer, "eos_token_id", None)
    if template.end_marker == getattr(tokenizer, "eos_token", None) and eos_id is not None:
        # Some tokenizers do not parse special-token text inside a string: make the stop real.
        if not ids or ids[-1] != eos_id:
            ids.append(eos_id)
    return ids


@dataclass(frozen=True)
class ServedDeparture:
    """Where the prompt served for a turn is not a prefix of the ids trained on."""

    turn: int  # which turn's prompt (0-based; one past the last answer: the text after it)
    position: int  # the first id where trained and served differ
    boundary: str  # which boundary the tokenizer merged across, in words
    trained: tuple[str, ...]  # the trained tokens from there (a few)
    served: tuple[str, ...]  # the served tokens from there

    def describe(self, template_name: str) -> str:
        return (
            f"template {template_name!r}: the prompt served for turn {self.turn + 1} departs "
            f"from the trained ids at token {self.position}, {self.boundary} (trained "
            f"{list(self.trained)}, served {list(self.served)})"
        )


@dataclass
class TrainedTokens:
    """Ids of a whole training sequence, which of them are trained, and where each answer starts."""

    input_ids: list[int] = field(default_factory=list)
    trained: list[bool] = field(default_factory=list)
    answer_starts: list[int] = field(default_factory=list)  # = length of each served prompt
    answer_ends: list[int] = field(default_factory=list)  # one past each answer's end marker
    departures: list[ServedDeparture] = field(default_factory=list)


def _tokens(tokenizer: Any, ids: Sequence[int]) -> tuple[str, ...]:
    return tuple(tokenizer.convert_ids_to_tokens(list(ids)))


def _boundary(built: TrainedTokens, position: int) -> str:
    """The trained/untrained boundary nearest a departure, in words."""
    for number, (start, end) in enumerate(zip(built.answer_starts, built.answer_ends, strict=True)):
        if position <= start:
            return (
                f"where answer {number + 1} begins (the end of the prompt before it and the "
                "answer's first characters tokenize together in the whole text)"
            )
        if position <= end:
            return (
                f"in answer {number + 1} or where it ends (the answer tokenizes differently "
                "alone than in the whole text, or its end merges with what follows)"
            )
    return "after the last answer"


def tokenize_turns(
    tokenizer: Any,
    template: PromptTemplate,
    turns: Sequence[tuple[str, str]],
    tail: str = "",
) -> TrainedTokens:
    """A training sequence from (served prompt, answer) turns, the prompts encoded as served.

    Each turn's prompt is the whole rendered text the server would send for it, so it starts with
    the previous turn's prompt and answer; the answer is the completion trained after it (answer
    and end marker). `tail` is untrained text the rendering puts after the last answer (what a
    chat template writes after its end marker).
    """
    built = TrainedTokens()
    text = ""  # the rendered text laid down so far

    def lay_down_untrained(rendered: str, turn: int) -> None:
        if not rendered.startswith(text):
            raise ValueError(
                f"template {template.name!r}: a later prompt does not start with the earlier turns "
                "as they were rendered; this template cannot be trained turn by turn"
            )
        served = encode_prompt(tokenizer, template, rendered)
        done = len(built.input_ids)
        if served[:done] == built.input_ids:
            new = served[done:]
        else:
            differ = next(
                (
                    i
                    for i, (a, b) in enumerate(zip(served, built.input_ids, strict=False))
                    if a != b
                ),
                min(len(served), done),
            )
            built.departures.append(
                ServedDeparture(
                    turn=turn,
                    position=differ,
                    boundary=_boundary(built, differ),
                    trained=_tokens(tokenizer, built.input_ids[differ : differ + 3]),
                    served=_tokens(tokenizer, served[differ : differ + 3]),
                )
            )
            # The untrained text on its own, as one string: the ids trained on stay consistent.
            new = list(tokenizer(rendered[len(text) :], add_special_tokens=False)["input_ids"])
        built.input_ids += new
        built.trained += [False] * len(new)

    for number, (prompt, answer) in enumerate(turns):
        lay_down_untrained(prompt, number)
        built.answer_starts.append(len(built.input_ids))
        answer_ids = encode_answer(tokenizer, template, answer)
        built.input_ids += answer_ids
        built.trained += [True] * len(answer_ids)
        built.answer_ends.append(len(built.input_ids))
        text = prompt + answer
    if tail:
        lay_down_untrained(text + tail, len(turns))
    return built
