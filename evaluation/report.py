"""`corral report`: one self-contained HTML page about datasets, training runs and evaluations.

- A generated dataset gets the diversity views of the Self-Instruct paper: the most common leading
  verbs and their direct objects, the distribution of ROUGE-L to the nearest seed instruction, the
  instruction/input/output lengths, (from its lineage) how many kept records each seed task led
  to, and (from its manifest) the drops by filter reason.
- A training run directory gets its loss and eval-loss curves and its throughput.
- An evaluation result gets its win rates and ROUGE-L scores.

The page has no external resources (inline CSS and SVG), so it can be mailed or archived as is.
"""

from __future__ import annotations

import json
import random
import re
import time
from collections import Counter
from html import escape
from pathlib import Path
from typing import Any

from corral.data_gen.lineage import lineage_path, records_per_seed
from corral.data_gen.manifest import drops_by_reason, read_manifest
from corral.data_gen.manifest import seed_tasks_path as manifest_seed_tasks
from corral.evaluation.harness import harness_rows
from corral.evaluation.svgplot import bar_chart, histogram, line_chart

from corral.errors import RecordError
from corral.fileio import atomic_write_text
from corral.records import read_alpaca, read_seed_tasks
from corral.rouge import RougeNoveltyIndex
from corral.rundir import RUN_INFO_FILE, has_run_info, read_metrics, read_run_info

# How many records at most get a nearest-seed ROUGE-L score (a random sample beyond that).
ROUGE_SAMPLE = 5000

# Words skipped when looking for a verb's direct object. A heuristic, not a parser: Self-Instruct
# used a constituency parser, which would be a heavy dependency for a chart.
_NOT_AN_OBJECT = set(
    "a an the me us you him her them it this that these those my your our their its his some any "
    "each every all one two three four five few several many more most following given provided "
    "below above short brief simple new good possible different of to for in on with about from "
    "by as at into whether if how what which who why when where there here".split()
)
_WORD = re.compile(r"[A-Za-z][A-Za-z'-]*")
# Openers of a leading clause ("Given a list, sort it"): the verb comes after the first comma.
_CLAUSE_OPENERS = {"given", "in", "using", "based", "for", "with", "after", "from", "if", "when"}
# First words that mean the instruction is a question or statement, not an imperative.
_NOT_A_VERB = set(
    "what which who whom whose why when where how is are was were do does did can could would "
    "should will i you we they he she it my your our the a an this that there here".split()
)


def verb_and_object(instruction: str) -> tuple[str, str]:
    """The leading verb and the first plausible object noun of an instruction (lowercased).

    Questions and statements ("What is ...", "You are ...") have no leading verb: ("", "").
    """
    words = [w.lower() for w in _WORD.findall(instruction)]
    if words and words[0] in _CLAUSE_OPENERS and "," in instruction:
        words = [w.lower() for w in _WORD.findall(instruction.split(",", 1)[1])]
    if not words or words[0] in _NOT_A_VERB:
        return "", ""
    verb = words[0]
    obj = next((w for w in words[1:6] if w not in _NOT_AN_OBJECT), "")
    return verb, obj


def _words(text: str) -> int:
    return len(text.split())


def nearest_seed_rouge(instructions: list[str], seed_instructions: list[str]) -> list[float]:
    """For each instruction, its highest ROUGE-L F-measure against any seed instruction."""
    # At threshold 0 the index prunes nothing that shares a token, so its maximum is exact.
    index = RougeNoveltyIndex(0.0)
    index.extend(seed_instructions)
    return [index.check(text).max_fmeasure for text in instructions]


def dataset_section(path: Path, seed_tasks: Path | None) -> str:
    records = read_alpaca(path)
    manifest = read_manifest(path)
    if seed_tasks is None and manifest is not None:
        seed_tasks = manifest_seed_tasks(manifest)
    parts = [f"<h2>Dataset: {escape(str(path))}</h2>"]
    with_input = sum(1 for r in records if r.get("input", "").strip())
    parts.append(
        f'<p class="facts">{len(records)} records; {with_input} with an input '
        f"({100 * with_input / len(records):.0f}%).</p>"
    )
    pairs = [verb_and_object(r["instruction"]) for r in records]
    verbs = Counter(v for v, _ in pairs if v)
    top_verbs = verbs.most_common(20)
    parts.append(
        bar_chart(
            [v for v, _ in top_verbs],
            [c for _, c in top_verbs],
            title="Most common leading verbs of instructions",
        )
    )
    rows = []
    for verb, count in top_verbs[:10]:
        objects = Counter(o for v, o in pairs if v == verb and o).most_common(4)
        cells = ", ".join(f"{escape(o)} ({n})" for o, n in objects) or "–"
        rows.append(f"<tr><td>{escape(verb)}</td><td>{count}</td><td>{cells}</td></tr>")
    parts.append(
        '<table class="verb-objects"><caption>Top verbs and their most common direct objects'
        "</caption><tr><th>verb</th><th>instructions</th><th>objects</th></tr>"
        + "".join(rows)
        + "</table>"
    )
    if seed_tasks is not None:
        seeds = [s.instruction for s in read_seed_tasks(seed_tasks)]
        instructions = [r["instruction"] for r in records]
        note = ""
        if len(instructions) > ROUGE_SAMPLE:
            instructions = random.Random(0).sample(instructions, ROUGE_SAMPLE)
            note = f" (a random sample of {ROUGE_SAMPLE})"
        scores = nearest_seed_rouge(instructions, seeds)
        parts.append(
            histogram(
                scores,
                title=f"ROUGE-L to the most similar seed instruction{note}",
                x_label="ROUGE-L F-measure",
                range_=(0.0, 1.0),
            )
        )
    else:
        parts.append(
            '<p class="note">No seed tasks given (--seed-tasks): novelty view skipped.</p>'
        )
    for field, color in (("instruction", 0), ("input", 1), ("output", 2)):
        lengths = [_words(r.get(field, "")) for r in records]
        if field == "input":
            lengths = [n for n in lengths if n] or [0]
        parts.append(
            histogram(
                lengths,
                title=f"{field.capitalize()} length (words)",
                x_label="words",
                bins=min(30, max(5, len(set(lengths)))),
                color=("#3b6ea8", "#d9822b", "#4f9a55")[color],
            )
        )
    scores = [r["score"] for r in records if isinstance(r.get("score"), int | float)]
    if scores:
        parts.append(
            histogram(
                scores,
                title=f"Judge scores (corral score): {len(scores)} of {len(records)} scored",
                x_label="score",
                range_=(1.0, 5.0),
                bins=8,
                color="#a8823b",
            )
        )
    lineage = lineage_path(path)
    if lineage.is_file():
        per_seed = records_per_seed(lineage)
        top = per_seed.most_common(20)
        seeds_total = manifest["seed_tasks"]["count"] if manifest is not None else None
        idle = (
            f"; {seeds_total - len(per_seed)} of {seeds_total} seeds yielded none"
            if (seeds_total)
            else ""
        )
        parts.append(
            bar_chart(
                [k for k, _ in top],
                [v for _, v in top],
                title=f"Kept records per seed task shown in their prompts (top 20{idle})",
                color="#7a5ea8",
            )
        )
    drops = drops_by_reason(manifest) if manifest is not None else {}
    if drops:
        ordered = sorted(drops.items(), key=lambda kv: -kv[1])
        parts.append(
            bar_chart(
                [k for k, _ in ordered],
                [v for _, v in ordered],
                title="Dropped by filter reason",
                color="#b2453f",
            )
        )
    return "\n".join(parts)


def run_section(run_dir: Path) -> str:
    info = read_run_info(run_dir, check_files=False)
    metrics = read_metrics(run_dir)
    parts = [f"<h2>Training run: {escape(str(run_dir))}</h2>"]
    facts = ", ".join(
        f"{k}: {escape(str(getattr(info, k)))}"
        for k in ("base_model", "method", "template", "max_length")
        if getattr(info, k) is not None
    )
    parts.append(f'<p class="facts">{facts}; {len(metrics)} logged steps.</p>')
    loss = [(m["step"], float(m["loss"])) for m in metrics if m.get("loss") is not None]
    eval_loss = [
        (m["step"], float(m["eval_loss"])) for m in metrics if m.get("eval_loss") is not None
    ]
    parts.append(
        line_chart(
            {"train loss": loss, "eval loss": eval_loss},
            title="Loss",
            x_label="step",
            y_label="loss",
        )
    )
    # Preference runs (dpo, reward) also log how often chosen outranks rejected, and by how much.
    for name, title in (("rewards/accuracies", "Reward accuracy"), ("rewards/margins", "Margin")):
        series = {
            label: [(m["step"], float(m[key])) for m in metrics if m.get(key) is not None]
            for label, key in (
                (f"train {title.lower()}", name),
                (f"eval {title.lower()}", f"eval_{name}"),
            )
        }
        if any(series.values()):
            parts.append(line_chart(series, title=title, x_label="step", y_label=name))
    speed = [(m["step"], float(m["tokens_per_s"])) for m in metrics if m.get("tokens_per_s")]
    if speed:
        parts.append(
            line_chart({"tokens/s": speed}, title="Throughput", x_label="step", y_label="tokens/s")
        )
    return "\n".join(parts)


def eval_section(path: Path, result: dict[str, Any]) -> str:
    parts = [f"<h2>Evaluation: {escape(str(path))}</h2>"]
    models = result.get("models", {})
    labels, rouge = [], []
    for name, stats in models.items():
        if isinstance(stats, dict) and "rouge_l" in stats:
            labels.append(name)
            rouge.append(float(stats["rouge_l"]))
    if labels:
        parts.append(bar_chart(labels, rouge, title="ROUGE-L against the references"))
    judge = result.get("judge")
    if isinstance(judge, dict) and "win_rate" in judge:
        rates = judge["win_rate"]
        names = list(rates)
        parts.append(
            bar_chart(
                names,
                [float(rates[n]) for n in names],
                title=f"Pairwise win rate (judge: {judge.get('model', '?')}, both orders)",
                color="#4f9a55",
            )
        )
    harness = result.get("lm_eval")
    if isinstance(harness, dict) and harness.get("models"):
        parts.append(harness_table(harness))
    return "\n".join(parts)


def harness_table(section: dict[str, Any]) -> str:
    """lm-evaluation-harness results: one row per task and metric, one column per model."""

    roles = list(section["models"])
    rows = []
    for task, metric, values in harness_rows(section):
        cells = ["-" if value is None else f"{float(value):.4f}" for value in values]
        rows.append(
            f"<tr><td>{escape(task)}</td><td>{escape(metric)}</td>"
            + "".join(f"<td>{c}</td>" for c in cells)
            + "</tr>"
        )
    head = "".join(f"<th>{escape(role)}</th>" for role in roles)
    return (
        "<table><caption>lm-evaluation-harness</caption>"
        f"<tr><th>task</th><th>metric</th>{head}</tr>{''.join(rows)}</table>"
    )


_CSS = """
body { font: 14px/1.45 system-ui, sans-serif; margin: 24px auto; max-width: 900px; color: #222; }
h1 { font-size: 22px; } h2 { font-size: 18px; border-bottom: 1px solid #ddd; padding-top: 12px; }
.chart { display: block; margin: 12px 0; background: #fafafa; border: 1px solid #eee; }
.chart-title { font-weight: 600; font-size: 13px; } .label, .value, .tick, .legend { font-size: 11px; }
.axis { stroke: #999; } table { border-collapse: collapse; margin: 8px 0; }
td, th { border: 1px solid #ddd; padding: 3px 8px; text-align: left; } caption { text-align: left; }
.note { color: #777; }
"""


def build_report(paths: list[Path], seed_tasks: Path | None = None) -> str:
    """The HTML of a report over datasets, run directories and evaluation results."""
    sections = []
    for path in paths:
        if path.is_dir():
            if not has_run_info(path):
                raise RecordError(path, f"not a training run directory (no {RUN_INFO_FILE})")
            sections.append(run_section(path))
            continue
        if not path.is_file():
            raise RecordError(path, "file not found")
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError as exc:
            raise RecordError(path, f"not UTF-8 text ({exc.reason} at byte {exc.start})") from None
        stripped = text.lstrip()
        if stripped.startswith("{") and '"corral-eval"' in stripped[:200]:
            sections.append(eval_section(path, json.loads(text)))
        else:
            sections.append(dataset_section(path, seed_tasks))
    generated = time.strftime("%Y-%m-%d %H:%M:%S")
    return (
        '<!doctype html><html lang="en"><head><meta charset="utf-8">'
        f"<title>Corral report</title><style>{_CSS}</style></head><body>"
        f'<h1>Corral report</h1><p class="note">Generated {generated}.</p>'
        + "\n".join(sections)
        + "</body></html>\n"
    )


def write_report(paths: list[Path], output: Path, seed_tasks: Path | None = None) -> Path:
    atomic_write_text(output, build_report(paths, seed_tasks))
    return output
