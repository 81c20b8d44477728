"""`corral report`: the HTML page renders its plots in a real headless Chromium."""

from __future__ import annotations

import json

import pytest
from browser import chromium_page

from corral.cli import main
from corral.records import read_seed_tasks, write_alpaca
from corral.report import build_report, verb_and_object


def test_verb_and_object_heuristic():
    assert verb_and_object("Write a short poem about the sea.") == ("write", "poem")
    assert verb_and_object("Give me three examples of fruit") == ("give", "examples")
    assert verb_and_object("Summarize.") == ("summarize", "")
    assert verb_and_object("Given a list of numbers, sort them.") == ("sort", "")
    assert verb_and_object("Given a list of numbers, find the median.") == ("find", "median")
    assert verb_and_object("What is the capital of France?") == ("", "")
    assert verb_and_object("") == ("", "")


@pytest.fixture()
def report_inputs(tmp_path, seed_tasks_path):
    """A dataset with a manifest, a run directory with metrics, and an evaluation result."""
    records = [dict(s.as_alpaca()) for s in read_seed_tasks(seed_tasks_path)][:120]
    data = tmp_path / "data.json"
    write_alpaca(data, records)
    (tmp_path / "data.manifest.json").write_text(
        json.dumps({"dropped_by_reason": {"rouge_similar": 40, "too_short": 7, "blocklist": 3}})
    )
    run = tmp_path / "run"
    run.mkdir()
    (run / "run_info.json").write_text(
        json.dumps({"base_model": "embedded", "method": "lora", "template": "alpaca"})
    )
    rows = [
        {
            "step": s,
            "loss": 3.0 / s,
            "tokens_per_s": 250 + s,
            **({"eval_loss": 2.5 / s} if s % 5 == 0 else {}),
        }
        for s in range(1, 31)
    ]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    result = tmp_path / "eval.json"
    result.write_text(
        json.dumps(
            {
                "kind": "corral-eval",
                "models": {"base": {"rouge_l": 0.12}, "tuned": {"rouge_l": 0.21}},
                "judge": {"model": "embedded", "win_rate": {"tuned": 0.6, "base": 0.3, "tie": 0.1}},
            }
        )
    )
    return data, run, result


def test_report_html_has_every_view(report_inputs, seed_tasks_path):
    data, run, result = report_inputs
    html = build_report([data, run, result], seed_tasks=seed_tasks_path)
    for title in (
        "Most common leading verbs",
        "ROUGE-L to the most similar seed instruction",
        "Instruction length",
        "Output length",
        "Dropped by filter reason",
        "Loss",
        "Throughput",
        "Pairwise win rate",
    ):
        assert title in html, title
    assert "http://" not in html.replace('xmlns="http://www.w3.org/2000/svg"', "")  # self-contained


@pytest.mark.slow
def test_report_renders_in_headless_chromium(report_inputs, seed_tasks_path, tmp_path):
    data, run, result = report_inputs
    out = tmp_path / "report.html"
    assert (
        main(
            [
                "report",
                str(data),
                str(run),
                str(result),
                "--seed-tasks",
                str(seed_tasks_path),
                "-o",
                str(out),
            ]
        )
        == 0
    )
    with chromium_page() as page:
        page.goto(out.as_uri())
        charts = page.locator("svg.chart")
        assert charts.count() >= 9
        for i in range(charts.count()):
            box = charts.nth(i).bounding_box()
            assert box and box["width"] > 300 and box["height"] > 50
        # Bars were drawn with real extent, and the loss curve is a polyline with all its points.
        widths = page.eval_on_selector_all(
            "svg.bar-chart rect.bar", "els => els.map(e => e.getBBox().width)"
        )
        assert max(widths) > 100
        points = page.eval_on_selector(
            "svg.line-chart polyline.series", "e => e.getAttribute('points').split(' ').length"
        )
        assert points == 30
        assert page.errors == []


def test_report_rejects_a_folder_that_is_not_a_run(tmp_path, capsys):
    assert main(["report", str(tmp_path), "-o", str(tmp_path / "r.html")]) == 2
    assert "not a training run directory" in capsys.readouterr().err
    assert not (tmp_path / "r.html").exists()
