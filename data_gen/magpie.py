"""Magpie: the teacher writes the user's turn itself. Pure: template splitting, parsing, filters.

An aligned chat model, given only its chat template's text up to where a user's message starts
(the pre-query prefix: BOS, a system turn, the user header), continues with a plausible user
message, because that is what follows the header in everything it was tuned on. Corral then asks
the same model to answer it. The prefix is derived from the teacher's own chat template: render a
conversation whose last user message is a sentinel and cut before the sentinel. A template that
does not reproduce the message verbatim, puts nothing before it, or makes the text before it
depend on the message cannot be split, and the run is refused with the reason.

The filters follow what Magpie's authors filtered on (length, repetitive text, a "question" that is
really an assistant's reply or not a request at all, the language); each drop has a named reason.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from corral.errors import UsageError

# Drop reasons (manifest names), beside those of filters.py.
QUERY_CUT_OFF = "query_cut_off"  # the user turn hit the token limit
ANSWER_CUT_OFF = "answer_cut_off"
REPETITIVE = "repetitive"
NOT_A_REQUEST = "not_a_request"
OTHER_LANGUAGE = "other_language"

# Two distinct plain-ASCII sentinels: templates that trim or escape content leave them intact.
_SENTINELS = ("CorralSentinelQueryAlpha", "CorralSentinelQueryBravo")

Render = Callable[[list[dict[str, str]], bool], str]


class TemplateSplitError(UsageError):
    """The teacher's chat template gives no pre-query prefix; the message says why."""


@dataclass(frozen=True)
class PreQuery:
    """The text that opens a user's turn, and the strings that close it."""

    prefix: str
    stops: tuple[str, ...]


def pre_query(render: Render, history: Sequence[dict[str, str]] = (), *, who: str = "") -> PreQuery:
    """Split the chat template (`render(messages, add_generation_prompt)`) before a new user turn
    that follows `history` (a system message and/or earlier turns). `who` names the template in
    errors. Raises TemplateSplitError when the template cannot be split."""
    who = who or "the teacher's chat template"
    renders = []
    for sentinel in _SENTINELS:
        messages = [*history, {"role": "user", "content": sentinel}]
        try:
            closed = render(messages, False)
            opened = render(messages, True)
        except Exception as exc:  # jinja's raise_exception, a missing template, ...
            roles = "/".join(m["role"] for m in messages)
            raise TemplateSplitError(
                f"{who} refuses the conversation {roles} ({one_line(exc)})"
                + (
                    "; run without system_prompt"
                    if any(m["role"] == "system" for m in history)
                    else ""
                )
            ) from None
        if closed.count(sentinel) != 1 or opened.count(sentinel) != 1:
            raise TemplateSplitError(
                f"{who} does not reproduce the user's message verbatim (once), so the text before "
                "it cannot be cut out"
            )
        renders.append((sentinel, closed, opened))
    (sent_a, closed_a, opened_a), (sent_b, closed_b, _) = renders
    prefix = closed_a[: closed_a.index(sent_a)]
    if prefix != closed_b[: closed_b.index(sent_b)]:
        raise TemplateSplitError(
            f"{who} writes different text before different user messages, so there is no fixed "
            "pre-query prefix"
        )
    if not prefix.strip():
        raise TemplateSplitError(
            f"{who} puts nothing before the user's message (no role header), so nothing tells the "
            "model that a user's turn starts"
        )
    closing = closed_a[closed_a.index(sent_a) + len(sent_a) :]
    header = opened_a[opened_a.index(sent_a) + len(sent_a) :]
    stops = []
    for text in (closing.strip(), header.strip(), header.strip().split("\n")[0].strip()):
        if text and text not in stops:
            stops.append(text)
    if not stops:
        raise TemplateSplitError(
            f"{who} writes nothing after the user's message, so the end of the user's turn cannot "
            "be recognised"
        )
    return PreQuery(prefix=prefix, stops=tuple(stops))


def one_line(exc: Exception) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= 160 else text[:157] + "..."


def parse_turn_text(text: str, stops: Sequence[str]) -> str:
    """A generated turn up to the first marker of the template's turn end, stripped."""
    cut = len(text)
    for stop in stops:
        at = text.find(stop)
        if at >= 0:
            cut = min(cut, at)
    return text[:cut].strip()


# ---------------------------------------------------------------- filters

_WORD = re.compile(r"[^\W_]+(?:'[^\W_]+)?")


def repetition_ratio(text: str, n: int = 3) -> float:
    """The share of word n-grams that repeat an earlier one: 0 for varied text, near 1 for a
    loop ("the the the ..."). Texts of fewer than 2n words score 0."""
    words = [w.lower() for w in _WORD.findall(text)]
    grams = [tuple(words[i : i + n]) for i in range(len(words) - n + 1)]
    if len(words) < 2 * n:
        return 0.0
    return 1.0 - len(set(grams)) / len(grams)


# How assistants open a reply: a "user turn" that starts so is the model answering, not asking.
_ASSISTANT_OPENINGS = re.compile(
    r"^(?:sure|certainly|of course|absolutely|great question|here is|here's|here are|i'm sorry|"
    r"i am sorry|sorry|as an ai|i'd be happy|i would be happy|i can help|hello!? how can i|"
    r"hi!? how can i|how can i (?:help|assist)|thank you for|you're welcome)\b",
    re.IGNORECASE,
)
_REQUEST_WORDS = re.compile(
    r"\b(?:please|can you|could you|would you|will you|help me|i need|i want|i'd like|"
    r"i would like|i'm looking|i am looking|tell me|show me|give me|let me know|how|what|why|"
    r"which|who|when|where|should i|is it|are there|do you|does)\b",
    re.IGNORECASE,
)
_IMPERATIVES = frozenset(
    "write explain describe list summarize summarise compare suggest create make give tell show "
    "find calculate compute solve translate rewrite generate design plan outline draft provide "
    "help recommend identify classify analyze analyse evaluate define name convert fix edit "
    "improve compose prepare propose develop implement build simplify review check estimate "
    "predict rank sort count derive prove brainstorm imagine discuss argue critique".split()
)


def is_request(text: str) -> bool:
    """Whether a user turn asks for something (a question, an instruction, a request), rather
    than being an assistant-style reply or a bare statement."""
    stripped = text.strip().lstrip("\"'*#>- ")
    if not stripped or _ASSISTANT_OPENINGS.match(stripped):
        return False
    if "?" in stripped:
        return True
    first = _WORD.match(stripped)
    if first and first.group(0).lower() in _IMPERATIVES:
        return True
    return bool(_REQUEST_WORDS.search(stripped))


# The commonest English function words: ordinary English text of a dozen words holds several.
_ENGLISH_WORDS = frozenset(
    "the a an and or of to in on for with is are was be it this that you your i my me we our "
    "how what why can could would should do does not as at by from if about which there their "
    "they have has will".split()
)


def reads_as_english(text: str) -> bool:
    """A cheap language check: mostly Latin-alphabet letters, and English function words among
    the words (at least one in short texts, a tenth in longer ones)."""
    letters = [c for c in text if c.isalpha()]
    if not letters:
        return False
    if sum(c.isascii() for c in letters) / len(letters) < 0.9:
        return False
    words = [w.lower() for w in _WORD.findall(text)]
    common = sum(w in _ENGLISH_WORDS for w in words)
    return common >= max(1, len(words) // 10) if len(words) >= 4 else True


@dataclass(frozen=True)
class MagpieFilters:
    """The Magpie-specific checks of a generated question and its answer."""

    max_repetition: float = 0.5
    language: str = "en"  # "" keeps any language

    def query_drop_reason(self, query: str) -> str | None:
        if repetition_ratio(query) > self.max_repetition:
            return REPETITIVE
        if not is_request(query):
            return NOT_A_REQUEST
        if self.language == "en" and not reads_as_english(query):
            return OTHER_LANGUAGE
        return None

    def answer_drop_reason(self, answer: str) -> str | None:
        if repetition_ratio(answer) > self.max_repetition:
            return REPETITIVE
        return None


def conversation_messages(
    system_prompt: str, turns: Sequence[dict[str, Any]]
) -> list[dict[str, str]]:
    """The messages of a conversation so far, with the steering system message first if any."""
    head = [{"role": "system", "content": system_prompt}] if system_prompt else []
    return head + [{"role": t["role"], "content": t["content"]} for t in turns]
