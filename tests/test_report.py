"""`corral report`: the HTML page renders its plots in a real headless Chromium."""

from __future__ import annotations

import json

import pytest
from browser import chromium_page
from corral.data_gen.config import DEFAULT_SEED_TASKS
from corral.data_gen.manifest import build_manifest, run_paths
from corral.evaluation.report import build_report, verb_and_object

from corral.cli import main
from corral.fileio import atomic_write_text
from corral.records import read_seed_tasks, write_alpaca
from corral.rundir import run_info_for_training, write_run_info
from corral.templates import alpaca_template

# Corral's own seed tasks: the report is tested on every clone, reference data or not.
SEEDS = DEFAULT_SEED_TASKS


def test_verb_and_object_heuristic():
    assert verb_and_object("Write a short poem about the sea.") == ("write", "poem")
    assert verb_and_object("Give me three examples of fruit") == ("give", "examples")
    assert verb_and_object("Summarize.") == ("summarize", "")
    assert verb_and_object("Given a list of numbers, sort them.") == ("sort", "")
    assert verb_and_object("Given a list of numbers, find the median.") == ("find", "median")
    assert verb_and_object("What is the capital of France?") == ("", "")
    assert verb_and_object("") == ("", "")


@pytest.fixture()
def report_inputs(tmp_path):
    """A dataset with a manifest, a run directory with metrics, and an evaluation result."""
    records = [dict(s.as_alpaca()) for s in read_seed_tasks(SEEDS)]
    data = tmp_path / "data.json"
    write_alpaca(data, records)
    # The manifest and the run record as the pipeline and training write them.
    _, journal, manifest = run_paths(data)
    atomic_write_text(
        manifest,
        json.dumps(
            build_manifest(
                mode="alpaca",
                output=data,
                journal=journal,
                seed_tasks={"path": str(SEEDS), "count": len(records), "sha256_16": "0" * 16},
                teacher={"kind": "local", "model": "embedded"},
                tasks=[{"instruction": r["instruction"]} for r in records],
                records=len(records),
                candidates=170,
                drops={"not_novel": 40, "too_short": 7, "blocklisted": 3},
                teacher_stats={},
                duration_s=1.0,
                resumed=False,
                config={},
            )
        ),
    )
    run = tmp_path / "run"
    run.mkdir()
    write_run_info(
        run,
        run_info_for_training(
            base_model="embedded",
            base_model_path="",
            method="lora",
            template=alpaca_template(),
            max_length=256,
            corral_version="0.1.0",
        ),
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


def test_report_html_has_every_view(report_inputs):
    data, run, result = report_inputs
    # No --seed-tasks: the manifest names the seed file the run used.
    html = build_report([data, run, result])
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
def test_report_renders_in_headless_chromium(report_inputs, tmp_path):
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
                str(SEEDS),
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
