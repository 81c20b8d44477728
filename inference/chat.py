"""`corral chat`: a terminal chat that streams the answer token by token.

Multi-turn through the tokenizer's chat template when the model is used with the `chat` template;
instruction templates (alpaca, dolly) replay earlier turns in their own format. `/reset` starts a
new conversation, `/exit` (or end of input) leaves. When the conversation outgrows the context,
the oldest turns are dropped.
"""

from __future__ import annotations

import sys
from typing import TextIO

from corral.inference.generation import encode_prompt, render_conversation
from corral.inference.loading import LoadedModel
from corral.inference.params import SamplingParams


def run_chat(
    loaded: LoadedModel,
    params: SamplingParams,
    *,
    system_prompt: str | None = None,
    input_stream: TextIO = sys.stdin,
    output_stream: TextIO = sys.stdout,
) -> int:
    """Read user turns from `input_stream`, stream answers to `output_stream`."""
    engine = loaded.make_engine(1)
    engine.start()
    interactive = input_stream.isatty()
    messages: list[dict[str, str]] = []
    if system_prompt:
        messages.append({"role": "system", "content": system_prompt})
    if interactive:
        output_stream.write(
            f"Chatting with {loaded.name} (template {loaded.template.name}). /reset starts over, /exit leaves.\n"
        )
    try:
        while True:
            if interactive:
                output_stream.write("\nyou> ")
                output_stream.flush()
            line = input_stream.readline()
            if not line:
                break
            text = line.strip()
            if not text:
                continue
            if text in ("/exit", "/quit"):
                break
            if text == "/reset":
                messages = messages[:1] if system_prompt else []
                output_stream.write("(new conversation)\n")
                continue
            messages.append({"role": "user", "content": text})
            prompt = _fit_prompt(loaded, messages, params.max_new_tokens, engine.context_length)
            if interactive:
                output_stream.write("model> ")
            parts: list[str] = []
            for event in engine.stream(prompt, params):
                if event.result is None:
                    parts.append(event.text)
                    output_stream.write(event.text)
                    output_stream.flush()
                elif event.result.finish_reason == "error":
                    output_stream.write(f"\n(error: {event.result.error})")
            output_stream.write("\n")
            output_stream.flush()
            messages.append({"role": "assistant", "content": "".join(parts).strip()})
    finally:
        engine.shutdown()
    return 0


def _fit_prompt(
    loaded: LoadedModel, messages: list[dict[str, str]], max_new_tokens: int, context: int
) -> list[int]:
    """The prompt ids, dropping the oldest turns (keeping a system message) until they fit."""
    while True:
        ids = encode_prompt(loaded, render_conversation(loaded, messages))
        if len(ids) + max_new_tokens <= context:
            return ids
        first_turn = 1 if messages[0]["role"] == "system" else 0
        if len(messages) - first_turn <= 1:
            return ids[-(context - max_new_tokens) :]
        del messages[first_turn : first_turn + 2]
