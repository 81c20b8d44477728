"""`corral generate --estimate`: a probe round against a real loopback OpenAI-compatible server,
its figures scaled to the asked count, and the run's manifest setting actuals beside them."""

from __future__ import annotations

import json
import math

import pytest
from openai_test_server import OpenAITestServer

from corral.cli import main as corral_main


@pytest.mark.parametrize(("mode", "requests_per_probe"), [("alpaca", 1), ("self-instruct", None)])
def test_estimate_probes_then_the_manifest_holds_estimate_and_actual(
    tmp_path, capsys, mode, requests_per_probe
):
    output = tmp_path / "data.json"
    common = [
        "generate", "--mode", mode, "--output", str(output), "--no-progress",
        "--num-instructions", "30", "price_per_1k_prompt_tokens=0.5",
        "price_per_1k_completion_tokens=1.5",
    ]  # fmt: skip
    with OpenAITestServer(latency=0.01) as server:
        base = ["--base-url", server.base_url]
        assert corral_main([*common, *base, "--estimate", "--estimate-probes", "3"]) == 0
        probe_requests = server.stats["requests"]
        printed = capsys.readouterr().out
        estimate = json.loads((tmp_path / "data.estimate.json").read_text())
        assert not output.exists() and not (tmp_path / "data.journal.jsonl").exists()
        if requests_per_probe is not None:
            assert probe_requests == 3 * requests_per_probe  # alpaca: one request per prompt
        assert estimate["probe"]["requests"] == probe_requests
        kept = estimate["kept_per_request"]
        assert kept > 0
        assert estimate["requests"] == math.ceil(30 / kept)
        per_request = estimate["probe"]["completion_tokens"] / probe_requests
        assert estimate["completion_tokens"] == pytest.approx(
            per_request * estimate["requests"], abs=0.06
        )
        tokens_cost = (estimate["prompt_tokens"] * 0.5 + estimate["completion_tokens"] * 1.5) / 1000
        assert estimate["cost_usd"] == pytest.approx(tokens_cost, rel=1e-3)
        assert f">= {estimate['requests']:,}" in printed

        assert corral_main([*common, *base]) == 0
    manifest = json.loads((tmp_path / "data.manifest.json").read_text())
    side_by_side = manifest["estimate"]
    assert side_by_side["requests"] == {
        "estimated": estimate["requests"],
        "actual": manifest["requests"],
    }
    assert side_by_side["cost_usd"]["actual"] == manifest["cost_usd"] > 0


def test_estimate_against_an_unreachable_teacher_is_one_line(tmp_path, capsys):
    code = corral_main(
        ["generate", "--base-url", "http://127.0.0.1:9/v1", "--output", str(tmp_path / "d.json"),
         "--estimate"]
    )  # fmt: skip
    assert code == 2
    assert "cannot reach the teacher" in capsys.readouterr().err
    assert not (tmp_path / "d.estimate.json").exists()


def test_generate_keeps_an_evaluation_set_out_of_the_data(tmp_path):
    """The same deterministic teacher twice: what the first run kept becomes the evaluation set
    of the second, which must drop every one of those tasks as contaminated."""
    from corral.records import read_alpaca

    def run(output, *extra) -> dict:
        with OpenAITestServer(seed=7) as server:
            code = corral_main(
                ["generate", "--base-url", server.base_url, "--output", str(output),
                 "--num-instructions", "12", "--no-progress", "concurrency=1", *extra]
            )  # fmt: skip
        assert code == 0
        return json.loads(output.with_name(output.stem + ".manifest.json").read_text())

    first = tmp_path / "first.json"
    run(first)
    held_out = read_alpaca(first)[:5]
    evaluation = tmp_path / "eval.jsonl"
    evaluation.write_text(
        "".join(
            json.dumps(
                {"instruction": r["instruction"],
                 "instances": [{"input": r["input"], "output": r["output"]}]}
            ) + "\n"
            for r in held_out
        )
    )  # fmt: skip
    second = tmp_path / "second.json"
    manifest = run(second, "--eval-set", str(evaluation))
    assert manifest["counts"]["dropped"]["contaminated"] >= len(held_out)
    kept = {r["instruction"] for r in read_alpaca(second)}
    assert not kept & {r["instruction"] for r in held_out}
