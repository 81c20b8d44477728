"""Every prompt format, defined once.

Training (label masking) and inference (response extraction) both take their markers from here, so
the two cannot drift apart. A template turns an (instruction, input) pair into:

- `prompt`: everything the model is given, ending right after the response marker;
- `completion_suffix`: appended after the output at training time; it contains the end marker, so
  the model learns to stop;
- `response_marker` / `end_marker`: the strings that delimit the answer in generated text.

Formats: `alpaca` (Stanford Alpaca, with and without input; ends with the tokenizer's EOS),
`dolly` (`### Instruction:` / `### Response:` / `### End`), and `chat` (the tokenizer's own chat
template, with markers derived by rendering it).
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

TEMPLATE_NAMES = ("alpaca", "dolly", "chat")

ALPACA_RESPONSE_MARKER = "### Response:"
DOLLY_RESPONSE_MARKER = "### Response:"
DOLLY_END_MARKER = "### End"

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

# Between replayed turns of a conversation in an instruction format.
TURN_SEPARATOR = "\n\n"
SYSTEM_ROLES = ("system", "developer")


def _jinja_string(text: str) -> str:
    """`text` as a Jinja string literal (JSON's escapes are a subset of Jinja's)."""
    return json.dumps(text, ensure_ascii=False)


# Stands in for the answer when a chat template is rendered to find where the answer sits.
_CHAT_PROBE = "\u2063CORRAL-ANSWER\u2063"


@dataclass(frozen=True)
class PromptTemplate:
    """A prompt format with its markers. `format_prompt` is pure string work."""

    name: str
    response_marker: str
    end_marker: str
    completion_suffix: str
    with_input: str = ""
    no_input: str = ""
    chat_prefix: str = ""  # chat only: the rendered conversation up to the user's message
    chat_infix: str = ""  # chat only: from the end of the user's message to the answer

    def format_prompt(self, instruction: str, input: str = "") -> str:
        """The text the model sees, ending right after the response marker."""
        if self.name == "chat":
            user = instruction if not input else f"{instruction}\n\n{input}"
            return self.chat_prefix + user + self.chat_infix
        pattern = self.with_input if input else self.no_input
        # One pass over the pattern's own fields: user text may contain braces or "{input}".
        values = {"{instruction}": instruction, "{input}": input}
        return _FIELD.sub(lambda match: values[match.group(0)], pattern)

    def format_completion(self, output: str) -> str:
        """What follows the prompt in a training example: the answer and the end marker."""
        return output + self.completion_suffix

    def format_example(self, instruction: str, input: str, output: str) -> tuple[str, str]:
        """(prompt, completion) for one Alpaca record; loss goes on the completion only."""
        return self.format_prompt(instruction, input), self.format_completion(output)

    def format_conversation(self, messages: Sequence[dict[str, str]]) -> str:
        """The prompt for a conversation that ends with a user message (alpaca, dolly).

        These formats are single-turn: a system message goes first, then each earlier turn is
        replayed as prompt + answer + end marker, so a run trained on single-turn data sees its own
        format. `chat` renders conversations with the tokenizer's own template instead.
        """
        if not messages or messages[-1].get("role") != "user":
            raise ValueError("the last message must come from the user")
        parts: list[str] = []
        pending_user: str | None = None
        for message in messages:
            role, content = message["role"], message["content"]
            if role in SYSTEM_ROLES or role == "user":
                # Turns render in order: a question nobody answered stays as it was asked.
                if pending_user is not None:
                    parts.append(self.format_prompt(pending_user) + TURN_SEPARATOR)
                    pending_user = None
                if role == "user":
                    pending_user = content
                else:
                    parts.append(content.strip() + TURN_SEPARATOR)
            elif role != "assistant":
                raise ValueError(f"unknown role {role!r}: expected system, user or assistant")
            elif pending_user is not None:
                parts.append(
                    self.format_prompt(pending_user)
                    + self.format_completion(content)
                    + TURN_SEPARATOR
                )
                pending_user = None
        parts.append(self.format_prompt(pending_user or ""))
        return "".join(parts)

    def jinja_chat_template(self, *, bos_token: bool = False) -> str:
        """A tokenizer chat template that renders `format_conversation` exactly (alpaca, dolly).

        Saved with an export, it makes any server that applies the tokenizer's chat template
        (vLLM, llama.cpp, Ollama, transformers) prompt the model in the format it was trained on.
        `bos_token`: start with the tokenizer's BOS, for tokenizers that add one to every prompt
        (servers do not add special tokens to a rendered chat).
        """
        if self.name == "chat":
            raise ValueError("template 'chat' is the tokenizer's own chat template already")
        prefix, suffix = self.no_input.split("{instruction}")
        text = _jinja_string
        return (
            ("{{- bos_token -}}" if bos_token else "") + "{%- for message in messages -%}"
            "{%- if message['role'] in ['system', 'developer'] -%}"
            "{{- message['content'] | trim -}}{{- " + text(TURN_SEPARATOR) + " -}}"
            "{%- elif message['role'] == 'user' -%}"
            "{{- " + text(prefix) + " -}}{{- message['content'] -}}{{- " + text(suffix) + " -}}"
            "{%- if not loop.last and messages[loop.index0 + 1]['role'] != 'assistant' -%}"
            "{{- " + text(TURN_SEPARATOR) + " -}}"
            "{%- endif -%}"
            "{%- elif message['role'] == 'assistant' and not loop.first "
            "and messages[loop.index0 - 1]['role'] == 'user' -%}"
            "{{- message['content'] -}}{{- "
            + text(self.completion_suffix + TURN_SEPARATOR)
            + " -}}"
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


def get_template(
    name: str, tokenizer: Any = None, *, eos_token: str | None = None
) -> PromptTemplate:
    """The template called `name`; `alpaca` ends with the tokenizer's EOS, `chat` needs the tokenizer."""
    if name == "alpaca":
        eos = eos_token or getattr(tokenizer, "eos_token", None) or "</s>"
        return alpaca_template(eos)
    if name == "dolly":
        return dolly_template()
    if name == "chat":
        if tokenizer is None:
            raise ValueError("template 'chat' needs the model's tokenizer")
        return chat_template(tokenizer)
    raise ValueError(f"unknown template {name!r}; choose one of {', '.join(TEMPLATE_NAMES)}")
