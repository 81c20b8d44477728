"""Evol-Instruct mode: prompts and elimination rules, runs against the fault-injecting test teacher
(lineage chains across generations) and the embedded model."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from corral.data_gen import evol
from corral.data_gen.config import GenerateConfig
from corral.data_gen.pipeline import estimate_generation, generate_dataset
from openai_test_server import OpenAITestServer

from corral.config import ConfigError, load_config
from corral.records import read_alpaca, read_seed_tasks


def test_each_operation_has_its_own_prompt_around_the_instruction():
    texts = {op: evol.evolution_prompt(op, "  Name three rivers.  ") for op in evol.OPERATIONS}
    assert len(set(texts.values())) == len(evol.OPERATIONS)
    for op, text in texts.items():
        assert "Original instruction:\nName three rivers.\n\nNew instruction:" in text
        if op != evol.BREADTH:
            assert evol.IN_DEPTH[op] in text
    with pytest.raises(ValueError, match="unknown evolution"):
        evol.evolution_prompt("shorten", "x")


def test_elimination_rules():
    parent = "Name three rivers in Africa."
    rule = evol.instruction_elimination
    assert rule(parent, "Name three rivers in Africa.", "deepen", 3) == evol.NO_INFORMATION_GAIN
    assert rule(parent, "Name the three rivers in Africa!", "deepen", 3) == evol.NO_INFORMATION_GAIN
    assert (
        rule(
            parent,
            "Name three rivers in Africa, with the countries each crosses and its length.",
            "add_constraints",
            3,
        )  # fmt: skip
        is None
    )
    assert rule(parent, "#New instruction#: Name three rivers.", "deepen", 0) == (
        evol.COPIED_PROMPT_WORDS
    )
    assert rule(parent, "The rewritten task: list two deserts.", "breadth", 0) == (
        evol.COPIED_PROMPT_WORDS
    )
    # In breadth a new instruction shares little with its parent, and that is the point.
    assert rule(parent, "List two deserts of Asia.", "breadth", 3) is None
    assert rule(parent, parent, "breadth", 3) == evol.NO_INFORMATION_GAIN
    assert evol.answer_elimination("Sorry, I cannot answer that.") == evol.COULD_NOT_ANSWER
    assert evol.answer_elimination("... !!! the and of") == evol.ANSWER_WITHOUT_CONTENT
    long_answer = "Sorry for the wait. " + "The Nile flows north through eleven countries. " * 12
    assert evol.answer_elimination(long_answer) is None
    assert evol.parse_evolved('  "List two deserts."  ') == "List two deserts."


def test_unknown_operations_are_refused():
    with pytest.raises(ConfigError, match="evol_operations"):
        load_config(GenerateConfig, None, ["evol_operations=[deepen, shorten]"], mode="evol")


def evol_config(server: OpenAITestServer, output: Path, **overrides) -> GenerateConfig:
    return GenerateConfig(
        mode="evol",
        base_url=server.base_url,
        model="canned-teacher",
        output=str(output),
        concurrency=4,
        backoff_base=0.01,
        **overrides,
    )


def test_evol_against_a_faulty_endpoint_keeps_lineage_chains(tmp_path, capsys):
    output = tmp_path / "e.json"
    with OpenAITestServer(faults=["429", None, "503", "drop"], retry_after=0.05) as server:
        config = evol_config(server, output, num_instructions=40, evol_generations=3)
        result = generate_dataset(config, progress=False, log=lambda _: None)
    records = read_alpaca(output)
    assert len(records) == 40 and len({r["instruction"] for r in records}) == 40
    dropped = result.manifest["counts"]["dropped"]
    for reason in (evol.NO_INFORMATION_GAIN, evol.COPIED_PROMPT_WORDS, evol.COULD_NOT_ANSWER):
        assert dropped.get(reason, 0) >= 1, dropped
    assert not any(r["output"].startswith("Sorry") for r in records)
    assert not any("New instruction" in r["instruction"] for r in records)

    seeds = {s.id: s for s in read_seed_tasks(config.seed_tasks_path())}
    lineage = [json.loads(line) for line in open(tmp_path / "e.lineage.jsonl")]
    kept = {line["instruction"]: line for line in lineage}
    assert len(lineage) == 40
    assert max(line["generation"] for line in lineage) >= 2
    for line in lineage:
        chain = line["ancestors"]
        assert len(chain) == line["generation"] and line["operation"] in evol.OPERATIONS
        # The chain starts at the seed the lineage names and ends at the parent; each step
        # between is itself a kept record of the generation before.
        root = seeds[line["seed_tasks"][0]]
        assert (
            chain[0]["instruction"].startswith(root.instruction) and chain[0]["operation"] is None
        )
        for depth, step in enumerate(chain[1:], start=1):
            assert kept[step["instruction"]]["generation"] == depth
            assert kept[step["instruction"]]["operation"] == step["operation"]
        if line["operation"] != evol.BREADTH:
            assert line["instruction"].startswith(chain[-1]["instruction"])  # the test teacher

    # The data is plain Alpaca JSON: the audit reads it as it reads any other.
    from corral.cli import main as corral_main

    capsys.readouterr()
    assert corral_main(["audit", str(output), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["checks"]["exact_duplicate"]["records"] == 0


def test_evol_estimate_and_generations_in_the_fingerprint(tmp_path):
    with OpenAITestServer() as server:
        estimate = estimate_generation(evol_config(server, tmp_path / "e.json"), probes=4)
        assert estimate["mode"] == "evol" and estimate["requests"] is not None
        generate_dataset(evol_config(server, tmp_path / "e.json", num_instructions=4),
                         progress=False, log=lambda _: None)  # fmt: skip
        from corral.data_gen.journal import FingerprintMismatch

        with pytest.raises(FingerprintMismatch, match="evol_generations"):
            generate_dataset(
                evol_config(server, tmp_path / "e.json", num_instructions=8, evol_generations=1),
                progress=False,
                log=lambda _: None,
            )


@pytest.mark.long
def test_evol_with_the_embedded_model_as_local_teacher(tmp_path, embedded_model_path):
    output = tmp_path / "local.json"
    config = GenerateConfig(
        mode="evol",
        model="embedded",
        output=str(output),
        num_instructions=2,
        local_batch_size=4,
        query_max_tokens=64,
        max_tokens=96,
        temperature=0.7,
        evol_min_new_words=1,
        max_idle_rounds=8,
    )
    result = generate_dataset(config, progress=False, log=lambda _: None)
    records = read_alpaca(output)
    assert len(records) == 2 and all(r["instruction"] and r["output"] for r in records)
    lineage = [json.loads(line) for line in open(tmp_path / "local.lineage.jsonl")]
    assert all(line["generation"] >= 1 and line["ancestors"] for line in lineage)
    assert result.manifest["teacher"]["kind"] == "local"


@pytest.mark.parametrize(("preset", "mode"), [("magpie.yaml", "magpie"), ("evol.yaml", "evol")])
def test_presets_load_and_name_their_command(preset, mode):
    path = Path(__file__).resolve().parents[1] / "configs" / "data_gen" / preset
    lines = path.read_text().splitlines()
    assert lines[1].startswith("# Run:  corral generate --config configs/data_gen/" + preset)
    config = load_config(GenerateConfig, path)
    assert config.mode == mode
    if mode == "magpie":
        assert config.api == "completions"


def test_evol_through_the_batch_api(tmp_path):
    """Evol's requests are plain chat requests, so they go through the Batch API at half price:
    each round's rewrites are one batch, their answers another."""
    output = tmp_path / "b.json"
    with OpenAITestServer() as server:
        config = evol_config(server, output, num_instructions=6, api="batch",
                             batch_poll_seconds=0.02)  # fmt: skip
        result = generate_dataset(config, progress=False, log=lambda _: None)
        sizes = [batch["request_counts"]["total"] for batch in server.batches.values()]
    assert len(read_alpaca(output)) == 6
    assert len(sizes) >= 2 and min(sizes) >= 1  # no empty batch for a round that kept nothing
    assert result.manifest["teacher"]["api"] == "batch"
