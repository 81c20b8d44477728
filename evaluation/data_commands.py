"""`corral audit` and `corral score`: know the data before training on it.

`corral --help` imports this module: at the top only what it loads anyway (configs, errors,
files); the audit and the scorer, and the frameworks behind them, are imported by the commands.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from corral.errors import UsageError
from corral.fileio import check_output_path, exclusive_output

AUDIT_DESCRIPTION = """\
Check an Alpaca dataset in one pass: contamination with an evaluation set (--eval-set: an
instruction within ROUGE-L 0.7 of an evaluation item, or a shared 13-gram), instructions near the
seed tasks (--seed-tasks), exact and near duplicates, empty, looping or copied outputs,
placeholder inputs and outputs (<noinput>, N/A), refusals and AI boilerplate, length outliers and
non-English records; with --min-score, records a judge (corral score) scored lower. --fix OUT
writes a cleaned copy: what a check drops is dropped, placeholder inputs are emptied, outliers
are only listed. --strict exits 1 when the data is contaminated.
"""

SCORE_DESCRIPTION = """\
Have a judge rate every record 1-5 for how accurate and helpful its output is for its instruction
and input, with a one-line reason, and write the records with `score` and `score_reason` added.
The judge is a local model (--judge embedded) or any OpenAI-compatible endpoint (--judge-base-url
URL --judge-model M; the key from $OPENAI_API_KEY), concurrent and retried like a teacher and
costed with --price-prompt/--price-completion (per 1K tokens). Progress is saved to
OUTPUT.partial.jsonl: re-running the same command resumes. Then: corral audit SCORED --min-score
4.5 --fix BEST.
"""


def run_audit(args: argparse.Namespace) -> int:
    import json

    from corral.evaluation.audit import audit_records, check_scores, format_audit

    from corral.records import read_alpaca, read_seed_tasks, write_alpaca

    if args.fix is not None:
        inputs = (args.data, args.eval_set, args.seed_tasks)
        check_output_path(args.fix, inputs=inputs, what="--fix output")
    records = read_alpaca(args.data)
    if args.min_score is not None or args.fix is not None:
        check_scores(records, args.data)
    if args.min_score is not None and not 1.0 <= args.min_score <= 5.0:
        raise UsageError(f"--min-score must be within 1..5, got {args.min_score}")
    result = audit_records(
        records,
        eval_tasks=read_seed_tasks(args.eval_set) if args.eval_set else (),
        seed_tasks=read_seed_tasks(args.seed_tasks) if args.seed_tasks else (),
        min_score=args.min_score,
    )
    report = result.to_dict()
    if args.json:
        print(json.dumps(report, indent=2, ensure_ascii=False))
    else:
        print(format_audit(result))
    if args.fix is not None:
        fixed = result.fix(records)
        write_alpaca(args.fix, fixed)
        print(
            f"wrote {len(fixed)} of {len(records)} records to {args.fix} "
            f"({len(records) - len(fixed)} dropped)",
            file=sys.stderr,
        )
    contaminated = report["checks"]["contamination"]["records"]
    if args.strict and contaminated:
        print(
            f"corral: error: {args.data}: {contaminated} records match the evaluation set",
            file=sys.stderr,
        )
        return 1
    return 0


def run_score(args: argparse.Namespace) -> int:
    from corral.records import read_alpaca

    for flag, price in (
        ("--price-prompt", args.price_prompt),
        ("--price-completion", args.price_completion),
    ):
        if not price >= 0:  # also refuses NaN
            raise UsageError(f"{flag} must be 0 or more, got {price}")
    if (args.judge is None) == (args.judge_base_url is None):
        raise UsageError("give --judge (a local model) or --judge-base-url (an endpoint)")
    check_output_path(args.output, inputs=(args.input,))
    read_alpaca(args.input)  # bad input stops before a judge is loaded or paid
    with exclusive_output(args.output):
        _refuse_finished_scoring(args.output, overwrite=args.overwrite)
        return _score(args)


def _refuse_finished_scoring(output: str, *, overwrite: bool) -> None:
    """A finished OUTPUT (no partial file beside it) is not scored again unless asked: a rerun
    would pay the judge for every record a second time."""
    from corral.evaluation.score import partial_path

    if Path(output).exists() and not partial_path(Path(output)).exists() and not overwrite:
        raise UsageError(
            f"{output} holds a finished scoring; pass --overwrite to ask the judge again, "
            "or choose another --output"
        )


def _score(args: argparse.Namespace) -> int:
    from corral.data_gen.teachers import OpenAICompatibleTeacher, TeacherError
    from corral.evaluation.score import EndpointScorer, LocalScorer, score_file

    if args.judge_base_url:
        teacher = OpenAICompatibleTeacher(
            args.judge_model,
            base_url=args.judge_base_url,
            concurrency=args.concurrency,
            price_per_1k_prompt_tokens=args.price_prompt,
            price_per_1k_completion_tokens=args.price_completion,
            patience=args.patience,
        )
        try:
            teacher.check_reachable()
        except TeacherError as exc:
            teacher.close()
            raise UsageError(str(exc)) from None
        scorer = EndpointScorer(teacher)
    else:
        scorer = LocalScorer(args.judge)
    try:
        summary = score_file(args.input, args.output, scorer, progress=not args.quiet)
    except TeacherError as exc:
        raise UsageError(str(exc)) from None
    finally:
        scorer.close()
    histogram = ", ".join(f"{k}: {v}" for k, v in summary.histogram.items())
    cost = summary.cost.get("cost_usd")
    print(
        f"scored {summary.records - summary.unscored} of {summary.records} records "
        f"({summary.scored_now} now, {summary.resumed} resumed) in {summary.seconds} s; "
        f"mean {summary.mean}; by score {histogram}"
        + (f"; cost ${cost:.4f}" if cost else "")
        + f" -> {args.output}"
    )
    if summary.unscored:
        failed = summary.cost.get("failed_requests", 0)
        why = (
            f"{failed} requests to the judge failed after every retry, the other replies held none"
            if failed
            else "the judge's replies held none"
        )
        print(
            f"corral: error: {summary.unscored} records got no score ({why}); they are kept "
            "with score null, and --min-score drops them",
            file=sys.stderr,
        )
        return 1
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    audit = subparsers.add_parser(
        "audit",
        help="check a dataset: contamination, duplicates, degenerate outputs, placeholders, ...",
        description=AUDIT_DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    audit.add_argument("data", help="Alpaca JSON or JSONL")
    audit.add_argument("--eval-set", help="evaluation set (user-oriented JSONL or Alpaca records)")
    audit.add_argument("--seed-tasks", help="seed tasks the data was generated from")
    audit.add_argument(
        "--min-score", type=float, help="drop records a judge scored below this (corral score)"
    )
    audit.add_argument("--fix", metavar="OUT", help="write the cleaned records here")
    audit.add_argument(
        "--json", action="store_true", help="print the findings as JSON instead of the table"
    )
    audit.add_argument(
        "--strict", action="store_true", help="exit 1 when records match the evaluation set"
    )
    audit.set_defaults(func=run_audit)

    score = subparsers.add_parser(
        "score",
        help="a judge rates every record 1-5 with a reason (AlpaGasus-style quality filter)",
        description=SCORE_DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    score.add_argument("input", help="Alpaca JSON or JSONL")
    score.add_argument("--output", required=True, help="the scored records (.json or .jsonl)")
    score.add_argument("--judge", help="a local model as judge (e.g. embedded)")
    score.add_argument("--judge-base-url", help="an OpenAI-compatible endpoint as judge")
    score.add_argument("--judge-model", default="gpt-4o-mini", help="model at --judge-base-url")
    score.add_argument("--concurrency", type=int, default=8, help="requests in flight")
    score.add_argument("--price-prompt", type=float, default=0.0, help="USD per 1K prompt tokens")
    score.add_argument(
        "--price-completion", type=float, default=0.0, help="USD per 1K completion tokens"
    )
    score.add_argument(
        "--patience",
        type=float,
        default=60.0,
        metavar="SECONDS",
        help="stop when the judge endpoint has given no usable answer for this long (default 60)",
    )
    score.add_argument(
        "--overwrite",
        action="store_true",
        help="score again into an OUTPUT that holds a finished scoring (its judge was paid once)",
    )
    score.add_argument("--quiet", action="store_true", help="no progress bar")
    score.set_defaults(func=run_score)
