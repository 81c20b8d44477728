"""`corral train` and `corral export`; `train.py` calls `main` here.

Only argparse and light modules at the top: torch and transformers load when a command runs.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from typing import Any

from corral.errors import CorralError, UsageError

TRAIN_DESCRIPTION = (
    "Fine-tune a model on Alpaca JSON/JSONL with LoRA, QLoRA or full weights. Runs the same "
    "under `accelerate launch train.py --config FILE [key=value ...]` (DDP, FSDP, DeepSpeed from "
    "the accelerate config). The resolved config is printed and saved in the run directory."
)


def add_train_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", help="YAML preset (configs/training/*.yaml)")
    parser.add_argument(
        "overrides",
        nargs="*",
        metavar="key=value",
        help="override any config key, e.g. output_dir=runs/x lr_scheduler=linear",
    )


def _train_epilog() -> str:
    from corral.training.config import TrainConfig

    from corral.config import config_help

    return "config keys (key=default: help):\n" + config_help(TrainConfig)


def load_train_config(config_path: str | None, overrides: list[str]):
    from corral.training.config import TrainConfig

    from corral.config import load_config

    return load_config(TrainConfig, config_path, overrides)


def run_train(args: argparse.Namespace, callbacks: Sequence[Any] = ()) -> int:
    """Train from parsed arguments; exit status 0, or 143 after a SIGTERM checkpoint.

    `callbacks` (training/callbacks.py) watch the run: scripts/gpu_check.py measures with them.
    """
    from corral.training.loop import NonFiniteLossError, TrainingStopped, train

    config = load_train_config(args.config, args.overrides)
    try:
        train(config, callbacks)
    except TrainingStopped as stopped:
        print(f"corral: {stopped}", file=sys.stderr)
        return 143
    except NonFiniteLossError as exc:
        print(f"corral: error: {exc}", file=sys.stderr)
        return 1
    return 0


def run_export(args: argparse.Namespace) -> int:
    if args.gguf is None:
        if args.merge is None:
            raise UsageError("give --merge OUT, --gguf OUT.gguf, or both")
        from corral.training.export import merge_run

        print(merge_run(args.run, args.merge, dtype=args.dtype))
        return 0
    from corral.training.gguf import MODELFILE_NAME, export_gguf

    out = export_gguf(
        args.run, args.gguf, gguf_type=args.gguf_type, merge_dir=args.merge, dtype=args.dtype
    )
    if args.merge is not None:
        print(args.merge)
    print(out.parent / MODELFILE_NAME)
    print(out)
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    train = subparsers.add_parser(
        "train",
        help="fine-tune a model on Alpaca data (LoRA, QLoRA, full)",
        description=TRAIN_DESCRIPTION,
        epilog=_train_epilog(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_train_arguments(train)
    train.set_defaults(func=run_train)

    export = subparsers.add_parser(
        "export",
        help="merge a run's adapter into its base: a plain HF model, a GGUF file, or both",
        description="Merge the LoRA/QLoRA adapter of run directory RUN into its base model (loaded "
        "unquantized in 16/32-bit, also for QLoRA) and save a plain transformers model with the "
        "run's tokenizer and record (run_info.json: template and markers) to OUT; every corral "
        "command then prompts it as it was trained. --gguf writes the merged model as one GGUF "
        "file for llama.cpp and Ollama (the run's chat template in its metadata) and an Ollama "
        "Modelfile beside it; RUN may also be a merged export or a full fine-tune there.",
    )
    export.add_argument(
        "run", metavar="RUN", help="a training run directory (or, for --gguf, a model folder)"
    )
    export.add_argument("--merge", metavar="OUT", help="folder for the merged model")
    export.add_argument(
        "--gguf",
        metavar="OUT.gguf",
        help="GGUF file for llama.cpp/Ollama; a Modelfile is written beside it",
    )
    export.add_argument(
        "--gguf-type",
        choices=("f32", "f16", "q8_0"),
        default="f16",
        help="GGUF weight type (default f16; norms stay f32)",
    )
    export.add_argument(
        "--dtype",
        choices=("float32", "bfloat16", "float16"),
        default="float32",
        help="weights dtype of the merged model (default float32)",
    )
    export.set_defaults(func=run_export)


def main(argv: list[str] | None = None, callbacks: Sequence[Any] = ()) -> int:
    """Entry of the root train.py: same arguments and errors as `corral train`."""
    parser = argparse.ArgumentParser(
        prog="train.py",
        description=TRAIN_DESCRIPTION,
        epilog=_train_epilog(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_train_arguments(parser)
    args = parser.parse_args(argv)
    try:
        return run_train(args, callbacks)
    except CorralError as exc:
        # Every process of a launch meets the same error; one of them says it.
        if int(os.environ.get("RANK") or 0) == 0:
            print(f"train.py: error: {exc}", file=sys.stderr)
        return 2
