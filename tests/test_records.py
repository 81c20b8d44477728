"""Alpaca records and seed tasks: round trips, and every bad-input case with its message."""

from __future__ import annotations

import json
import os

import pytest

from corral.records import (
    RecordError,
    read_alpaca,
    read_seed_tasks,
    write_alpaca,
)

RECORDS = [
    {"instruction": "Add the numbers.", "input": "2, 3", "output": "5"},
    {"instruction": "Name a color.", "input": "", "output": "Blue", "source": "seed", "score": 0.4},
    {"instruction": "Translate “hello” to French.", "input": "", "output": "bonjour {x}"},
]


@pytest.mark.parametrize("suffix", [".json", ".jsonl"])
def test_round_trip_keeps_extra_keys_and_unicode(tmp_path, suffix):
    path = tmp_path / f"data{suffix}"
    assert write_alpaca(path, RECORDS) == 3
    assert read_alpaca(path) == RECORDS
    # No temporary files are left beside the output.
    assert sorted(p.name for p in tmp_path.iterdir()) == [path.name]


def test_json_output_is_a_plain_list_like_alpaca_data(tmp_path):
    path = tmp_path / "data.json"
    write_alpaca(path, RECORDS)
    assert json.loads(path.read_text(encoding="utf-8")) == RECORDS


def test_missing_input_defaults_to_empty(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text('{"instruction": "Say hi.", "output": "hi"}\n')
    assert read_alpaca(path) == [{"instruction": "Say hi.", "output": "hi", "input": ""}]


def test_output_optional_for_inference_inputs(tmp_path):
    path = tmp_path / "d.json"
    path.write_text('[{"instruction": "Say hi."}]')
    assert read_alpaca(path, require_output=False)[0]["instruction"] == "Say hi."
    with pytest.raises(RecordError, match=r"record 0: field 'output': missing required field"):
        read_alpaca(path)


@pytest.mark.parametrize(
    ("name", "content", "expected"),
    [
        ("empty.json", "", r"empty\.json: file is empty"),
        ("blank.jsonl", "\n \n", r"blank\.jsonl: file is empty"),
        ("list.json", "[]", r"list\.json: no records"),
        (
            "broken.jsonl",
            '{"instruction": "a", "output": "b"}\n{"instruction": "a",\n',
            r"broken\.jsonl: line 2: invalid JSON",
        ),
        (
            "broken.json",
            '[{"instruction": "a", "output": "b"},',
            r"broken\.json: line 1: invalid JSON",
        ),
        (
            "missing.jsonl",
            '{"instruction": "a", "output": "b"}\n\n{"input": "x", "output": "y"}\n',
            r"missing\.jsonl: line 3: field 'instruction': missing required field",
        ),
        (
            "nonstring.json",
            '[{"instruction": "a", "output": "b"}, {"instruction": "a", "output": 5}]',
            r"nonstring\.json: record 1: field 'output': expected a string, got int",
        ),
        (
            "nullinput.json",
            '[{"instruction": "a", "input": null, "output": "b"}]',
            r"nullinput\.json: record 0: field 'input': expected a string, got NoneType",
        ),
        (
            "emptyinstr.jsonl",
            '{"instruction": "  ", "output": "b"}\n',
            r"emptyinstr\.jsonl: line 1: field 'instruction': instruction is empty",
        ),
        (
            "notobj.jsonl",
            '["a", "b"]\n',
            r"notobj\.jsonl: line 1: expected a JSON object, got list",
        ),
        (
            "notlist.json",
            '{"instruction": "a", "output": "b"}',
            r"notlist\.json: expected a JSON list",
        ),
    ],
)
def test_bad_input_names_file_record_and_field(tmp_path, name, content, expected):
    path = tmp_path / name
    path.write_text(content)
    with pytest.raises(RecordError, match=expected):
        read_alpaca(path)


def test_missing_file(tmp_path):
    with pytest.raises(RecordError, match="file not found"):
        read_alpaca(tmp_path / "nope.json")


def test_failed_write_leaves_previous_file_intact(tmp_path):
    path = tmp_path / "data.json"
    write_alpaca(path, RECORDS)
    before = path.read_bytes()

    def exploding():
        yield RECORDS[0]
        raise RuntimeError("disk on fire")

    with pytest.raises(RuntimeError):
        write_alpaca(path, exploding())
    assert path.read_bytes() == before
    assert os.listdir(tmp_path) == ["data.json"]


def test_shared_seed_tasks_load_as_is(seed_tasks_path):
    seeds = read_seed_tasks(seed_tasks_path)
    assert len(seeds) == 175
    assert sum(s.is_classification for s in seeds) == 26
    assert all(s.instruction and s.instances for s in seeds)
    first = json.loads(seed_tasks_path.read_text().splitlines()[0])
    loaded = seeds[0]
    assert (loaded.id, loaded.name, loaded.instruction, loaded.is_classification) == (
        first["id"],
        first["name"],
        first["instruction"],
        first["is_classification"],
    )
    assert loaded.instances == first["instances"]


def test_alpaca_records_work_as_seeds(tmp_path):
    path = tmp_path / "seeds.json"
    write_alpaca(path, RECORDS)
    seeds = read_seed_tasks(path)
    assert [s.instruction for s in seeds] == [r["instruction"] for r in RECORDS]
    assert seeds[1].as_alpaca() == {"instruction": "Name a color.", "input": "", "output": "Blue"}


def test_bad_seed_task_names_line_and_field(tmp_path):
    path = tmp_path / "seeds.jsonl"
    good = {
        "id": "a",
        "name": "a",
        "instruction": "Do it.",
        "instances": [{"input": "", "output": "ok"}],
        "is_classification": False,
    }
    bad = dict(good, instances=[{"input": "", "output": "ok"}, {"input": 3, "output": "x"}])
    path.write_text(json.dumps(good) + "\n" + json.dumps(bad) + "\n")
    with pytest.raises(
        RecordError, match=r"line 2: field 'instances\[1\]\.input': expected a string"
    ):
        read_seed_tasks(path)
    path.write_text(json.dumps(dict(good, is_classification="yes")) + "\n")
    with pytest.raises(RecordError, match=r"line 1: field 'is_classification'"):
        read_seed_tasks(path)


def test_dolly_errors_name_the_dolly_field(tmp_path):
    from corral.errors import RecordError
    from corral.records import read_alpaca

    path = tmp_path / "dolly.jsonl"
    for record, field, line in (
        ({"instruction": "Say hi.", "context": "", "response": 5}, "response", 1),
        ({"instruction": "Say hi.", "context": ["a"], "response": "hi"}, "context", 1),
    ):
        path.write_text(json.dumps(record) + "\n")
        with pytest.raises(RecordError) as error:
            read_alpaca(path)
        assert str(error.value).startswith(
            f"{path}: line {line}: field '{field}': expected a string"
        )


def test_a_record_with_both_names_of_one_field_is_ambiguous(tmp_path):
    from corral.errors import RecordError
    from corral.records import read_alpaca, read_conversations

    path = tmp_path / "both.jsonl"
    good = {"instruction": "Say hi.", "output": "hi"}
    path.write_text(json.dumps(good) + "\n" + json.dumps({**good, "response": "hello"}) + "\n")
    with pytest.raises(RecordError, match=r"line 2: field 'response': holds both 'output'"):
        read_alpaca(path)
    turns = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    shared = [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "bye"}]
    path.write_text(json.dumps({"messages": turns, "conversations": shared}) + "\n")
    with pytest.raises(RecordError, match=r"line 1: field 'messages': holds both 'conversations'"):
        read_conversations(path)
