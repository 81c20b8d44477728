"""`OUTPUT.lineage.jsonl`: one line per kept record, naming the prompt's seeds, the round and
request, and its similarity to earlier instructions (exactly rouge_score's ROUGE-L), also after a
run was interrupted and resumed."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from corral.data_gen.config import DEFAULT_SEED_TASKS, GenerateConfig
from corral.data_gen.lineage import lineage_path, records_per_seed, similarity_profile
from corral.data_gen.pipeline import generate_dataset
from openai_test_server import OpenAITestServer

from corral.records import read_alpaca, read_seed_tasks


def lines(output: Path) -> list[dict]:
    return [json.loads(line) for line in lineage_path(output).read_text().splitlines()]


@pytest.mark.parametrize("mode", ["alpaca", "self-instruct"])
def test_one_line_per_record_with_its_prompt_and_similarity(tmp_path, mode):
    output = tmp_path / "data.json"
    with OpenAITestServer(seed=3) as server:
        config = GenerateConfig(
            mode=mode, base_url=server.base_url, model="t", num_instructions=12,
            output=str(output), concurrency=2, requests_per_batch=1,
        )  # fmt: skip
        generate_dataset(config, progress=False)
    records = read_alpaca(output)
    lineage = lines(output)
    assert [(x["record"], x["instruction"]) for x in lineage] == [
        (i, r["instruction"]) for i, r in enumerate(records)
    ]
    seed_ids = {s.id for s in read_seed_tasks(DEFAULT_SEED_TASKS)}
    earlier = {s.instruction for s in read_seed_tasks(DEFAULT_SEED_TASKS)}
    for entry in lineage:
        assert entry["round"] >= 1 and entry["request"] >= 0
        assert entry["seed_tasks"] and set(entry["seed_tasks"]) <= seed_ids
        assert entry["teacher"]["model"] == "t" and entry["sampling"]["max_tokens"] > 0
        assert len(entry["most_similar_instructions"]) == 10
        assert set(entry["most_similar_instructions"]) <= earlier  # only what came before
        assert (
            0.0 <= entry["avg_similarity_score"] <= max(entry["most_similar_instructions"].values())
        )
        earlier.add(entry["instruction"])
    if mode == "self-instruct":
        assert any(entry["machine_instructions"] for entry in lineage)
    assert sum(records_per_seed(lineage_path(output)).values()) >= len(records)


def test_similarity_is_rouge_scores_rouge_l():
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)
    texts = [
        "Write a short poem about the sea.",
        "Write a poem about the deep blue sea!",
        "List three fruits that are yellow.",
        "Explain how a poem about the sea is written, in short.",
    ]
    profile = similarity_profile(texts, 1)
    for position, (similar, average) in enumerate(profile, start=1):
        expected = [
            scorer.score(texts[i], texts[position])["rougeL"].fmeasure for i in range(position)
        ]
        assert sorted(similar.values(), reverse=True) == pytest.approx(
            sorted(expected, reverse=True), abs=1e-4
        )
        assert average == pytest.approx(sum(expected) / len(expected), abs=1e-4)


def test_a_resumed_run_has_exactly_one_line_per_record(tmp_path):
    output = tmp_path / "data.json"
    with OpenAITestServer(seed=5) as server:
        config = GenerateConfig(
            base_url=server.base_url, model="t", num_instructions=12, output=str(output),
            concurrency=1, requests_per_batch=1, tasks_per_request=5,
        )  # fmt: skip
        from corral.data_gen import pipeline

        real = pipeline._Generator.alpaca_round
        rounds = []

        def dies_in_round_three(self, rng, size):
            rounds.append(1)
            if len(rounds) == 3:
                raise KeyboardInterrupt
            return real(self, rng, size)

        pipeline._Generator.alpaca_round = dies_in_round_three
        try:
            with pytest.raises(KeyboardInterrupt):
                generate_dataset(config, progress=False)
        finally:
            pipeline._Generator.alpaca_round = real
        assert not lineage_path(output).exists()
        generate_dataset(config, progress=False)
    records = read_alpaca(output)
    lineage = lines(output)
    assert len(lineage) == len(records) == len({(x["instruction"], x["instance"]) for x in lineage})
    assert {x["round"] for x in lineage} >= {1, 2, 3}


def test_the_report_shows_which_seeds_led_to_kept_records(tmp_path):
    from corral.evaluation.report import build_report

    output = tmp_path / "data.json"
    with OpenAITestServer(seed=9) as server:
        generate_dataset(
            GenerateConfig(base_url=server.base_url, model="t", num_instructions=10,
                           output=str(output)),
            progress=False,
        )  # fmt: skip
    html = build_report([output])
    assert "Kept records per seed task shown in their prompts" in html
    assert "seeds yielded none" in html
