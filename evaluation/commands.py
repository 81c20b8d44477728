"""`corral eval` and `corral report`.

`corral --help` imports this module: at the top only what it loads anyway (configs, errors,
files); evaluation, and the frameworks behind it, is imported by the commands that run it.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from corral.errors import UsageError
from corral.fileio import atomic_write_text, check_output_path

EVAL_DESCRIPTION = (
    "Answers the evaluation set (Self-Instruct's user-oriented JSONL, or Alpaca records; "
    "evaluation only, never training) with --base and --tuned, reports ROUGE-L against the "
    "references and answer lengths, and with a judge the pairwise win rate, each pair judged in "
    "both orders to cancel position bias. With --lm-eval-tasks, also runs EleutherAI's "
    "lm-evaluation-harness tasks on both models."
)
REPORT_DESCRIPTION = (
    "Datasets (Alpaca JSON/JSONL) get the Self-Instruct diversity views (leading verbs and "
    "objects, ROUGE-L to the nearest seed, lengths, drops by reason); run directories get loss, "
    "eval-loss and throughput curves; `corral eval` results get win rates."
)


def run_eval(args: argparse.Namespace) -> int:
    import json

    from corral.data_gen.judges import EndpointJudge, LocalJudge
    from corral.data_gen.teachers import TeacherError
    from corral.evaluation.evaluate import evaluate, format_table

    if args.eval_set is None and not args.lm_eval_tasks:
        raise UsageError("give --eval-set (answers, ROUGE-L, judge) or --lm-eval-tasks, or both")
    if args.judge and args.judge_base_url:
        raise UsageError("give --judge (a local model) or --judge-base-url (an endpoint), not both")
    if args.limit is not None and args.limit < 1:
        raise UsageError(f"--limit must be at least 1, got {args.limit}")
    if args.lm_eval_limit is not None and args.lm_eval_limit < 1:
        raise UsageError(f"--lm-eval-limit must be at least 1, got {args.lm_eval_limit}")
    check_output_path(args.output, inputs=(args.eval_set, *args.lm_eval_include))
    result: dict = {"kind": "corral-eval", "models": {}}
    if args.eval_set is not None:
        judge = None
        try:
            if args.judge_base_url:
                judge = EndpointJudge(args.judge_model, args.judge_base_url)
            elif args.judge:
                judge = LocalJudge(args.judge)
            result = evaluate(
                args.eval_set,
                args.base,
                args.tuned,
                limit=args.limit,
                max_new_tokens=args.max_new_tokens,
                judge=judge,
            )
        except TeacherError as exc:
            raise UsageError(f"the judge failed: {exc}") from None
        finally:
            if judge is not None:
                judge.close()
    if args.lm_eval_tasks:
        from corral.evaluation.harness import format_harness_table, run_harness

        models = {"base": args.base, **({"tuned": args.tuned} if args.tuned else {})}
        result["lm_eval"] = run_harness(
            models,
            args.lm_eval_tasks,
            executable=args.lm_eval,
            include=args.lm_eval_include,
            limit=args.lm_eval_limit,
            batch_size=args.lm_eval_batch_size,
            chat_template=args.lm_eval_chat_template,
        )
    atomic_write_text(args.output, json.dumps(result, indent=2, ensure_ascii=False) + "\n")
    if args.eval_set is not None:
        print(format_table(result))
    if args.lm_eval_tasks:
        print(format_harness_table(result["lm_eval"]))
    print(f"results written to {args.output}")
    return 0


def run_report(args: argparse.Namespace) -> int:
    from corral.evaluation.report import write_report

    check_output_path(args.output, inputs=(*args.inputs, args.seed_tasks))

    output = write_report([Path(p) for p in args.inputs], Path(args.output), args.seed_tasks)
    print(f"report written to {output}")
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    evaluation = subparsers.add_parser(
        "eval",
        help="answer an evaluation set with a base and a tuned model; ROUGE-L and a pairwise judge",
        description=EVAL_DESCRIPTION,
    )
    evaluation.add_argument(
        "--eval-set", default=None, type=Path, help="evaluation JSONL/JSON (answers and ROUGE-L)"
    )
    evaluation.add_argument(
        "--base", default="embedded", help="base model name, folder or run directory"
    )
    evaluation.add_argument(
        "--tuned", default=None, help="a training run directory, a merged export, or a model"
    )
    evaluation.add_argument("--limit", type=int, default=20, help="evaluate the first N items")
    evaluation.add_argument("--max-new-tokens", type=int, default=128, help="answer length limit")
    evaluation.add_argument("--judge", default=None, help="a local model as judge (e.g. embedded)")
    evaluation.add_argument(
        "--judge-base-url", default=None, help="an OpenAI-compatible endpoint as judge"
    )
    evaluation.add_argument(
        "--judge-model", default="gpt-4o-mini", help="model name at --judge-base-url"
    )
    evaluation.add_argument("--output", "-o", default="eval.json", help="results JSON to write")
    harness = evaluation.add_argument_group(
        "lm-evaluation-harness",
        "run lm-eval's tasks on --base and --tuned (adapter runs as peft on their base); needs "
        "lm_eval installed (pip install 'lm-eval[hf]', or make lmeval-env)",
    )
    harness.add_argument(
        "--lm-eval-tasks", default=None, help="comma-separated task names, e.g. arc_easy,hellaswag"
    )
    harness.add_argument(
        "--lm-eval-include",
        action="append",
        default=[],
        metavar="FOLDER",
        help="a folder of task YAMLs (offline tasks over local files); repeatable",
    )
    harness.add_argument(
        "--lm-eval-limit", type=int, default=None, help="the first N documents of each task"
    )
    harness.add_argument("--lm-eval-batch-size", default="1", help="lm-eval's --batch_size")
    harness.add_argument(
        "--lm-eval-chat-template",
        action="store_true",
        help="prompt through each model's chat template (a run's renders its own format)",
    )
    harness.add_argument(
        "--lm-eval", default=None, metavar="PATH", help="the lm_eval executable to run"
    )
    evaluation.set_defaults(func=run_eval)

    report = subparsers.add_parser(
        "report",
        help="one self-contained HTML page with plots of datasets, training runs and evaluations",
        description=REPORT_DESCRIPTION,
    )
    report.add_argument(
        "inputs", nargs="+", metavar="RUN_OR_DATA", help="datasets, run dirs, eval JSON"
    )
    report.add_argument("--output", "-o", default="report.html", help="HTML file to write")
    report.add_argument(
        "--seed-tasks", type=Path, default=None, help="seed tasks for the nearest-seed ROUGE-L view"
    )
    report.set_defaults(func=run_report)
