"""`corral serve` against vLLM's CPU build: the same model folder, prompts, dtype and load, one run.

Each server in turn (two cores cannot host both at once) serves the embedded model in fp32 and
answers streamed chat requests from the official `openai` client at 1, 8 and 32 concurrent
streams; every request generates exactly `--max-tokens` tokens (EOS suppressed with a logit bias,
which both servers honour), so both do the same work. Each setting is measured `--repeats` times
and the best kept. Both run with their own default CPU layout: vLLM puts the model on one core and
its API server on the other; Corral decodes on one thread fewer than torch has and prefills on all
of them, beside its event loop. Prints JSON: aggregate generated tokens/s and median time to first
token per server and load, and Corral's ratio to vLLM. Needs .venv-vllm (`make vllm-env`);
without it, vLLM is skipped with the reason.

    .venv/bin/python -m benchmarks.serve_vs_vllm [--max-tokens 64] [--streams 1 8 32] [--repeats 2]
        [--dtype float32|bfloat16]

`--dtype bfloat16` runs both servers in bf16 (on CPUs with native bf16 it halves the bytes each
decode step reads; the default fp32 is the like-for-like comparison of the engines).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
from pathlib import Path

from benchmarks.serve_throughput import corral_serve, measure
from corral.loopback import vllm_missing, vllm_server

REPO = Path(__file__).resolve().parents[1]
VLLM_PYTHON = REPO / ".venv-vllm" / "bin" / "python"  # built by `make vllm-env`


SERVED_NAME = "embedded"


def run_load(base: str, streams: list[int], max_tokens: int, repeats: int, eos_id: int) -> dict:
    url = f"{base}/v1"
    asyncio.run(measure(url, SERVED_NAME, 1, 8, eos_id))  # warm up
    best: dict[int, dict] = {}
    for _ in range(repeats):
        for count in streams:
            result = asyncio.run(measure(url, SERVED_NAME, count, max_tokens, eos_id))
            if count not in best or result["tokens_per_second"] > best[count]["tokens_per_second"]:
                best[count] = result
    return {"load_average_1m": round(os.getloadavg()[0], 2), **{str(k): v for k, v in best.items()}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--max-tokens", type=int, default=64, help="tokens generated per request")
    parser.add_argument("--streams", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    args = parser.parse_args()

    from corral.models import load_tokenizer, prepare_embedded

    folder = prepare_embedded()
    eos_id = load_tokenizer(str(folder)).eos_token_id
    report: dict = {
        "benchmark": "serve_vs_vllm",
        "model": str(folder),
        "dtype": args.dtype,
        "max_tokens_per_request": args.max_tokens,
        "api": "chat.completions, streamed",
        "cpu_count": os.cpu_count(),
    }
    # The same chat template for both: the folder's own (Corral's `chat` template renders it too).
    with corral_serve(
        "--model", str(folder), "--template", "chat", "--dtype", args.dtype,
        "--served-model-name", SERVED_NAME, "--max-batch-size", str(max(args.streams)),
    ) as base:  # fmt: skip
        report["corral"] = run_load(base, args.streams, args.max_tokens, args.repeats, eos_id)
    missing = vllm_missing(VLLM_PYTHON)
    if missing is not None:
        report["vllm"] = {"skipped": missing}
    else:
        # The later --dtype wins over the float32 in the test environment's flags.
        with vllm_server(
            VLLM_PYTHON, folder, "--served-model-name", SERVED_NAME, "--dtype", args.dtype
        ) as base:
            report["vllm"] = run_load(base, args.streams, args.max_tokens, args.repeats, eos_id)
        report["corral_vs_vllm_tokens_per_second"] = {
            str(n): round(
                report["corral"][str(n)]["tokens_per_second"]
                / report["vllm"][str(n)]["tokens_per_second"],
                2,
            )
            for n in args.streams
        }
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
