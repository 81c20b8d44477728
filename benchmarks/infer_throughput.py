"""`corral infer` throughput: continuous batching against fixed chunks, in the same run.

64 instructions whose answers range from a few tokens to the length limit, answered greedily by
the embedded model at batch size 8, two ways:

- Corral: `run_batch_inference`, which hands every record to the continuous-batching engine; a
  finished answer's slot goes to the next record at once;
- anchor: fixed chunks of 8 records, each chunk generated to its longest answer before the next
  starts (how `corral infer` worked before, and how a plain batched `generate` loop works).

Both use the same engine, model, prompts and settings, on one intra-op thread. Prints JSON:
generated tokens/s, decode steps and wall time for each, their ratio, and how many answers agree.

    .venv/bin/python -m benchmarks.infer_throughput [--records 64] [--batch-size 8] [--max-new-tokens 128]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from corral.data_gen.config import DEFAULT_SEED_TASKS

from corral.records import read_alpaca, read_seed_tasks, write_alpaca

REPO = Path(__file__).resolve().parents[1]


SHARED_SEEDS = REPO.parent / "shared" / "data" / "self-instruct" / "seed_tasks.jsonl"


def instructions(count: int) -> list[dict[str, str]]:
    """Seed-task instructions (with their inputs): short answers and long ones mixed."""
    source = SHARED_SEEDS if SHARED_SEEDS.is_file() else DEFAULT_SEED_TASKS
    seeds = read_seed_tasks(source)
    records = [{"instruction": s.instruction, "input": s.instances[0]["input"]} for s in seeds] * (
        count // len(seeds) + 1
    )
    return records[:count]


def fixed_chunks(loaded, records, params, batch_size) -> tuple[list[str], int, int, float]:
    """The anchor: chunk after chunk, each waiting for its longest answer."""
    from corral.inference.generation import answer_records

    engine = loaded.make_engine(batch_size)
    # The same order `corral infer` uses: shortest prompts first.
    order = sorted(
        range(len(records)),
        key=lambda i: len(records[i]["instruction"]) + len(records[i]["input"]),
    )
    answers: dict[int, str] = {}
    tokens = 0
    started = time.perf_counter()
    for start in range(0, len(order), batch_size):
        chunk = order[start : start + batch_size]
        for index, answer in zip(
            chunk, answer_records(loaded, engine, [records[i] for i in chunk], params), strict=True
        ):
            answers[index] = answer.text
            tokens += answer.completion_tokens
    seconds = time.perf_counter() - started
    return [answers[i] for i in range(len(records))], tokens, engine.stats.decode_steps, seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="embedded")
    parser.add_argument("--records", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, default=128)
    args = parser.parse_args()

    import torch
    from corral.inference.batch import run_batch_inference
    from corral.inference.generation import templated_params
    from corral.inference.loading import load_for_inference

    torch.set_num_threads(1)
    loaded = load_for_inference(args.model, template="alpaca")
    params = templated_params(loaded, max_new_tokens=args.max_new_tokens)
    records = instructions(args.records)

    anchor_answers, anchor_tokens, anchor_steps, anchor_seconds = fixed_chunks(
        loaded, records, params, args.batch_size
    )
    with tempfile.TemporaryDirectory() as tmp:
        source, output = Path(tmp) / "in.json", Path(tmp) / "out.json"
        write_alpaca(source, records)
        summary = run_batch_inference(
            loaded, source, output, params, batch_size=args.batch_size, progress=False
        )
        corral_answers = [r["output"] for r in read_alpaca(output)]

    corral_rate = summary.generated_tokens / summary.seconds
    anchor_rate = anchor_tokens / anchor_seconds
    print(
        json.dumps(
            {
                "benchmark": "infer_throughput",
                "model": args.model,
                "records": len(records),
                "batch_size": args.batch_size,
                "max_new_tokens": args.max_new_tokens,
                "threads": 1,
                "corral_continuous": {
                    "tokens_per_s": round(corral_rate, 1),
                    "generated_tokens": summary.generated_tokens,
                    "decode_steps": summary.decode_steps,
                    "seconds": round(summary.seconds, 2),
                    "stopped_for_length": summary.stopped_for_length,
                },
                "anchor_fixed_chunks": {
                    "tokens_per_s": round(anchor_rate, 1),
                    "generated_tokens": anchor_tokens,
                    "decode_steps": anchor_steps,
                    "seconds": round(anchor_seconds, 2),
                },
                "speedup": round(corral_rate / anchor_rate, 2),
                "identical_answers": sum(
                    a == b for a, b in zip(corral_answers, anchor_answers, strict=True)
                ),
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
