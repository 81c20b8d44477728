"""Every prompt format, defined once.

Training (label masking) and inference (response extraction) both take their markers from here, so
the two cannot drift apart. A template turns an (instruction, input) pair, or a conversation, into:

- `prompt`: everything the model is given, ending right after the response marker;
- `completion_suffix`: appended after the output at training time; it contains the end marker, so
  the model learns to stop;
- `response_marker` / `end_marker`: the strings that delimit the answer in generated text.

Formats:
- `alpaca`: Stanford Alpaca, with and without input; the answer ends with the tokenizer's EOS;
- `dolly`: `### Instruction:` / `### Response:` / `### End`; optionally (`add_dolly_keys`) with
  the three keys as special tokens of the tokenizer, as Dolly had them, so each is one id;
- `vicuna`: Vicuna v1.1 (FastChat): a system line, then `USER: ... ASSISTANT: ...</s>` turns,
  the answer ending with the tokenizer's EOS;
- `guanaco`: QLoRA's Guanaco: `### Human: ... ### Assistant: ...`, answers ending with EOS;
- `chat`: the tokenizer's own chat template, with markers derived by rendering it.

The four instruction formats are made of the same pieces (`Turns`): a system block, a user block
ending with the response marker, an answer with its end marker, and what separates turns. From
them come the single-turn prompt, the multi-turn prompt (`format_conversation`), the pieces a
multi-turn training example is cut into (`conversation_segments`: only answers are trained), and
an equivalent Jinja chat template for other engines (`jinja_chat_template`).
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

TEMPLATE_NAMES = ("alpaca", "dolly", "chat", "vicuna", "guanaco")
SYSTEM_ROLES = ("system", "developer")

ALPACA_RESPONSE_MARKER = "### Response:"
DOLLY_INSTRUCTION_KEY = "### Instruction:"
DOLLY_RESPONSE_MARKER = "### Response:"
DOLLY_END_MARKER = "### End"
# Dolly's keys, which Dolly itself added to the tokenizer as special tokens (see add_dolly_keys).
DOLLY_KEYS = (DOLLY_INSTRUCTION_KEY, DOLLY_RESPONSE_MARKER, DOLLY_END_MARKER)
VICUNA_SYSTEM = (
    "A chat between a curious user and an artificial intelligence assistant. The assistant gives "
    "helpful, detailed, and polite answers to the user's questions."
)

_ALPACA_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further "
    "context. Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n" + ALPACA_RESPONSE_MARKER + "\n"
)
_ALPACA_NO_INPUT = (
    "Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n" + ALPACA_RESPONSE_MARKER + "\n"
)
_DOLLY_INTRO = (
    "Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request."
)
_DOLLY_WITH_INPUT = (
    _DOLLY_INTRO
    + "\n\n### Instruction:\n{instruction}\n\nInput:\n{input}\n\n"
    + DOLLY_RESPONSE_MARKER
    + "\n"
)
_DOLLY_NO_INPUT = (
    _DOLLY_INTRO + "\n\n### Instruction:\n{instruction}\n\n" + DOLLY_RESPONSE_MARKER + "\n"
)

_FIELD = re.compile(r"\{instruction\}|\{input\}")

# Between replayed turns of a conversation in the Alpaca and Dolly formats.
TURN_SEPARATOR = "\n\n"


def _jinja_string(text: str) -> str:
    """`text` as a Jinja string literal (JSON's escapes are a subset of Jinja's)."""
    return json.dumps(text, ensure_ascii=False)


# Stands in for the answer when a chat template is rendered to find where the answer sits.
_CHAT_PROBE = "\u2063CORRAL-ANSWER\u2063"


@dataclass(frozen=True)
class Turns:
    """How an instruction format lays out a conversation.

    system block = system_prefix + text + system_suffix (the default system text when the
    conversation has none and `default_system` is set); a user turn = the no-input pattern with the
    user's text; an answer = answer_prefix + text + completion suffix; after an answered turn comes
    `after_answer`, after an unanswered one `after_unanswered`.
    """

    system_prefix: str = ""
    system_suffix: str = TURN_SEPARATOR
    default_system: str = ""
    answer_prefix: str = ""
    after_answer: str = TURN_SEPARATOR
    after_unanswered: str = TURN_SEPARATOR


@dataclass(frozen=True)
class PromptTemplate:
    """A prompt format with its markers. Pure string work."""

    name: str
    response_marker: str
    end_marker: str
    completion_suffix: str
    with_input: str = ""
    no_input: str = ""
    chat_prefix: str = ""  # chat only: the rendered conversation up to the user's message
    chat_infix: str = ""  # chat only: from the end of the user's message to the answer
    turns: Turns = field(default_factory=Turns)

    def _system_block(self, text: str) -> str:
        return self.turns.system_prefix + text.strip() + self.turns.system_suffix

    def _user_block(self, instruction: str, input: str = "") -> str:
        pattern = self.with_input if input else self.no_input
        # One pass over the pattern's own fields: user text may contain braces or "{input}".
        values = {"{instruction}": instruction, "{input}": input}
        return _FIELD.sub(lambda match: values[match.group(0)], pattern)

    def format_prompt(self, instruction: str, input: str = "") -> str:
        """The text the model sees, ending right after the response marker."""
        if self.name == "chat":
            user = instruction if not input else f"{instruction}\n\n{input}"
            return self.chat_prefix + user + self.chat_infix
        default = self.turns.default_system
        return (self._system_block(default) if default else "") + self._user_block(
            instruction, input
        )

    def format_completion(self, output: str) -> str:
        """What follows the prompt in a training example: the answer and the end marker."""
        return self.turns.answer_prefix + output + self.completion_suffix

    def format_example(self, instruction: str, input: str, output: str) -> tuple[str, str]:
        """(prompt, completion) for one Alpaca record; loss goes on the completion only."""
        return self.format_prompt(instruction, input), self.format_completion(output)

    def _pieces(self, messages: Sequence[dict[str, str]]) -> Iterator[tuple[str, bool]]:
        """(text, is an answer) pieces of a conversation, in order (instruction formats)."""
        if self.name == "chat":
            raise ValueError("template 'chat' renders conversations with the tokenizer's template")
        turns = self.turns
        if turns.default_system and (not messages or messages[0]["role"] not in SYSTEM_ROLES):
            yield self._system_block(turns.default_system), False
        for position, message in enumerate(messages):
            role, content = message["role"], message["content"]
            following = messages[position + 1]["role"] if position + 1 < len(messages) else None
            if role in SYSTEM_ROLES:
                yield self._system_block(content), False
            elif role == "user":
                yield self._user_block(content), False
                if following is not None and following != "assistant":
                    # Turns render in order: a question nobody answered stays as it was asked.
                    yield turns.after_unanswered, False
            elif role == "assistant":
                if position > 0 and messages[position - 1]["role"] == "user":
                    yield self.format_completion(content), True
                    if following is not None:
                        yield turns.after_answer, False
            else:
                raise ValueError(f"unknown role {role!r}: expected system, user or assistant")

    def format_conversation(self, messages: Sequence[dict[str, str]]) -> str:
        """The prompt for a conversation that ends with a user message (instruction formats).

        A system message renders where it stands (the format's default system text goes first when
        there is none); each earlier turn is replayed as prompt + answer + end marker, so a run
        trained on single-turn data sees its own format. `chat` renders with the tokenizer's own
        template instead.
        """
        if not messages or messages[-1].get("role") != "user":
            raise ValueError("the last message must come from the user")
        return "".join(text for text, _ in self._pieces(messages))

    def conversation_segments(self, messages: Sequence[dict[str, str]]) -> list[tuple[str, bool]]:
        """A whole conversation as (text, trained) pieces: each answer and its end marker are
        trained, everything else (system, user turns, separators) is not."""
        if not messages or messages[-1].get("role") != "assistant":
            raise ValueError("a training conversation ends with an assistant turn")
        return [piece for piece in self._pieces(messages) if piece[0]]

    def jinja_chat_template(self, *, bos_token: bool = False) -> str:
        """A tokenizer chat template that renders `format_conversation` exactly.

        Saved with an export, it makes any server that applies the tokenizer's chat template
        (vLLM, llama.cpp, Ollama, transformers) prompt the model in the format it was trained on.
        `bos_token`: start with the tokenizer's BOS, for tokenizers that add one to every prompt
        (servers do not add special tokens to a rendered chat).
        """
        if self.name == "chat":
            raise ValueError("template 'chat' is the tokenizer's own chat template already")
        turns = self.turns
        prefix, suffix = self.no_input.split("{instruction}")
        text = _jinja_string
        default = ""
        if turns.default_system:
            default = (
                "{%- if not messages or messages[0]['role'] not in ['system', 'developer'] -%}"
                "{{- " + text(self._system_block(turns.default_system)) + " -}}{%- endif -%}"
            )
        return (
            ("{{- bos_token -}}" if bos_token else "") + default + "{%- for message in messages -%}"
            "{%- if message['role'] in ['system', 'developer'] -%}"
            "{{- " + text(turns.system_prefix) + " -}}{{- message['content'] | trim -}}"
            "{{- " + text(turns.system_suffix) + " -}}"
            "{%- elif message['role'] == 'user' -%}"
            "{{- " + text(prefix) + " -}}{{- message['content'] -}}{{- " + text(suffix) + " -}}"
            "{%- if not loop.last and messages[loop.index0 + 1]['role'] != 'assistant' -%}"
            "{{- " + text(turns.after_unanswered) + " -}}"
            "{%- endif -%}"
            "{%- elif message['role'] == 'assistant' and not loop.first "
            "and messages[loop.index0 - 1]['role'] == 'user' -%}"
            "{{- "
            + text(turns.answer_prefix)
            + " -}}{{- message['content'] -}}{{- "
            + text(self.completion_suffix)
            + " -}}"
            "{%- if not loop.last -%}{{- " + text(turns.after_answer) + " -}}{%- endif -%}"
            "{%- endif -%}"
            "{%- endfor -%}"
        )

    def to_dict(self) -> dict[str, str]:
        return {
            "name": self.name,
            "response_marker": self.response_marker,
            "end_marker": self.end_marker,
            "completion_suffix": self.completion_suffix,
        }


def alpaca_template(eos_token: str = "</s>") -> PromptTemplate:
    """Stanford Alpaca's prompt; the answer is followed by the tokenizer's EOS token."""
    return PromptTemplate(
        name="alpaca",
        response_marker=ALPACA_RESPONSE_MARKER,
        end_marker=eos_token,
        completion_suffix=eos_token,
        with_input=_ALPACA_WITH_INPUT,
        no_input=_ALPACA_NO_INPUT,
    )


def dolly_template() -> PromptTemplate:
    """Dolly's prompt; the answer is followed by a blank line and `### End`, the stop marker."""
    return PromptTemplate(
        name="dolly",
        response_marker=DOLLY_RESPONSE_MARKER,
        end_marker=DOLLY_END_MARKER,
        completion_suffix="\n\n" + DOLLY_END_MARKER,
        with_input=_DOLLY_WITH_INPUT,
        no_input=_DOLLY_NO_INPUT,
    )


def vicuna_template(eos_token: str = "</s>") -> PromptTemplate:
    """Vicuna v1.1: `SYSTEM USER: question ASSISTANT: answer</s>USER: ...` (FastChat's layout)."""
    return PromptTemplate(
        name="vicuna",
        response_marker="ASSISTANT:",
        end_marker=eos_token,
        completion_suffix=eos_token,
        with_input="USER: {instruction}\n\n{input} ASSISTANT:",
        no_input="USER: {instruction} ASSISTANT:",
        turns=Turns(
            system_suffix=" ",
            default_system=VICUNA_SYSTEM,
            answer_prefix=" ",
            after_answer="",
            after_unanswered=" ",
        ),
    )


def guanaco_template(eos_token: str = "</s>") -> PromptTemplate:
    """Guanaco (QLoRA on OASST1): `### Human: question ### Assistant: answer</s>`."""
    return PromptTemplate(
        name="guanaco",
        response_marker="### Assistant:",
        end_marker=eos_token,
        completion_suffix=eos_token,
        with_input="### Human: {instruction}\n\n{input} ### Assistant:",
        no_input="### Human: {instruction} ### Assistant:",
        turns=Turns(system_suffix="\n", answer_prefix=" ", after_answer="", after_unanswered=" "),
    )


def chat_template(tokenizer: Any, system_prompt: str | None = None) -> PromptTemplate:
    """A single-turn template from the tokenizer's own chat template.

    The markers are found by rendering a conversation whose answer is a probe string: what the
    generation prompt adds is the response marker, and what follows the answer in an assistant turn
    is the end marker.
    """
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError(
            "template 'chat' needs a tokenizer with a chat template; this one has none "
            "(use template 'alpaca' or 'dolly')"
        )
    messages = [{"role": "system", "content": system_prompt}] if system_prompt else []
    user_messages = [*messages, {"role": "user", "content": _CHAT_PROBE}]
    prompt = tokenizer.apply_chat_template(
        user_messages, tokenize=False, add_generation_prompt=True
    )
    no_generation = tokenizer.apply_chat_template(
        user_messages, tokenize=False, add_generation_prompt=False
    )
    full = tokenizer.apply_chat_template(
        [*user_messages, {"role": "assistant", "content": _CHAT_PROBE}], tokenize=False
    )
    if not prompt.startswith(no_generation) or prompt == no_generation:
        raise ValueError(
            "the tokenizer's chat template adds no generation prompt; cannot find the response marker"
        )
    response_marker = prompt[len(no_generation) :]
    prefix, infix = prompt.split(_CHAT_PROBE, 1)
    after_answer = full[full.rindex(_CHAT_PROBE) + len(_CHAT_PROBE) :]
    eos = getattr(tokenizer, "eos_token", None) or ""
    # The end marker is the first special-looking token after the answer (e.g. `<|im_end|>`,
    # `<|eot_id|>`); trailing newlines belong to the template, not the stop.
    end_marker = after_answer.strip() or eos
    if eos and eos in after_answer:
        end_marker = eos
    completion_suffix = after_answer[: after_answer.index(end_marker) + len(end_marker)]
    return PromptTemplate(
        name="chat",
        response_marker=response_marker.strip() or response_marker,
        end_marker=end_marker,
        completion_suffix=completion_suffix,
        chat_prefix=prefix,
        chat_infix=infix,
    )


def chat_conversation_segments(
    tokenizer: Any, template: PromptTemplate, messages: Sequence[dict[str, str]]
) -> list[tuple[str, bool]]:
    """A conversation in the tokenizer's own chat template as (text, trained) pieces.

    Rendered turn by turn: what the template adds for an assistant turn, up to and including its
    end marker, is trained; the rest (system and user turns, the generation prompt, whatever the
    template puts after the end marker) is not. Templates that rewrite earlier turns when a later
    one is added (so that a shorter conversation's rendering is not a prefix of the longer one's)
    cannot be cut this way and are refused.
    """
    if not messages or messages[-1].get("role") != "assistant":
        raise ValueError("a training conversation ends with an assistant turn")

    def render(upto: int, generation_prompt: bool) -> str:
        return tokenizer.apply_chat_template(
            list(messages[:upto]), tokenize=False, add_generation_prompt=generation_prompt
        )

    full = render(len(messages), False)
    pieces: list[tuple[str, bool]] = []
    done = 0  # characters of `full` already cut into pieces
    for position, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        before = render(position, True)
        answer_end = len(render(position + 1, False))
        rendered = full[:answer_end]
        if not full.startswith(before) or not rendered.startswith(before):
            raise ValueError(
                "the tokenizer's chat template rewrites earlier turns; train this data with an "
                "instruction template (alpaca, dolly, vicuna, guanaco) instead"
            )
        answer = rendered[len(before) :]
        stop = answer.find(template.end_marker) if template.end_marker else -1
        trained = answer[: stop + len(template.end_marker)] if stop >= 0 else answer
        pieces += [(full[done : len(before)], False), (trained, True)]
        done = len(before) + len(trained)
    pieces.append((full[done:], False))
    return [piece for piece in pieces if piece[0]]


def single_token_id(tokenizer: Any, text: str) -> int | None:
    """The id of `text` when the tokenizer encodes it as exactly one token, else None."""
    if not text:
        return None
    ids = tokenizer.encode(text, add_special_tokens=False)
    return ids[0] if len(ids) == 1 else None


def stop_token_ids(tokenizer: Any, template: PromptTemplate) -> tuple[int, ...]:
    """Token ids that end an answer in `template`: EOS, and the end marker when it is one token."""
    ids = {tokenizer.eos_token_id, single_token_id(tokenizer, template.end_marker)}
    return tuple(sorted(i for i in ids if i is not None))


def stop_strings(tokenizer: Any, template: PromptTemplate) -> tuple[str, ...]:
    """The end marker as text when it spans several tokens (Dolly's `### End`): a stop string."""
    if single_token_id(tokenizer, template.end_marker) is not None:
        return ()
    return (template.end_marker,)


def adds_bos(tokenizer: Any) -> bool:
    """Whether the tokenizer puts BOS before every text it encodes (LLaMA's does, SmolLM2's not)."""
    bos = getattr(tokenizer, "bos_token_id", None)
    ids = tokenizer("x")["input_ids"]
    return bos is not None and bool(ids) and ids[0] == bos


def encode_prompt(tokenizer: Any, template: PromptTemplate, text: str) -> list[int]:
    """Token ids of a rendered prompt: the one encoding training and inference both use.

    A chat template renders its own special tokens (BOS included where it has one), so the
    tokenizer adds none; instruction templates get the tokenizer's usual special tokens (BOS).
    """
    add_special = template.name != "chat"
    return list(tokenizer(text, add_special_tokens=add_special)["input_ids"])


def add_dolly_keys(tokenizer: Any) -> list[int]:
    """Add Dolly's keys to `tokenizer` as special tokens, as Dolly did; return their ids.

    Each key is then one id in every encoding: the end key is a stop token any engine honours (no
    stop string), and the response key is found by id. The model needs an embedding row per new
    id (corral.models.load_model grows the matrix to the tokenizer's length; training trains them).
    """
    missing = [key for key in DOLLY_KEYS if key not in tokenizer.all_special_tokens]
    if missing:
        tokenizer.add_special_tokens(
            {"additional_special_tokens": missing}, replace_extra_special_tokens=False
        )
    return [tokenizer.convert_tokens_to_ids(key) for key in DOLLY_KEYS]


def dolly_key_ids(tokenizer: Any) -> list[int] | None:
    """The ids of Dolly's keys when the tokenizer has them as special tokens, else None."""
    if tokenizer is None or not all(key in tokenizer.all_special_tokens for key in DOLLY_KEYS):
        return None
    return [tokenizer.convert_tokens_to_ids(key) for key in DOLLY_KEYS]


def get_template(
    name: str,
    tokenizer: Any = None,
    *,
    eos_token: str | None = None,
    dolly_special_tokens: bool = False,
) -> PromptTemplate:
    """The template called `name`; `alpaca` ends with the tokenizer's EOS, `chat` needs the tokenizer.

    `dolly_special_tokens` (dolly only) first adds Dolly's keys to the tokenizer as special tokens.
    """
    if dolly_special_tokens:
        if name != "dolly" or tokenizer is None:
            raise ValueError("dolly_special_tokens is an option of template 'dolly'")
        add_dolly_keys(tokenizer)
    if name == "alpaca":
        eos = eos_token or getattr(tokenizer, "eos_token", None) or "</s>"
        return alpaca_template(eos)
    if name == "dolly":
        return dolly_template()
    if name in ("vicuna", "guanaco"):
        eos = eos_token or getattr(tokenizer, "eos_token", None) or "</s>"
        return vicuna_template(eos) if name == "vicuna" else guanaco_template(eos)
    if name == "chat":
        if tokenizer is None:
            raise ValueError("template 'chat' needs the model's tokenizer")
        return chat_template(tokenizer)
    raise ValueError(f"unknown template {name!r}; choose one of {', '.join(TEMPLATE_NAMES)}")
