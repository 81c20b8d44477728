"""`corral infer`, `corral chat` and `corral serve`.

Only argparse and light modules at the top: torch and transformers load when a command runs.
"""

from __future__ import annotations

import argparse
import os
import sys

from corral.templates import TEMPLATE_NAMES

API_KEY_ENV = "CORRAL_API_KEY"
DTYPE_CHOICES = ("auto", "float32", "bfloat16", "float16")


def torch_dtype(name: str | None):
    """The torch dtype called `name`; None (the device's default) for auto or unset."""
    if name in (None, "auto"):
        return None
    import torch

    return getattr(torch, name)


def _prefer_passive_threads() -> None:
    """Let OpenMP threads sleep instead of spin while they wait (set before torch loads).

    A decode step is many small parallel regions; on a CPU shared with other processes, spinning
    threads starve each other and generation slows down by an order of magnitude (measured here:
    ~1 vs ~12 tokens/s on two busy cores). Set OMP_WAIT_POLICY=ACTIVE to opt out.
    """
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


def _add_model_arguments(parser: argparse.ArgumentParser, *, required: bool = True) -> None:
    source = parser.add_mutually_exclusive_group(required=required)
    source.add_argument(
        "--model", help="embedded, tiny-random, a model folder (merged models too) or a hub id"
    )
    source.add_argument(
        "--run", help="a training run directory: base + adapter, used with its recorded template"
    )
    parser.add_argument(
        "--template",
        choices=TEMPLATE_NAMES,
        help="prompt template for --model (default: chat when the tokenizer has one, else alpaca); "
        "a --run always uses the template it was trained with",
    )
    parser.add_argument(
        "--quantization", choices=("nf4",), help="load the weights in 4 bits (bitsandbytes)"
    )
    parser.add_argument(
        "--dtype",
        choices=DTYPE_CHOICES,
        help="weight dtype (default auto: bf16 on GPUs that support it, fp32 on CPU); bfloat16 "
        "also pays off on CPUs with AMX or AVX512-BF16",
    )


def _add_sampling_arguments(
    parser: argparse.ArgumentParser, *, max_new_tokens: int, temperature: float
) -> None:
    parser.add_argument(
        "--max-new-tokens",
        type=int,
        default=max_new_tokens,
        help=f"answer length limit in tokens (default {max_new_tokens})",
    )
    parser.add_argument(
        "--temperature",
        type=float,
        default=temperature,
        help=f"0 is greedy (default {temperature})",
    )
    parser.add_argument(
        "--top-p", type=float, default=1.0, help="nucleus sampling mass (default 1.0: off)"
    )
    parser.add_argument(
        "--top-k", type=int, default=0, help="sample among the k likeliest tokens (default 0: off)"
    )
    parser.add_argument(
        "--stop", action="append", default=[], metavar="TEXT", help="stop sequence (repeatable)"
    )
    parser.add_argument("--seed", type=int, help="sampling seed, for reproducible sampled answers")


def _load(args: argparse.Namespace):
    from corral.inference.loading import load_for_inference

    return load_for_inference(
        args.model,
        run=args.run,
        template=args.template,
        quantization=args.quantization,
        dtype=torch_dtype(args.dtype),
    )


def _params(args: argparse.Namespace, loaded):
    from corral.inference.generation import templated_params

    from corral.errors import UsageError

    try:
        return templated_params(
            loaded,
            max_new_tokens=args.max_new_tokens,
            temperature=args.temperature,
            top_p=args.top_p,
            top_k=args.top_k,
            stop=tuple(args.stop),
            seed=args.seed,
        )
    except ValueError as exc:
        raise UsageError(str(exc)) from None


def _check_sampling(args: argparse.Namespace) -> None:
    """Reject bad sampling flags before spending seconds on loading the model."""
    from corral.inference.params import SamplingParams

    from corral.errors import UsageError

    try:
        SamplingParams(
            max_new_tokens=args.max_new_tokens,
            temperature=args.temperature,
            top_p=args.top_p,
            top_k=args.top_k,
        )
    except ValueError as exc:
        raise UsageError(str(exc)) from None


def run_infer(args: argparse.Namespace) -> int:
    _prefer_passive_threads()
    from corral.errors import UsageError
    from corral.fileio import check_output_path
    from corral.records import read_alpaca

    _check_sampling(args)
    if args.batch_size < 1:
        raise UsageError("--batch-size must be at least 1")
    # Bad input, or an output that cannot be written, fails before torch even loads.
    read_alpaca(args.input, require_output=False)
    check_output_path(args.output, inputs=(args.input,))
    from corral.inference.batch import run_batch_inference

    loaded = _load(args)
    params = _params(args, loaded)
    summary = run_batch_inference(
        loaded, args.input, args.output, params, batch_size=args.batch_size, progress=not args.quiet
    )
    print(
        f"wrote {summary.records} records to {args.output} "
        f"({summary.answered_now} answered now, {summary.resumed} resumed; "
        f"{summary.end_marker_found} ended with the end marker, {summary.stopped_for_length} hit the length limit; "
        f"{summary.generated_tokens} tokens in {summary.seconds:.1f} s)"
    )
    return 0


def run_chat_command(args: argparse.Namespace) -> int:
    _prefer_passive_threads()
    from corral.inference.chat import run_chat

    _check_sampling(args)
    loaded = _load(args)
    return run_chat(loaded, _params(args, loaded), system_prompt=args.system)


def run_serve(args: argparse.Namespace) -> int:
    # No passive OpenMP waiting here: the server decodes on one core fewer than it has, so its
    # threads do not compete with the event loop, and prefills gain from threads that spin.
    import torch
    import uvicorn
    from corral.inference.loading import load_for_inference
    from corral.inference.serve_config import ServeConfig
    from corral.inference.server import build_server

    from corral.config import load_config
    from corral.errors import UsageError

    config = load_config(
        ServeConfig,
        args.config,
        args.overrides,
        model=args.model,
        run=args.run,
        template=args.template,
        served_model_name=args.served_model_name,
        host=args.host,
        port=args.port,
        api_key=args.api_key,
        quantization=args.quantization,
        dtype=args.dtype,
        max_batch_size=args.max_batch_size,
    )
    if (config.model is None) == (config.run is None):
        raise UsageError("give exactly one of --model or --run (or set one in the config file)")
    api_key = config.api_key or os.environ.get(API_KEY_ENV) or None
    # The engine computes on its own thread. Once a second thread has run torch's parallel
    # regions, OpenMP counts more busy threads than cores and puts the engine's workers to sleep
    # between regions (prefills measured 40% slower): this thread loads on one.
    cores = torch.get_num_threads()
    torch.set_num_threads(1)
    loaded = load_for_inference(
        config.model,
        run=config.run,
        template=config.template,
        quantization=config.quantization,
        dtype=torch_dtype(config.dtype),
    )
    app = build_server(
        loaded,
        model_name=config.served_model_name,
        api_key=api_key,
        max_batch_size=config.max_batch_size,
        default_max_tokens=config.default_max_tokens,
        max_request_bytes=config.max_request_bytes,
        threads=config.threads,
        cores=cores,
    )
    name = config.served_model_name or loaded.name
    print(
        f"serving {name} (template {loaded.template.name}, context {loaded.context_length}) on "
        f"http://{config.host}:{config.port}/  (API key {'required' if api_key else 'not required'})",
        file=sys.stderr,
        flush=True,
    )
    note = loaded.run_info.beyond_training_note(loaded.context_length) if loaded.run_info else None
    if note:
        print(f"warning: {name}: {note}", file=sys.stderr, flush=True)
    uvicorn.run(
        app, host=config.host, port=config.port, log_level="warning", timeout_graceful_shutdown=5
    )
    return 0


def _serve_epilog() -> str:
    from corral.inference.serve_config import ServeConfig

    from corral.config import config_help

    return "config keys (key=default: help):\n" + config_help(ServeConfig)


def register(subparsers: argparse._SubParsersAction) -> None:
    infer = subparsers.add_parser(
        "infer",
        help="answer every instruction of an Alpaca file (batched, resumable)",
        description="Read Alpaca records (JSON or JSONL), answer each instruction with the model, and "
        "write the same records with `output` filled. Progress is saved to OUTPUT.partial.jsonl, so "
        "rerunning the same command after an interruption resumes.",
    )
    _add_model_arguments(infer)
    infer.add_argument(
        "--input", required=True, help="Alpaca JSON/JSONL file (output may be absent)"
    )
    infer.add_argument(
        "--output", required=True, help="where to write the answered records (.json or .jsonl)"
    )
    infer.add_argument(
        "--batch-size", type=int, default=8, help="instructions generated together (default 8)"
    )
    infer.add_argument("--quiet", action="store_true", help="no progress bar")
    _add_sampling_arguments(infer, max_new_tokens=256, temperature=0.0)
    infer.set_defaults(func=run_infer)

    chat = subparsers.add_parser(
        "chat",
        help="chat with a model or a run in the terminal (streams tokens)",
        description="A terminal chat that streams the answer as it is generated. Multi-turn through the "
        "chat template where the model has one. /reset starts over, /exit leaves.",
    )
    _add_model_arguments(chat)
    chat.add_argument("--system", help="system prompt")
    _add_sampling_arguments(chat, max_new_tokens=256, temperature=0.7)
    chat.set_defaults(func=run_chat_command)

    serve = subparsers.add_parser(
        "serve",
        help="serve a model or a run over an OpenAI-compatible HTTP API with a chat page",
        description="OpenAI-compatible server: GET /v1/models, POST /v1/chat/completions and "
        "/v1/completions (with stream), GET /health, and a chat page at /. Concurrent requests are "
        f"batched together. The API key comes from --api-key or ${API_KEY_ENV}.",
        epilog=_serve_epilog(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _add_model_arguments(serve, required=False)
    serve.add_argument("--config", help="YAML preset (configs/serve/*.yaml)")
    serve.add_argument("--host", help="address to listen on (default 127.0.0.1)")
    serve.add_argument("--port", type=int, help="port (default 8000)")
    serve.add_argument("--api-key", help=f"require this bearer token (or set ${API_KEY_ENV})")
    serve.add_argument(
        "--served-model-name", help="the model id clients use (default: model or run name)"
    )
    serve.add_argument(
        "--max-batch-size", type=int, help="requests generated together (default 16)"
    )
    serve.add_argument("overrides", nargs="*", metavar="key=value", help="override any config key")
    serve.set_defaults(func=run_serve)
