"""The `corral` command line.

Subcommands of the stages live beside their code (`data_gen/commands.py`, `training/commands.py`,
`inference/commands.py`), each exposing `register(subparsers)`. Those modules import only argparse
at module level; the heavy frameworks load when a subcommand actually runs, so `corral --help` and
cache hits stay fast.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import sys
from pathlib import Path

from corral.config import ConfigError
from corral.models import ModelNotFoundError
from corral.records import RecordError

# Stage modules that add subcommands, in the order they appear in --help.
STAGE_COMMAND_MODULES = ("data_gen.commands", "training.commands", "inference.commands")


class UsageError(Exception):
    """A problem with what the user asked for; printed as one line, exit status 2."""


def _cmd_model_prepare(args: argparse.Namespace) -> int:
    from corral.models import resolve_model

    print(resolve_model(args.name))
    return 0


def _cmd_report(args: argparse.Namespace) -> int:
    from corral.report import write_report

    output = write_report([Path(p) for p in args.inputs], Path(args.output), args.seed_tasks)
    print(f"report written to {output}")
    return 0


def _cmd_eval(args: argparse.Namespace) -> int:
    import json

    from corral.evaluation import EndpointJudge, LocalJudge, evaluate, format_table
    from corral.fileio import atomic_write_text

    if args.judge and args.judge_base_url:
        raise UsageError("give --judge (a local model) or --judge-base-url (an endpoint), not both")
    judge = None
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
    atomic_write_text(args.output, json.dumps(result, indent=2, ensure_ascii=False) + "\n")
    print(format_table(result))
    print(f"results written to {args.output}")
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from corral.demo import run_demo

    return run_demo(args)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="corral",
        description="Make your own instruction-following model: generate data, fine-tune, serve.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    model = sub.add_parser("model", help="manage base models (prepare the embedded model)")
    model_sub = model.add_subparsers(dest="model_command", metavar="ACTION", required=True)
    prepare = model_sub.add_parser(
        "prepare",
        help="resolve a model name to a local folder, converting the embedded model once",
        description="Resolve NAME (embedded, tiny-random, a folder, or a hub id) and print its folder "
        "as the last line. The embedded model is converted from GGUF once and cached under "
        "$CORRAL_HOME (default ~/.cache/corral).",
    )
    prepare.add_argument(
        "name", nargs="?", default="embedded", help="model name (default: embedded)"
    )
    prepare.set_defaults(func=_cmd_model_prepare)

    for module_name in STAGE_COMMAND_MODULES:
        if importlib.util.find_spec(module_name) is not None:
            importlib.import_module(module_name).register(sub)

    report = sub.add_parser(
        "report",
        help="one self-contained HTML page with plots of datasets, training runs and evaluations",
        description="Datasets (Alpaca JSON/JSONL) get the Self-Instruct diversity views (leading "
        "verbs and objects, ROUGE-L to the nearest seed, lengths, drops by reason); run directories "
        "get loss, eval-loss and throughput curves; `corral eval` results get win rates.",
    )
    report.add_argument(
        "inputs", nargs="+", metavar="RUN_OR_DATA", help="datasets, run dirs, eval JSON"
    )
    report.add_argument("--output", "-o", default="report.html", help="HTML file to write")
    report.add_argument(
        "--seed-tasks", type=Path, default=None, help="seed tasks for the nearest-seed ROUGE-L view"
    )
    report.set_defaults(func=_cmd_report)

    evaluation = sub.add_parser(
        "eval",
        help="answer an evaluation set with a base and a tuned model; ROUGE-L and a pairwise judge",
        description="Answers the evaluation set (Self-Instruct's user-oriented JSONL, or Alpaca "
        "records; evaluation only, never training) with --base and --tuned, reports ROUGE-L "
        "against the references and answer lengths, and with a judge the pairwise win rate, each "
        "pair judged in both orders to cancel position bias.",
    )
    evaluation.add_argument("--eval-set", required=True, type=Path, help="evaluation JSONL/JSON")
    evaluation.add_argument("--base", default="embedded", help="base model name or folder")
    evaluation.add_argument("--tuned", default=None, help="a training run directory (or model)")
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
    evaluation.set_defaults(func=_cmd_eval)

    from corral.demo import add_demo_arguments

    demo = sub.add_parser(
        "demo",
        help="run the whole pipeline on the embedded model and show what it does",
        description="Runs Corral end to end on the embedded model, on this machine.",
    )
    add_demo_arguments(demo)
    demo.set_defaults(func=_cmd_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except (RecordError, ConfigError, UsageError, ModelNotFoundError) as exc:
        print(f"corral: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("corral: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
