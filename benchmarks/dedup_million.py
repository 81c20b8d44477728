"""Benchmark: `corral dedup` (exact ROUGE-L novelty filter) on 1,000,000 instructions.

Usage: .venv/bin/python -m benchmarks.dedup_million [--size 1000000] [--anchor-size 50000]
                                          [--reference-size 2000] [--threshold 0.7]

The corpus is synthetic and deterministic (random.Random(0)), built to look like today's
million-record synthetic instruction sets: templated requests ("Write a {form} about {topic} for
{audience}.") with Zipf-distributed slot words from a 30,000-word vocabulary, free-form
instructions recombined from the seed tasks' phrases with vocabulary swaps, and a known share
(20%) of near-duplicates: an earlier record with one to three word edits, a case change or
punctuation noise, which lands around the 0.7 threshold.

Measured in the same run and printed as JSON (last line):
- Corral: `python -m corral.cli dedup corpus.jsonl --output kept.jsonl --quiet` in a child
  process: wall seconds (reading and writing the JSONL included), the child's peak RSS
  (resource.getrusage(RUSAGE_CHILDREN).ru_maxrss), kept count;
- the anchor: the previous exact index (Corral's `RougeNoveltyIndex` before this change, copied
  below as `PreviousIndex`: every token indexed, the candidate's frequent tokens skipped) on the
  first `--anchor-size` records, with its seconds and whether its decisions equal the
  `corral dedup` decisions on that prefix record for record (`--anchor-size` equal to `--size`
  runs it over everything: a head-to-head);
- rouge_score itself (its tokenizer and `_score_lcs` against every kept instruction, lengths that
  cannot pass skipped) on the first `--reference-size` records, decisions compared too.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import resource
import subprocess
import sys
import tempfile
import time
from array import array
from pathlib import Path

import numpy as np
from corral.data_gen.config import DEFAULT_SEED_TASKS
from rapidfuzz.distance import Indel

from corral.records import read_seed_tasks
from corral.rouge import rouge_l_fmeasure_from_lcs, rouge_tokens

REPO_ROOT = Path(__file__).resolve().parents[1]


NEAR_DUPLICATE_SHARE = 0.2
TEMPLATED_SHARE = 0.45

TEMPLATES = [
    "Write a {form} about {topic} for {audience}.",
    "Write a {adj} {form} about {topic}.",
    "Compose a {form} in the style of {name} about {topic}.",
    "Explain {topic} to {audience} in {n} sentences.",
    "Explain the difference between {topic} and {topic2}.",
    "What are the main causes of {topic}?",
    "Give me {n} tips for {topic} as {audience}.",
    "Summarize the following article about {topic} in {n} bullet points.",
    "Translate this {form} about {topic} into {lang}.",
    "Create a {n}-day plan for learning {topic}.",
    "List {n} {adj} facts about {topic}.",
    "How can I improve my {topic} skills when I am {audience}?",
    "Generate a {adj} title for a {form} on {topic}.",
    "Write a Python function that {task} and explain how it works.",
    "Write a {lang} program that {task}.",
    "Describe how {topic} affects {topic2} in {n} paragraphs.",
    "Classify the following {form} about {topic} as {adj} or not.",
    "Rewrite this {form} to sound more {adj} for {audience}.",
    "Compare {topic} with {topic2} and recommend one for {audience}.",
    "I am {audience}. What should I know about {topic}?",
    "Act as {name} and give advice on {topic}.",
    "Draft an email to {audience} announcing {topic}.",
    "Suggest {n} names for a {adj} startup focused on {topic}.",
    "What is the best way to {task} using {topic}?",
    "Design a {adj} lesson on {topic} for {audience}, with {n} activities.",
    "Find the bug in this code that {task}.",
    "Outline the history of {topic} from {name} to today.",
    "Solve this problem about {topic}: {task}.",
    "Provide a step-by-step guide to {task}.",
    "Why is {topic} important for {topic2}?",
]
FORMS = "poem story essay haiku limerick blog post tweet speech report song review letter".split()
ADJECTIVES = (
    "short funny formal persuasive detailed simple creative professional surprising concise "
    "friendly sarcastic inspiring technical casual dramatic"
).split()
AUDIENCES = [
    "children",
    "a beginner",
    "high school students",
    "software engineers",
    "a busy parent",
    "retirees",
    "a small business owner",
    "nurses",
    "college freshmen",
    "a five year old",
    "data scientists",
    "tourists",
]
LANGUAGES = "French Spanish German Japanese Python Rust JavaScript Go Italian Korean SQL".split()
TASK_VERBS = "sorts reverses parses merges counts validates compresses filters ranks".split()
TASK_OBJECTS = "a list a string JSON files two dictionaries dates emails words matrices".split()


def _make_vocabulary(rng: random.Random, size: int) -> list[str]:
    syllables = [c + v for c in "bcdfghjklmnprstvwz" for v in "aeiou"] + ["qu", "th", "sh", "ch"]
    words: set[str] = set()
    while len(words) < size:
        words.add("".join(rng.choice(syllables) for _ in range(rng.randint(2, 4))))
    return sorted(words)


class Corpus:
    """Deterministic generator of the benchmark's instructions."""

    def __init__(self, seeds: list[str], seed: int = 0) -> None:
        self.rng = random.Random(seed)
        self.vocabulary = _make_vocabulary(self.rng, 30_000)
        # Zipf-like weights: a few topic words are common, most are rare.
        self.cum_weights = list(
            np.cumsum(1.0 / np.arange(1, len(self.vocabulary) + 1) ** 1.05).tolist()
        )
        self.seed_words = [s.split() for s in seeds]
        self.names = [w.capitalize() for w in self.vocabulary[:400]]

    def _words(self, k: int) -> list[str]:
        return self.rng.choices(self.vocabulary, cum_weights=self.cum_weights, k=k)

    def _topic(self) -> str:
        return " ".join(self._words(self.rng.randint(1, 4)))

    def templated(self) -> str:
        rng = self.rng
        task = f"{rng.choice(TASK_VERBS)} {rng.choice(TASK_OBJECTS)} of {self._topic()}"
        return rng.choice(TEMPLATES).format(
            form=rng.choice(FORMS),
            adj=rng.choice(ADJECTIVES),
            topic=self._topic(),
            topic2=self._topic(),
            audience=rng.choice(AUDIENCES),
            name=rng.choice(self.names),
            n=rng.randint(2, 12),
            lang=rng.choice(LANGUAGES),
            task=task,
        )

    def free_form(self) -> str:
        rng = self.rng
        a, b, c = (rng.choice(self.seed_words) for _ in range(3))
        start = rng.randint(0, max(0, len(b) - 3))
        words = a[: rng.randint(1, min(5, len(a)))] + b[start : start + rng.randint(2, 8)]
        words += c[rng.randint(0, len(c) - 1) :][: rng.randint(1, 8)]
        words += self._words(rng.randint(0, 12))
        swap = rng.random() * 0.4
        return " ".join(self._words(1)[0] if rng.random() < swap else w for w in words)

    def near_duplicate(self, original: str) -> str:
        rng = self.rng
        words = original.split()
        for _ in range(rng.randint(1, 3)):
            op = rng.random()
            if op < 0.3 and len(words) > 2:
                del words[rng.randrange(len(words))]
            elif op < 0.55:
                words.insert(rng.randrange(len(words) + 1), self._words(1)[0])
            elif op < 0.8 and words:
                words[rng.randrange(len(words))] = self._words(1)[0]
            elif len(words) > 1:
                i = rng.randrange(len(words) - 1)
                words[i], words[i + 1] = words[i + 1], words[i]
        text = " ".join(words)
        if rng.random() < 0.15:
            text = text.lower() if rng.random() < 0.5 else text.upper()
        if rng.random() < 0.15:
            text = text.rstrip(".?!") + rng.choice(["?", "!", " please.", "..."])
        return text

    def build(self, size: int) -> tuple[list[str], int]:
        out: list[str] = []
        near = 0
        rng = self.rng
        for _ in range(size):
            r = rng.random()
            if out and r < NEAR_DUPLICATE_SHARE:
                # Mostly recent records (as a generator repeats itself), sometimes any earlier one.
                j = len(out) - 1 - min(len(out) - 1, int(rng.expovariate(1 / 2000)))
                if rng.random() < 0.3:
                    j = rng.randrange(len(out))
                out.append(self.near_duplicate(out[j]))
                near += 1
            elif r < NEAR_DUPLICATE_SHARE + TEMPLATED_SHARE:
                out.append(self.templated())
            else:
                out.append(self.free_form())
        return out, near


class PreviousIndex:
    """The anchor: Corral's exact index before this change (decisions only), kept here verbatim
    in its logic: every (token, occurrence) key indexed, the candidate's most frequent keys left
    out of the lookup and counted by binary search for the instructions still in the running,
    exact LCS (rapidfuzz Indel) for the rest."""

    def __init__(self, threshold: float) -> None:
        self.threshold = threshold
        self._vocab: dict[str, int] = {}
        self._keys: dict[tuple[int, int], int] = {}
        self._postings: list[array] = []
        self._token_ids: list[list[int]] = []
        self._lengths = array("i")

    @staticmethod
    def _occurrence_keys(ids: list[int]) -> list[tuple[int, int]]:
        seen: dict[int, int] = {}
        keys = []
        for t in ids:
            k = seen.get(t, 0)
            seen[t] = k + 1
            keys.append((t, k))
        return keys

    def _best_fmeasure(self, ids: list[int]) -> float:
        m = len(ids)
        if m == 0 or not self._token_ids:
            return 0.0
        t, slack = self.threshold, 1e-9
        known = [
            self._postings[k]
            for k in map(self._keys.get, self._occurrence_keys(ids))
            if k is not None
        ]
        if not known:
            return 0.0
        n_frequent = min(len(known), max(0, math.floor(t * m / (2.0 - t) - slack)))
        known.sort(key=len)
        n_rare = len(known) - n_frequent
        if n_rare == 0:
            return 0.0
        joined = array("i")
        for posting in known[:n_rare]:
            joined.extend(posting)
        rare_ids = np.frombuffer(joined, dtype=np.int32)
        if rare_ids.size * 16 < len(self._token_ids):
            docs, hits = np.unique(rare_ids, return_counts=True)
        else:
            counts = np.bincount(rare_ids)
            docs = np.flatnonzero(counts)
            hits = counts[docs]
        lengths = np.frombuffer(self._lengths, dtype=np.int32)
        needed = (t * 0.5 - slack) * (m + lengths[docs])
        remaining = n_frequent
        keep = hits + remaining > needed
        docs, hits, needed = docs[keep], hits[keep], needed[keep]
        for posting in known[n_rare:]:
            if docs.size == 0:
                return 0.0
            arr = np.frombuffer(posting, dtype=np.int32)
            pos = np.searchsorted(arr, docs)
            pos[pos == arr.size] = 0
            hits = hits + (arr[pos] == docs)
            remaining -= 1
            keep = hits + remaining > needed
            docs, hits, needed = docs[keep], hits[keep], needed[keep]
        if docs.size == 0:
            return 0.0
        bound = 2.0 * hits / (m + lengths[docs])
        del lengths
        best_f = 0.0
        for j in np.argsort(-bound, kind="stable").tolist():
            if bound[j] + slack < best_f:
                break
            other = self._token_ids[int(docs[j])]
            lcs = (m + len(other) - Indel.distance(ids, other)) // 2
            best_f = max(best_f, rouge_l_fmeasure_from_lcs(lcs, m, len(other)))
        return best_f

    def add_if_novel(self, text: str) -> bool:
        ids = [self._vocab.setdefault(t, len(self._vocab)) for t in rouge_tokens(text)]
        novel = self._best_fmeasure(ids) <= self.threshold
        if novel:
            index = len(self._token_ids)
            for key in self._occurrence_keys(ids):
                key_id = self._keys.get(key)
                if key_id is None:
                    key_id = self._keys[key] = len(self._postings)
                    self._postings.append(array("i"))
                self._postings[key_id].append(index)
            self._token_ids.append(ids)
            self._lengths.append(len(ids))
        return novel


def reference_decisions(texts: list[str], threshold: float) -> list[bool]:
    """rouge_score itself against every kept instruction (lengths that cannot pass skipped)."""
    from rouge_score import rouge_scorer

    tokenizer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)._tokenizer
    kept: list[list[str]] = []
    decisions = []
    for text in texts:
        tokens = tokenizer.tokenize(text)
        m = len(tokens)
        novel = True
        for other in kept:
            n = len(other)
            if m == 0 or n == 0 or 2 * min(m, n) / (m + n) <= threshold - 1e-9:
                continue
            if rouge_scorer._score_lcs(tokens, other).fmeasure > threshold:
                novel = False
                break
        decisions.append(novel)
        if novel:
            kept.append(tokens)
    return decisions


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=1_000_000)
    parser.add_argument("--anchor-size", type=int, default=50_000)
    parser.add_argument("--reference-size", type=int, default=2_000)
    parser.add_argument("--threshold", type=float, default=0.7)
    args = parser.parse_args()

    seeds = [s.instruction for s in read_seed_tasks(DEFAULT_SEED_TASKS)]
    started = time.perf_counter()
    texts, near = Corpus(seeds).build(args.size)
    build_s = time.perf_counter() - started

    with tempfile.TemporaryDirectory() as tmp:
        corpus = Path(tmp) / "corpus.jsonl"
        with corpus.open("w", encoding="utf-8") as handle:
            for i, text in enumerate(texts):
                handle.write(json.dumps({"instruction": text, "input": "", "output": str(i)}))
                handle.write("\n")
        kept_path = Path(tmp) / "kept.jsonl"
        command = [sys.executable, "-m", "corral.cli", "dedup", str(corpus)]
        command += ["--output", str(kept_path), "--quiet", "--threshold", str(args.threshold)]
        started = time.perf_counter()
        proc = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True)
        corral_s = time.perf_counter() - started
        if proc.returncode != 0:
            raise SystemExit(proc.stderr)
        peak_rss_mb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
        with kept_path.open(encoding="utf-8") as handle:
            kept_ids = {int(json.loads(line)["output"]) for line in handle}
    decisions = [i in kept_ids for i in range(len(texts))]

    anchor_n = min(args.anchor_size, len(texts))
    started = time.perf_counter()
    previous = PreviousIndex(args.threshold)
    anchor = [previous.add_if_novel(text) for text in texts[:anchor_n]]
    anchor_s = time.perf_counter() - started

    reference_n = min(args.reference_size, len(texts))
    started = time.perf_counter()
    reference = reference_decisions(texts[:reference_n], args.threshold)
    reference_s = time.perf_counter() - started

    result = {
        "benchmark": "dedup_million",
        "instructions": len(texts),
        "constructed_near_duplicates": near,
        "threshold": args.threshold,
        "corpus_build_seconds": round(build_s, 1),
        "corral_dedup_seconds": round(corral_s, 1),
        "corral_under_10_minutes": corral_s < 600,
        "corral_peak_rss_mb": round(peak_rss_mb),
        "kept": sum(decisions),
        "dropped": len(texts) - sum(decisions),
        "anchor": "previous exact index (same process, in memory, no file IO)",
        "anchor_records": anchor_n,
        "anchor_seconds": round(anchor_s, 1),
        "anchor_kept": sum(anchor),
        "anchor_identical_decisions": anchor == decisions[:anchor_n],
        "rouge_score_records": reference_n,
        "rouge_score_seconds": round(reference_s, 1),
        "rouge_score_identical_decisions": reference == decisions[:reference_n],
        "load_average_1min": round(os.getloadavg()[0], 2),
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
