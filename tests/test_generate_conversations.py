"""`corral generate --mode conversations`: first turns as in Alpaca mode, then self-chat
follow-ups, against a real loopback OpenAI-compatible server; the output trains as conversations."""

from __future__ import annotations

import json
import random

from corral.data_gen.config import GenerateConfig
from corral.data_gen.parsers import parse_turn
from corral.data_gen.pipeline import generate_dataset
from openai_test_server import OpenAITestServer, canned_teacher_reply

from corral.records import read_conversations


def self_chat(prompt: str, request: dict) -> str:
    tail = prompt.rstrip()
    if tail.endswith("User:"):
        return " Could you give one more example of that?\nAssistant: Sure."
    if tail.endswith("Assistant:"):
        return " Certainly: here is another example, with a short explanation."
    return canned_teacher_reply(prompt, random.Random(len(prompt)), chat=True)


def test_conversations_grow_to_the_asked_turns_and_read_back(tmp_path):
    output = tmp_path / "chats.json"
    with OpenAITestServer(self_chat) as server:
        config = GenerateConfig(
            mode="conversations", base_url=server.base_url, model="t", num_instructions=6,
            output=str(output), turns=3, concurrency=2,
        )  # fmt: skip
        result = generate_dataset(config, progress=False)
    raw = json.loads(output.read_text())
    assert len(raw) == 6 and all("conversations" in r for r in raw)
    conversations = read_conversations(output)
    for conversation in conversations:
        roles = [m["role"] for m in conversation["messages"]]
        assert roles == ["user", "assistant"] * 3
        follow_up = conversation["messages"][2]["content"]
        assert follow_up == "Could you give one more example of that?"  # its label cut off
    assert result.manifest["mode"] == "conversations"
    assert result.records == 6


def test_an_unusable_follow_up_leaves_the_conversation_as_it_was(tmp_path):
    def silent_user(prompt: str, request: dict) -> str:
        return "" if prompt.rstrip().endswith("User:") else self_chat(prompt, request)

    output = tmp_path / "chats.json"
    with OpenAITestServer(silent_user) as server:
        config = GenerateConfig(
            mode="conversations", base_url=server.base_url, model="t", num_instructions=4,
            output=str(output), turns=2,
        )  # fmt: skip
        result = generate_dataset(config, progress=False)
    assert all(len(c["messages"]) == 2 for c in read_conversations(output))
    assert result.drops["unusable_turn"] >= 4


def test_parse_turn():
    assert parse_turn("User: How about cats?\nAssistant: Cats are...") == "How about cats?"
    assert parse_turn(" Certainly, two more.") == "Certainly, two more."
    assert parse_turn("ok") is None
    assert parse_turn("A long answer that was cut", finish_reason="length") is None
