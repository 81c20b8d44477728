"""`corral score`: judge replies parsed, an endpoint judge over real loopback HTTP, a local judge on
a real (tiny) model, and a resume after an interruption that scores nothing twice."""

from __future__ import annotations

import json

import pytest
from corral.evaluation.score import (
    EndpointScorer,
    LocalScorer,
    parse_score,
    partial_path,
    score_file,
    score_prompt,
)
from openai_test_server import OpenAITestServer

from corral.records import read_alpaca, write_alpaca

RECORDS = [
    {"instruction": f"Name the colour number {n}.", "input": "" if n % 2 else "x", "output": "Red"}
    for n in range(7)
]


@pytest.mark.parametrize(
    ("reply", "score", "reason"),
    [
        ("4\nThe answer is correct but short.", 4.0, "The answer is correct but short."),
        ("Score: 5 - complete and correct", 5.0, "complete and correct"),
        ("4.5\nalmost perfect", 4.5, "almost perfect"),
        ("I would give it a 2 because it is vague.", 2.0, "because it is vague"),
        ("Rating: 9/10", None, "Rating: 9/10"),
        ("", None, ""),
    ],
)
def test_parse_score(reply, score, reason):
    assert parse_score(reply) == (score, reason)


def test_the_prompt_shows_the_input_only_when_there_is_one():
    assert "### Input:\nx" in score_prompt(RECORDS[0])
    assert "### Input:" not in score_prompt(RECORDS[1])


def _endpoint(server) -> EndpointScorer:
    from corral.data_gen.teachers import OpenAICompatibleTeacher

    return EndpointScorer(
        OpenAICompatibleTeacher(
            "judge", base_url=server.base_url, concurrency=4,
            price_per_1k_prompt_tokens=1.0, price_per_1k_completion_tokens=2.0,
        )
    )  # fmt: skip


def test_endpoint_judge_scores_every_record_concurrently_and_costs_it(tmp_path):
    def judge(prompt: str, request: dict) -> str:
        number = int(prompt.split("colour number ")[1][0])
        return "no idea" if number == 3 else f"{1 + number % 5}\nbecause {number}"

    source, out = tmp_path / "data.json", tmp_path / "scored.json"
    write_alpaca(source, RECORDS)
    with OpenAITestServer(judge, faults=["500", "429"]) as server:
        scorer = _endpoint(server)
        try:
            summary = score_file(source, out, scorer, chunk=3, progress=False)
        finally:
            scorer.close()
    scored = read_alpaca(out)
    assert [r["score"] for r in scored] == [1.0, 2.0, 3.0, None, 5.0, 1.0, 2.0]
    assert scored[1]["score_reason"] == "because 1"
    assert (summary.unscored, summary.histogram["1"], summary.histogram["2"]) == (1, 2, 2)
    assert summary.cost["retries"] == 2 and summary.cost["cost_usd"] > 0
    assert not partial_path(out).exists()


def test_an_interrupted_run_resumes_without_scoring_twice(tmp_path):
    source, out = tmp_path / "data.json", tmp_path / "scored.json"
    write_alpaca(source, RECORDS)
    seen: list[str] = []

    def judge(prompt: str, request: dict) -> str:
        seen.append(prompt)
        return "3\nok"

    with OpenAITestServer(judge) as server:
        scorer = _endpoint(server)
        calls = []
        real = scorer.score

        def dies_on_third_chunk(records):
            calls.append(1)
            if len(calls) == 3:
                raise KeyboardInterrupt
            return real(records)

        scorer.score = dies_on_third_chunk
        with pytest.raises(KeyboardInterrupt):
            score_file(source, out, scorer, chunk=2, progress=False)
        assert len(partial_path(out).read_text().splitlines()) == 1 + 4
        scorer.score = real
        summary = score_file(source, out, scorer, chunk=2, progress=False)
        scorer.close()
    assert (summary.resumed, summary.scored_now) == (4, 3)
    assert len(seen) == len(RECORDS)  # each record asked once in all
    header = {"corral_scores": 1, "input_sha256": "x", "judge": {}}
    partial_path(out).write_text(json.dumps(header) + "\n")
    from corral.errors import UsageError

    with pytest.raises(UsageError, match="another input or judge"):
        score_file(source, out, scorer, chunk=2, progress=False)


def test_local_judge_always_scores_within_the_scale(tmp_path, tiny_model_path):
    source, out = tmp_path / "data.json", tmp_path / "scored.json"
    write_alpaca(source, RECORDS[:3])
    summary = score_file(source, out, LocalScorer("tiny-random"), progress=False)
    scores = [r["score"] for r in read_alpaca(out)]
    assert summary.unscored == 0 and all(1.0 <= s <= 5.0 for s in scores)
    assert all("under tiny-random" in r["score_reason"] for r in read_alpaca(out))


def test_cli_score_then_audit_keeps_the_best(tmp_path, capsys):
    from corral.cli import main as corral_main

    source, scored, best = tmp_path / "d.json", tmp_path / "s.json", tmp_path / "best.json"
    instructions = [
        "Describe how rivers shape valleys.",
        "Explain what makes a volcano erupt.",
        "List three famous bridges in Europe.",
        "Tell a child what a comet is.",
        "Suggest a name for an apple orchard.",
    ]
    write_alpaca(source, [{"instruction": i, "output": "An answer."} for i in instructions])

    def judge(prompt: str, request: dict) -> str:
        return f"{5 if 'comet' in prompt else 3}\nreason"

    with OpenAITestServer(judge) as server:
        argv = ["score", str(source), "--output", str(scored), "--judge-base-url",
                server.base_url, "--judge-model", "j", "--quiet"]  # fmt: skip
        assert corral_main(argv) == 0
    assert "scored 5 of 5 records" in capsys.readouterr().out
    assert corral_main(["audit", str(scored), "--min-score", "4.5", "--fix", str(best)]) == 0
    assert [r["instruction"] for r in read_alpaca(best)] == ["Tell a child what a comet is."]
    assert corral_main(["score", str(source), "--output", str(scored)]) == 2  # no judge given
    assert corral_main(["score", str(source), "--output", str(source), "--judge", "x"]) == 2


def test_the_report_shows_the_score_histogram(tmp_path):
    from corral.evaluation.report import build_report

    scored = tmp_path / "scored.json"
    write_alpaca(scored, [{**r, "score": 1.0 + (i % 5)} for i, r in enumerate(RECORDS)])
    assert "Judge scores (corral score): 7 of 7 scored" in build_report([scored])
