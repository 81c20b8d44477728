"""Conversations: ShareGPT, OpenAI messages and Dolly records read and validated; the Vicuna and
Guanaco layouts; and exactly which tokens a three-turn conversation trains, in every template."""

from __future__ import annotations

import json

import pytest
from corral.training.conversations import tokenize_conversation
from corral.training.data import IGNORE_INDEX, tokenize_record

from corral.errors import RecordError
from corral.records import read_alpaca, read_conversations
from corral.templates import get_template

THREE_TURNS = [
    {"role": "system", "content": "Answer briefly."},
    {"role": "user", "content": "Name a colour of the sky."},
    {"role": "assistant", "content": "Blue."},
    {"role": "user", "content": "And of grass?"},
    {"role": "assistant", "content": "Green."},
    {"role": "user", "content": "Which is warmer, sun or snow?"},
    {"role": "assistant", "content": "The sun."},
]


def write_jsonl(path, rows) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_sharegpt_messages_alpaca_and_dolly_all_read_as_conversations(tmp_path):
    path = tmp_path / "mixed.jsonl"
    write_jsonl(
        path,
        [
            {
                "conversations": [
                    {"from": "human", "value": "Hi"},
                    {"from": "gpt", "value": "Hello"},
                    {"from": "human", "value": "Bye"},
                ],
                "id": "a",
            },  # fmt: skip
            {
                "messages": [
                    {"role": "system", "content": "Be kind."},
                    {"role": "user", "content": "Hi"},
                    {"role": "assistant", "content": "Hello"},
                ]
            },  # fmt: skip
            {"instruction": "Add them.", "input": "2, 3", "output": "5"},
            {
                "instruction": "Summarize.",
                "context": "A long text.",
                "response": "Short.",
                "category": "summarization",
            },  # fmt: skip
        ],
    )
    conversations = read_conversations(path)
    assert conversations[0] == {
        "messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}],
        "id": "a",  # the unanswered last turn is dropped: there is nothing to learn from it
    }
    assert conversations[1]["messages"][0] == {"role": "system", "content": "Be kind."}
    assert conversations[2]["messages"][0]["content"] == "Add them.\n\n2, 3"
    assert conversations[3]["messages"][1]["content"] == "Short."
    assert conversations[3]["category"] == "summarization"


def test_dolly_records_read_as_alpaca(tmp_path):
    path = tmp_path / "dolly.jsonl"
    write_jsonl(path, [{"instruction": "Summarize.", "context": "Text.", "response": "T.",
                        "category": "summarization"}])  # fmt: skip
    assert read_alpaca(path) == [
        {"instruction": "Summarize.", "input": "Text.", "output": "T.", "category": "summarization"}
    ]


@pytest.mark.parametrize(
    ("row", "message"),
    [
        ({"conversations": [{"from": "robot", "value": "x"}]}, r"turn 0: unknown speaker 'robot'"),
        ({"conversations": [{"from": "human", "value": 3}]}, r"turn 0: expected a string"),
        (
            {"messages": [{"role": "assistant", "content": "x"}, {"role": "user", "content": "y"}]},
            "turn 0: expected a user turn, got assistant",
        ),
        (
            {"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": " "}]},
            "turn 1: empty assistant turn",
        ),
        ({"messages": [{"role": "user", "content": "x"}]}, "no answered user turn"),
        ({"conversations": []}, "expected a non-empty list of turns"),
    ],
)
def test_bad_conversations_name_file_record_turn_and_field(tmp_path, row, message):
    path = tmp_path / "bad.jsonl"
    write_jsonl(path, [{"messages": [{"role": "user", "content": "a"},
                                     {"role": "assistant", "content": "b"}]}, row])  # fmt: skip
    with pytest.raises(RecordError, match=message) as error:
        read_conversations(path)
    assert f"{path}: line 2" in str(error.value)


def test_vicuna_and_guanaco_layouts():
    vicuna = get_template("vicuna", eos_token="</s>")
    assert vicuna.format_prompt("Hi") == (
        "A chat between a curious user and an artificial intelligence assistant. The assistant "
        "gives helpful, detailed, and polite answers to the user's questions. USER: Hi ASSISTANT:"
    )
    assert vicuna.format_conversation(THREE_TURNS[:4]) == (
        "Answer briefly. USER: Name a colour of the sky. ASSISTANT: Blue.</s>USER: And of grass? "
        "ASSISTANT:"
    )
    guanaco = get_template("guanaco", eos_token="</s>")
    assert guanaco.format_conversation(THREE_TURNS[1:4]) == (
        "### Human: Name a colour of the sky. ### Assistant: Blue.</s>### Human: And of grass? "
        "### Assistant:"
    )


@pytest.mark.parametrize("name", ["alpaca", "dolly", "vicuna", "guanaco", "chat"])
def test_exactly_every_answer_and_its_end_marker_are_trained(embedded_tokenizer, name):
    template = get_template(name, embedded_tokenizer)
    example, status = tokenize_conversation(
        THREE_TURNS, 0, embedded_tokenizer, template, max_length=1024
    )
    assert status == "kept"
    trained = [t for t, label in zip(example.input_ids, example.labels, strict=True)
               if label != IGNORE_INDEX]  # fmt: skip
    expected_ids = []
    for answer in ("Blue.", "Green.", "The sun."):
        piece = template.format_completion(answer) if name != "chat" else (
            answer + template.end_marker
        )  # fmt: skip
        expected_ids += embedded_tokenizer(piece, add_special_tokens=False)["input_ids"]
    assert trained == expected_ids
    assert embedded_tokenizer.decode(trained).count("Green.") == 1
    # Nothing of the user turns or the system message carries loss.
    untrained = embedded_tokenizer.decode(
        [
            t
            for t, label in zip(example.input_ids, example.labels, strict=True)
            if label == IGNORE_INDEX
        ]  # fmt: skip
    )
    assert "And of grass?" in untrained and "Answer briefly." in untrained


@pytest.mark.parametrize("name", ["alpaca", "dolly"])
def test_a_one_turn_conversation_trains_like_the_alpaca_record(embedded_tokenizer, name):
    template = get_template(name, embedded_tokenizer)
    record = {"instruction": "Name a colour of the sky.", "input": "", "output": "Blue."}
    as_record, _ = tokenize_record(record, 0, embedded_tokenizer, template, max_length=512)
    as_turns, _ = tokenize_conversation(
        [{"role": "user", "content": record["instruction"]},
         {"role": "assistant", "content": "Blue."}],
        0, embedded_tokenizer, template, max_length=512,
    )  # fmt: skip
    assert (as_turns.input_ids, as_turns.labels) == (as_record.input_ids, as_record.labels)


def test_a_long_conversation_is_dropped_or_cut_inside_its_answers(embedded_tokenizer):
    template = get_template("vicuna", embedded_tokenizer)
    dropped, status = tokenize_conversation(
        THREE_TURNS, 0, embedded_tokenizer, template, max_length=40
    )
    assert (dropped, status) == (None, "too_long")
    cut, status = tokenize_conversation(
        THREE_TURNS, 0, embedded_tokenizer, template, max_length=40, truncation="truncate"
    )
    assert status == "truncated" and len(cut.input_ids) == 40
    assert any(label != IGNORE_INDEX for label in cut.labels)
