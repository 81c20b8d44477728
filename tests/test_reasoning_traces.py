"""A reasoning teacher's thinking is kept in the record's own `reasoning` field, never in its
output: from `reasoning_content` (chat APIs with a reasoning parser) or an inline think block."""

from __future__ import annotations

import json

import pytest
from corral.data_gen.config import GenerateConfig
from corral.data_gen.pipeline import generate_dataset
from corral.data_gen.reasoning import reasoning_and_answer, split_reasoning
from openai_test_server import OpenAITestServer

from corral.records import read_alpaca


def test_split_reasoning():
    assert split_reasoning("<think>\nadd 2 and 2\n</think>\n\n4") == ("add 2 and 2", "4")
    # The template opened the block in the prompt: the reply starts inside it.
    assert split_reasoning("add 2 and 2</think>4") == ("add 2 and 2", "4")
    # Cut off while thinking: no answer at all.
    assert split_reasoning("<think>add 2 and") == ("add 2 and", "")
    assert split_reasoning("  4  ") == ("", "4")
    assert reasoning_and_answer("4", "add 2 and 2") == ("add 2 and 2", "4")
    assert reasoning_and_answer("<think>x</think>4", "") == ("x", "4")


@pytest.mark.parametrize("style", ["field", "think"])
def test_evol_keeps_the_teachers_reasoning_apart(tmp_path, style):
    output = tmp_path / "e.json"
    with OpenAITestServer(reasoning=style) as server:
        config = GenerateConfig(mode="evol", base_url=server.base_url, model="canned-teacher",
                                output=str(output), num_instructions=10, concurrency=4)  # fmt: skip
        generate_dataset(config, progress=False, log=lambda _: None)
    records = read_alpaca(output)
    assert len(records) == 10
    for record in records:
        assert "think" not in record["output"].lower() and "<think>" not in record["instruction"]
        assert record["reasoning"].startswith("The user asks:")
    raw = json.loads(output.read_text())
    assert set(raw[0]) == {"instruction", "input", "output", "reasoning"}


def test_magpie_raw_think_blocks_and_dropping_them(tmp_path, embedded_model_path):
    with OpenAITestServer(reasoning="think") as server:
        for keep in (True, False):
            output = tmp_path / f"m{keep}.json"
            config = GenerateConfig(mode="magpie", base_url=server.base_url,
                                    model="canned-teacher", magpie_tokenizer="embedded",
                                    output=str(output), num_instructions=6, concurrency=4,
                                    keep_reasoning=keep)  # fmt: skip
            generate_dataset(config, progress=False, log=lambda _: None)
            records = read_alpaca(output)
            assert len(records) == 6
            assert not any("<think>" in r["output"] or "The user asks" in r["output"]
                           for r in records)  # fmt: skip
            if keep:
                assert all(r["reasoning"].startswith("The user asks:") for r in records)
            else:
                assert not any("reasoning" in r for r in records)
