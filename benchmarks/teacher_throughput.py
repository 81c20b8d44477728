"""Benchmark: OpenAI-compatible teacher throughput against a loopback server with fixed latency.

Usage: .venv/bin/python -m benchmarks.teacher_throughput [--requests 1600] [--concurrency 32] [--latency 0.1]

The server (tests/openai_test_server.py) runs in its own process on 127.0.0.1 and answers every
request after exactly `latency` seconds, so the best any client can do is concurrency / latency
requests per second (320 at 32 and 100 ms). The anchor is that bound, and a one-at-a-time client
(the official `openai` client called in a loop, as a plain script would) measured in the same run.
Prints JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from corral.data_gen.teachers import Completion, OpenAICompatibleTeacher, SamplingParams

REPO_ROOT = Path(__file__).resolve().parents[1]


def process_cpu_seconds(pid: int) -> float:
    """CPU time (user + system) of another process, from /proc (0.0 where unavailable)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return 0.0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=1600)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--latency", type=float, default=0.1)
    parser.add_argument("--api", choices=["chat", "completions"], default="chat")
    parser.add_argument("--sequential-requests", type=int, default=20)
    args = parser.parse_args()

    server = subprocess.Popen(
        [
            sys.executable,
            str(REPO_ROOT / "tests" / "openai_test_server.py"),
            "--latency",
            str(args.latency),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        base_url = server.stdout.readline().strip()
        prompts = [
            f"Come up with a series of tasks:\n\nTask 1: Item {i}\nTask 2:"
            for i in range(args.requests)
        ]
        params = SamplingParams(max_tokens=64, temperature=0.7)

        teacher = OpenAICompatibleTeacher(
            "canned-teacher", base_url=base_url, api=args.api, concurrency=args.concurrency
        )
        teacher.complete(prompts[: args.concurrency], params)  # open the connections
        started = time.perf_counter()
        cpu_started = time.process_time()
        server_cpu_started = process_cpu_seconds(server.pid)
        results = teacher.complete(prompts, params)
        elapsed = time.perf_counter() - started
        client_cpu = time.process_time() - cpu_started
        server_cpu = process_cpu_seconds(server.pid) - server_cpu_started
        teacher.close()
        ok = sum(isinstance(r, Completion) for r in results)

        # Anchor measured in the same run: the official client, one request at a time.
        from openai import OpenAI

        client = OpenAI(base_url=base_url, api_key="not-needed")
        started = time.perf_counter()
        for prompt in prompts[: args.sequential_requests]:
            client.chat.completions.create(
                model="canned-teacher",
                messages=[{"role": "user", "content": prompt}],
                max_tokens=64,
            )
        sequential_s = time.perf_counter() - started
        client.close()
    finally:
        server.terminate()
        server.wait(timeout=10)

    bound = args.concurrency / args.latency
    rate = ok / elapsed
    print(
        json.dumps(
            {
                "benchmark": "teacher_throughput",
                "api": args.api,
                "requests": args.requests,
                "succeeded": ok,
                "concurrency": args.concurrency,
                "server_latency_s": args.latency,
                "seconds": round(elapsed, 2),
                "requests_per_second": round(rate, 1),
                "bound_requests_per_second": round(bound, 1),
                "fraction_of_bound": round(rate / bound, 3),
                "meets_80_percent": rate >= 0.8 * bound,
                "sequential_requests_per_second": round(args.sequential_requests / sequential_s, 1),
                "speedup_vs_sequential": round(rate / (args.sequential_requests / sequential_s), 1),
                "client_cpu_ms_per_request": round(1000 * client_cpu / args.requests, 2),
                "server_cpu_ms_per_request": round(1000 * server_cpu / args.requests, 2),
                "retries": teacher.stats.retries,
                "request_errors": teacher.stats.errors,
                "load_average_1min": round(os.getloadavg()[0], 2),
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
