"""`corral generate` and `corral dedup`.

`corral --help` imports this module: at the top only what it loads anyway (configs, errors,
files); the pipelines, and the frameworks behind them, are imported by the commands that run them.
"""

from __future__ import annotations

import argparse
import sys

from corral.data_gen.config import GenerateConfig

from corral.config import config_help, load_config
from corral.errors import UsageError
from corral.fileio import atomic_write_text, check_output_path, exclusive_output

GENERATE_DESCRIPTION = """\
Generate Alpaca-format instruction data from seed tasks with a teacher model.

Modes: `alpaca` (Stanford Alpaca: each request asks for a list of complete tasks) and
`self-instruct` (Wang et al.: bootstrap instructions, classify them, generate instances);
`magpie` (the teacher writes the questions itself from its chat template's text before a user's
message, then answers them) and `evol` (Evol-Instruct: seed instructions rewritten harder or
broader over several generations).
The teacher is a local transformers model (`embedded` by default) or any OpenAI-compatible
endpoint (--base-url; the key comes from $OPENAI_API_KEY or api_key_env).

The run is journaled next to --output; re-running the same command resumes it. Every other
setting is a config key: give a preset with --config and override with key=value.

Presets: configs/data_gen/alpaca.yaml, self_instruct.yaml, magpie.yaml and evol.yaml (the papers'
settings, for an endpoint), embedded_demo.yaml (the small embedded model on a CPU, a few minutes).
"""

MAX_ESTIMATE_PROBES = 100

DEDUP_DESCRIPTION = """\
Drop near-duplicate instructions from an Alpaca file with the ROUGE-L novelty filter: a record is
kept if its instruction's ROUGE-L F-measure against every earlier kept instruction is at most the
threshold. The first of near-duplicates is kept, in file order.
"""


def register(subparsers: argparse._SubParsersAction) -> None:
    gen = subparsers.add_parser(
        "generate",
        help="generate Alpaca data from seed tasks with a teacher (alpaca or self-instruct)",
        description=GENERATE_DESCRIPTION,
        epilog="config keys (set in --config YAML or as key=value):\n"
        + config_help(GenerateConfig),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    gen.add_argument("--config", help="YAML preset, e.g. configs/data_gen/alpaca.yaml")
    gen.add_argument(
        "--mode",
        choices=["alpaca", "self-instruct", "conversations", "preferences", "magpie", "evol"],
        help="generation method (conversations: multi-turn self-chat, ShareGPT output; "
        "preferences: judged answer pairs for DPO, from preference_prompts=FILE; magpie: the "
        "teacher writes the questions from its chat template; evol: Evol-Instruct rewrites)",
    )
    gen.add_argument(
        "--seed-tasks", dest="seed_tasks", metavar="PATH", help="seed tasks JSONL/JSON"
    )
    gen.add_argument(
        "--num-instructions",
        dest="num_instructions",
        type=int,
        metavar="N",
        help="how many new instructions to keep",
    )
    gen.add_argument("--output", metavar="PATH", help="the Alpaca JSON to write")
    gen.add_argument(
        "--eval-set",
        dest="eval_set",
        metavar="PATH",
        help="evaluation set to keep out of the data (near or 13-gram matches are dropped)",
    )
    gen.add_argument("--teacher", choices=["local", "openai"], help="local model or endpoint")
    gen.add_argument("--model", help="teacher model name, folder, or endpoint model id")
    gen.add_argument("--base-url", dest="base_url", help="OpenAI-compatible endpoint URL")
    gen.add_argument(
        "--api",
        choices=["chat", "completions", "batch"],
        help="endpoint API: chat, completions, or batch (OpenAI's Batch API, half price)",
    )
    gen.add_argument("--concurrency", type=int, help="requests in flight at once")
    gen.add_argument(
        "--overwrite",
        action="store_true",
        help="discard an existing journal and output instead of resuming",
    )
    gen.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
    gen.add_argument(
        "--estimate",
        action="store_true",
        help="send a few probe requests and print the run's requests, tokens, time and cost "
        "(saved as OUTPUT.estimate.json; the run's manifest later sets the actual figures beside "
        "it); generates nothing",
    )
    gen.add_argument(
        "--estimate-probes",
        type=int,
        default=4,
        metavar="N",
        help=f"probe requests (default 4, at most {MAX_ESTIMATE_PROBES}: each is paid)",
    )
    gen.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides")
    gen.set_defaults(func=run_generate)

    dedup = subparsers.add_parser(
        "dedup",
        help="drop near-duplicate instructions from an Alpaca file (ROUGE-L)",
        description=DEDUP_DESCRIPTION,
    )
    dedup.add_argument("input", help="Alpaca JSON or JSONL")
    dedup.add_argument("--output", required=True, help="where to write the kept records")
    dedup.add_argument(
        "--threshold",
        type=float,
        default=0.7,
        help="drop when ROUGE-L F-measure exceeds this (default 0.7)",
    )
    dedup.add_argument("--quiet", action="store_true", help="do not list the dropped records")
    dedup.set_defaults(func=run_dedup)


def run_generate(args: argparse.Namespace) -> int:
    from corral.data_gen.journal import FingerprintMismatch
    from corral.data_gen.pipeline import GenerationError, format_summary, generate_dataset
    from corral.data_gen.teachers import TeacherError

    config = load_config(
        GenerateConfig,
        args.config,
        args.overrides,
        mode=args.mode,
        seed_tasks=args.seed_tasks,
        eval_set=args.eval_set,
        num_instructions=args.num_instructions,
        output=args.output,
        teacher=args.teacher,
        model=args.model,
        base_url=args.base_url,
        api=args.api,
        concurrency=args.concurrency,
    )
    if config.mode == "magpie":
        from corral.data_gen.methods import check_magpie_teacher

        check_magpie_teacher(config)  # refuses, saying why, before any request or file
    if config.mode == "preferences":
        if args.estimate:
            raise UsageError("--estimate covers the alpaca, self-instruct and conversations modes")
        return _preferences(config, args.progress, args.overwrite)
    if args.estimate:
        return _estimate(config, args.estimate_probes)
    try:
        result = generate_dataset(config, progress=args.progress, overwrite=args.overwrite)
    except FingerprintMismatch as exc:
        raise UsageError(
            f"{config.output}: an earlier run with different settings left its journal ({exc}); "
            "re-run with --overwrite to start over, or choose another --output"
        ) from None
    except (TeacherError, GenerationError) as exc:
        raise UsageError(str(exc)) from None
    print(format_summary(result))
    return 0


def _preferences(config, progress: bool, overwrite: bool) -> int:
    from corral.data_gen.journal import FingerprintMismatch
    from corral.data_gen.preferences import generate_preferences, judgments_path
    from corral.data_gen.teachers import TeacherError

    try:
        manifest = generate_preferences(config, progress=progress, overwrite=overwrite)
    except FingerprintMismatch as exc:
        raise UsageError(
            f"{config.output}: an earlier run with different settings left its journal ({exc}); "
            "re-run with --overwrite to start over, or choose another --output"
        ) from None
    except TeacherError as exc:
        raise UsageError(str(exc)) from None
    counts = manifest["counts"]
    dropped = ", ".join(f"{k} {v}" for k, v in counts["dropped"].items()) or "none"
    print(
        f"Judged {counts['candidates']} prompts -> {counts['records']} preference pairs "
        f"(not kept: {dropped})\n  output     {manifest['output']}\n  judgments  "
        f"{judgments_path(manifest['output'])}"
    )
    return 0


def _estimate(config, probes: int) -> int:
    import json

    from corral.data_gen.manifest import estimate_path
    from corral.data_gen.pipeline import estimate_generation, format_estimate
    from corral.data_gen.teachers import TeacherError

    if not 1 <= probes <= MAX_ESTIMATE_PROBES:
        raise UsageError(
            f"--estimate-probes must be within 1..{MAX_ESTIMATE_PROBES}, got {probes}: each probe "
            "is a paid request, and past ~100 the estimate's spread (about 1/sqrt(probes)) "
            "hardly narrows; the run's manifest records the actual figures"
        )
    path = check_output_path(estimate_path(config.output), inputs=(config.seed_tasks_path(),))
    try:
        estimate = estimate_generation(config, probes=probes)
    except TeacherError as exc:
        raise UsageError(str(exc)) from None
    atomic_write_text(path, json.dumps(estimate, indent=2) + "\n")
    print(format_estimate(estimate))
    print(f"estimate written to {path}")
    return 0


def run_dedup(args: argparse.Namespace) -> int:
    if not 0.0 <= args.threshold <= 1.0:
        raise UsageError(f"--threshold must be within [0, 1], got {args.threshold}")
    check_output_path(args.output, inputs=(args.input,))
    with exclusive_output(args.output):
        return _dedup(args)


def _dedup(args: argparse.Namespace) -> int:
    from corral.records import read_alpaca, write_alpaca
    from corral.rouge import RougeNoveltyIndex

    records = read_alpaca(args.input, require_output=False)
    index = RougeNoveltyIndex(args.threshold)
    kept = []
    dropped = 0
    for i, record in enumerate(records):
        decision = index.add_if_novel(record["instruction"])
        if decision.novel:
            kept.append(record)
            continue
        dropped += 1
        if not args.quiet:
            nearest = (
                index.texts[decision.nearest_index] if decision.nearest_index is not None else ""
            )
            print(
                f"drop record {i} (ROUGE-L {decision.max_fmeasure:.3f}): {record['instruction']!r}"
                f"\n    near: {nearest!r}"
            )
    write_alpaca(args.output, kept)
    print(
        f"kept {len(kept)} of {len(records)} records, dropped {dropped} near-duplicates "
        f"(ROUGE-L > {args.threshold}) -> {args.output}",
        file=sys.stderr if args.quiet else sys.stdout,
    )
    return 0
