"""Serving throughput of `corral serve`: 8 concurrent streams against 1 stream, in the same run.

Starts `corral serve --model embedded` on a free 127.0.0.1 port, then drives it with the official
`openai` client: one streamed chat request at a time, then 8 at once. Every request generates
exactly `--max-tokens` tokens (EOS is suppressed with a logit bias), so the two settings do the
same work per request. Prints JSON: aggregate generated tokens/s for each, their ratio (the aim is
>= 4x: continuous batching shares each forward pass among the streams), and the median time to
first token.

    .venv/bin/python -m benchmarks.serve_throughput [--model embedded] [--max-tokens 64] [--dtype bfloat16]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import statistics
import sys
import time
from collections.abc import Iterator

import httpx
import openai

from corral.loopback import free_port, server_process

QUESTIONS = [
    "Write a short story about a lighthouse keeper.",
    "Explain how rainbows form.",
    "Describe a walk through a forest in autumn.",
    "Give advice to someone learning to cook.",
    "Summarize the history of the bicycle.",
    "Describe your ideal weekend.",
    "Explain why the sky is blue.",
    "Write a letter to a friend about a trip to the sea.",
]


@contextlib.contextmanager
def corral_serve(*serve_args: str) -> Iterator[str]:
    """`corral serve SERVE_ARGS` on a free port, without an API key; yields its base URL."""
    port = free_port()
    command = [sys.executable, "-m", "corral.cli", "serve", *serve_args, "--port", str(port)]
    env = {"TOKENIZERS_PARALLELISM": "false", "CORRAL_API_KEY": ""}
    with server_process(command, port, what="corral serve", env=env, timeout=300) as base:
        yield base


async def one_stream(
    client: openai.AsyncOpenAI, model: str, question: str, max_tokens: int, eos_id: int
) -> dict:
    started = time.perf_counter()
    first = None
    tokens = 0
    stream = await client.chat.completions.create(
        model=model,
        messages=[{"role": "user", "content": question}],
        max_tokens=max_tokens,
        temperature=0,
        logit_bias={str(eos_id): -100},
        stream=True,
        stream_options={"include_usage": True},
    )
    async for chunk in stream:
        if first is None and chunk.choices and chunk.choices[0].delta.content:
            first = time.perf_counter() - started
        if chunk.usage is not None:
            tokens = chunk.usage.completion_tokens
    return {"tokens": tokens, "ttft": first, "seconds": time.perf_counter() - started}


async def measure(
    base_url: str, model: str, concurrency: int, max_tokens: int, eos_id: int
) -> dict:
    client = openai.AsyncOpenAI(base_url=base_url, api_key="unused", max_retries=0, timeout=600)
    questions = [QUESTIONS[i % len(QUESTIONS)] for i in range(concurrency)]
    started = time.perf_counter()
    results = await asyncio.gather(
        *(one_stream(client, model, q, max_tokens, eos_id) for q in questions)
    )
    wall = time.perf_counter() - started
    tokens = sum(r["tokens"] for r in results)
    ttfts = [r["ttft"] for r in results if r["ttft"] is not None]
    await client.close()
    return {
        "streams": concurrency,
        "generated_tokens": tokens,
        "wall_seconds": round(wall, 3),
        "tokens_per_second": round(tokens / wall, 2),
        "median_ttft_seconds": round(statistics.median(ttfts), 3) if ttfts else None,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="embedded")
    parser.add_argument("--max-tokens", type=int, default=64, help="tokens generated per request")
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=2, help="alternating rounds of each setting")
    parser.add_argument(
        "--dtype",
        default="auto",
        choices=("auto", "float32", "bfloat16"),
        help="served weights (auto = fp32 on CPU); bfloat16 is much faster on CPUs with AMX",
    )
    args = parser.parse_args()

    from corral.models import load_tokenizer

    eos_id = load_tokenizer(args.model).eos_token_id
    serve_args = ["--model", args.model, "--max-batch-size", "16", "--dtype", args.dtype]
    with corral_serve(*serve_args) as base:
        base_url = f"{base}/v1"
        asyncio.run(measure(base_url, args.model, 1, 8, eos_id))  # warm up
        single, concurrent = [], []
        # Alternate the settings so a load change on a shared machine hits both alike.
        for _ in range(args.repeats):
            single.append(asyncio.run(measure(base_url, args.model, 1, args.max_tokens, eos_id)))
            concurrent.append(
                asyncio.run(
                    measure(base_url, args.model, args.concurrency, args.max_tokens, eos_id)
                )
            )
        engine = httpx.get(f"{base}/health", timeout=10).json()["engine"]

    def best(runs: list[dict]) -> dict:
        return max(runs, key=lambda r: r["tokens_per_second"])

    one, many = best(single), best(concurrent)
    report = {
        "benchmark": "serve_throughput",
        "model": args.model,
        "dtype": args.dtype,
        "max_tokens_per_request": args.max_tokens,
        "one_stream": one,
        f"{args.concurrency}_streams": many,
        "speedup": round(many["tokens_per_second"] / one["tokens_per_second"], 2),
        "target_speedup": 4.0,
        "median_ttft_seconds_concurrent": many["median_ttft_seconds"],
        "median_ttft_seconds_single": one["median_ttft_seconds"],
        "all_runs": {"one_stream": single, f"{args.concurrency}_streams": concurrent},
        "engine_max_batch_size_seen": engine["max_batch_size_seen"],
        "cpu_count": os.cpu_count(),
        "load_average_1m": os.getloadavg()[0],
    }
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
