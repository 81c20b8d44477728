"""The `corral` command line.

The orchestration layer: nothing imports it. Subcommands of the stages live beside their code
(`data_gen/commands.py`, `training/commands.py`, `inference/commands.py`,
`evaluation/commands.py`), each exposing `register(subparsers)`. Those modules import only argparse
at module level; the heavy frameworks load when a subcommand actually runs, so `corral --help` and
cache hits stay fast.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import sys

from corral.cli.demo import add_demo_arguments, run_demo
from corral.errors import CorralError

# Stage modules that add subcommands, in the order they appear in --help.
STAGE_COMMAND_MODULES = (
    "corral.data_gen.commands",
    "corral.training.commands",
    "corral.inference.commands",
    "corral.evaluation.commands",
    "corral.evaluation.data_commands",
)


def _cmd_model_prepare(args: argparse.Namespace) -> int:
    from corral.models import resolve_model

    print(resolve_model(args.name))
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
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
    except CorralError as exc:
        print(f"corral: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("corral: interrupted", file=sys.stderr)
        return 130
