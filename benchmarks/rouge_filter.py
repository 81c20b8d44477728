"""Benchmark: the ROUGE-L novelty filter on 52K instructions, against the reference loop.

Usage: .venv/bin/python -m benchmarks.rouge_filter [--count 52000] [--subsample 1000] [--seed-tasks PATH]

No 52K-instruction file exists here, so realistic instructions are synthesized from the seed
instructions: fragments of three seeds recombined, with some words swapped for seed vocabulary
(most end up novel, as in a real run, so the kept set grows to tens of thousands).

Measured in the same run and printed as JSON:
- Corral's `RougeNoveltyIndex` over all instructions (seeds pre-loaded), wall time;
- the reference loop (rouge_score's LCS F-measure against every kept instruction, one candidate
  at a time, as Stanford Alpaca does minus its per-candidate process pool) on the first `subsample`
  candidates, with identical decisions required, and the speed ratio on that subsample;
- spot checks of the full run: randomly chosen candidates re-decided by rouge_score against the
  exact kept set they met;
- the reference's extrapolated time for the full run (its measured cost per pair times the pairs
  the full run implies).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import time
from pathlib import Path

from corral.data_gen.config import DEFAULT_SEED_TASKS

from corral.records import read_seed_tasks
from corral.rouge import RougeNoveltyIndex

REPO_ROOT = Path(__file__).resolve().parents[1]


SHARED_SEEDS = REPO_ROOT.parent / "shared" / "data" / "self-instruct" / "seed_tasks.jsonl"


def synthesize(seeds: list[str], count: int, rng: random.Random) -> list[str]:
    vocabulary = sorted({w.strip(".,?!:;\"'()").lower() for s in seeds for w in s.split()} - {""})
    split = [s.split() for s in seeds]
    out = []
    for _ in range(count):
        a, b, c = rng.choice(split), rng.choice(split), rng.choice(split)
        start = rng.randint(0, max(0, len(b) - 3))
        words = a[: rng.randint(1, min(4, len(a)))] + b[start : start + rng.randint(2, 6)]
        words += c[rng.randint(0, len(c) - 1) :][: rng.randint(1, 6)]
        words = [rng.choice(vocabulary) if rng.random() < 0.3 else w for w in words]
        out.append(" ".join(words))
    return out


def reference_decisions(candidates: list[str], existing: list[str], threshold: float):
    """Stanford Alpaca's loop without its process pool (which only adds overhead on 2 cores):
    rouge_score's tokens computed once per instruction, `_score_lcs` against every kept one."""
    from rouge_score import rouge_scorer

    tokenizer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)._tokenizer
    kept = [tokenizer.tokenize(text) for text in existing]
    decisions, pairs = [], 0
    for text in candidates:
        tokens = tokenizer.tokenize(text)
        scores = [rouge_scorer._score_lcs(tokens, other).fmeasure for other in kept]
        pairs += len(kept)
        novel = max(scores) <= threshold
        decisions.append(novel)
        if novel:
            kept.append(tokens)
    return decisions, pairs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=52_000)
    parser.add_argument("--subsample", type=int, default=1000)
    parser.add_argument("--spot-checks", type=int, default=20)
    parser.add_argument("--threshold", type=float, default=0.7)
    parser.add_argument(
        "--seed-tasks", default=str(SHARED_SEEDS if SHARED_SEEDS.exists() else DEFAULT_SEED_TASKS)
    )
    args = parser.parse_args()

    seeds = [s.instruction for s in read_seed_tasks(args.seed_tasks)]
    rng = random.Random(0)
    candidates = synthesize(seeds, args.count, rng)

    # Corral, full run. CPU time is reported too: on a shared machine it shows what an idle core
    # would take.
    started = time.perf_counter()
    cpu_started = time.process_time()
    index = RougeNoveltyIndex(args.threshold)
    index.extend(seeds)
    decisions = [index.add_if_novel(text).novel for text in candidates]
    corral_s = time.perf_counter() - started
    corral_cpu_s = time.process_time() - cpu_started

    # Corral and the reference on the same subsample.
    sub = candidates[: args.subsample]
    started = time.perf_counter()
    sub_index = RougeNoveltyIndex(args.threshold)
    sub_index.extend(seeds)
    corral_sub = [sub_index.add_if_novel(text).novel for text in sub]
    corral_sub_s = time.perf_counter() - started
    started = time.perf_counter()
    reference_sub, reference_pairs = reference_decisions(sub, seeds, args.threshold)
    reference_sub_s = time.perf_counter() - started
    per_pair_s = reference_sub_s / max(reference_pairs, 1)

    # Spot checks of the full run: the reference decides chosen candidates against the kept set
    # each of them met in Corral's run.
    from rouge_score import rouge_scorer

    tokenizer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)._tokenizer
    kept_before: list[int] = []
    count = 0
    for novel in decisions:
        kept_before.append(count)
        count += novel
    kept_texts = [t for t, novel in zip(candidates, decisions, strict=True) if novel]
    spot_rng = random.Random(1)
    spots = sorted(spot_rng.sample(range(len(candidates)), min(args.spot_checks, len(candidates))))
    spot_mismatches = 0
    spot_started = time.perf_counter()
    for i in spots:
        tokens = tokenizer.tokenize(candidates[i])
        pool = seeds + kept_texts[: kept_before[i]]
        best = max(
            rouge_scorer._score_lcs(tokens, tokenizer.tokenize(other)).fmeasure for other in pool
        )
        spot_mismatches += (best <= args.threshold) != decisions[i]
    spot_s = time.perf_counter() - spot_started

    full_pairs = sum(len(seeds) + k for k in kept_before)
    result = {
        "benchmark": "rouge_novelty_filter",
        "instructions": len(candidates),
        "seed_instructions": len(seeds),
        "threshold": args.threshold,
        "kept": sum(decisions),
        "corral_seconds": round(corral_s, 2),
        "corral_cpu_seconds": round(corral_cpu_s, 2),
        "corral_under_30s": corral_s < 30,
        "load_average_1min": round(os.getloadavg()[0], 2),
        "corral_exact_lcs_pairs": index.pairs_scored,
        "pairs_implied": full_pairs,
        "subsample": len(sub),
        "subsample_identical_decisions": corral_sub == reference_sub,
        "subsample_kept": sum(corral_sub),
        "subsample_corral_seconds": round(corral_sub_s, 4),
        "subsample_reference_seconds": round(reference_sub_s, 2),
        "subsample_speed_ratio": round(reference_sub_s / max(corral_sub_s, 1e-9), 1),
        "reference_seconds_per_pair": per_pair_s,
        "reference_full_run_estimate_hours": round(per_pair_s * full_pairs / 3600, 2),
        "full_run_speed_ratio_estimate": round(per_pair_s * full_pairs / max(corral_s, 1e-9), 1),
        "spot_checks": len(spots),
        "spot_check_mismatches": spot_mismatches,
        "spot_check_seconds": round(spot_s, 1),
    }
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
