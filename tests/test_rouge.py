"""The ROUGE-L novelty filter gives exactly rouge_score's decisions (rouge-score is a pinned dev
dependency, imported normally: a broken install fails here rather than skipping).

The instructions come from Corral's own seed set, so the comparison runs on every checkout."""

from __future__ import annotations

import json
import random
import subprocess
import sys

import pytest
from corral.data_gen.config import DEFAULT_SEED_TASKS
from rouge_score import rouge_scorer

from corral.records import read_seed_tasks
from corral.rouge import (
    RougeNoveltyIndex,
    rouge_l_fmeasure,
    rouge_tokens,
)


@pytest.fixture(scope="module")
def scorer():
    return rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)


@pytest.fixture(scope="module")
def seed_instructions() -> list[str]:
    """The human-written seed tasks Corral ships (data_gen/seeds/default_seed_tasks.jsonl)."""
    seeds = [task.instruction for task in read_seed_tasks(DEFAULT_SEED_TASKS)]
    assert len(seeds) >= 40
    return seeds


def perturbed_instructions(seeds: list[str], count: int, rng: random.Random) -> list[str]:
    """Real-looking instructions: seeds with words dropped, inserted, replaced, swapped or merged.

    Light edits land near the 0.7 threshold, which is where an inexact filter would disagree.
    """
    vocabulary = " ".join(seeds).split()
    out = []
    for _ in range(count):
        words = rng.choice(seeds).split()
        if rng.random() < 0.2:
            words += rng.choice(seeds).split()[: rng.randint(2, 8)]
        for _ in range(rng.randint(0, 4)):
            op = rng.random()
            if op < 0.3 and len(words) > 2:
                del words[rng.randrange(len(words))]
            elif op < 0.55:
                words.insert(rng.randrange(len(words) + 1), rng.choice(vocabulary))
            elif op < 0.8:
                words[rng.randrange(len(words))] = rng.choice(vocabulary)
            else:
                i, j = rng.randrange(len(words)), rng.randrange(len(words))
                words[i], words[j] = words[j], words[i]
        text = " ".join(words)
        if rng.random() < 0.1:
            text = text.upper()
        out.append(text)
    return out


TRICKY_TEXTS = [
    "Hello, World! It's 2024-01-01.",
    "naïve café über straße İstanbul ǅ",
    "tabs\tand\nnewlines\r\nand   spaces",
    "under_score and hyphen-ated and CamelCase",
    "¿Qué? ¡Sí! 東京 123abc ABC123",
    "",
    "!!!",
    "ﬁne ligature and ½ fractions ²",
]


@pytest.mark.parametrize("text", TRICKY_TEXTS)
def test_tokenization_matches_rouge_score(scorer, text):
    assert rouge_tokens(text) == scorer._tokenizer.tokenize(text)


def test_fmeasure_equals_rouge_score_on_thousands_of_pairs(scorer, seed_instructions):
    rng = random.Random(1)
    texts = seed_instructions + perturbed_instructions(seed_instructions, 1500, rng) + TRICKY_TEXTS
    for _ in range(4000):
        a, b = rng.choice(texts), rng.choice(texts)
        expected = scorer.score(a, b)["rougeL"].fmeasure
        assert rouge_l_fmeasure(a, b) == expected, (a, b)  # bit-for-bit, not approximately


def reference_filter(candidates: list[str], existing: list[str], threshold: float) -> list[bool]:
    """The reference loop: rouge_score's LCS F-measure against every kept instruction.

    Tokens are computed once per text (rouge_score's own tokenizer) and pairs whose lengths alone
    rule out F > threshold are skipped (F <= 2 min(m, n) / (m + n)); everything else is scored
    by rouge_score itself.
    """
    tokenizer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)._tokenizer
    kept = [tokenizer.tokenize(t) for t in existing]
    decisions = []
    for text in candidates:
        tokens = tokenizer.tokenize(text)
        m = len(tokens)
        best = 0.0
        for other in kept:
            n = len(other)
            if m == 0 or n == 0 or 2 * min(m, n) / (m + n) <= threshold - 1e-9:
                continue
            best = max(best, rouge_scorer._score_lcs(tokens, other).fmeasure)
            if best > threshold:
                break
        novel = best <= threshold
        decisions.append(novel)
        if novel:
            kept.append(tokens)
    return decisions


# At 0.6 most light edits of the seeds are near duplicates: 800 candidates give enough novel ones.
@pytest.mark.parametrize(("threshold", "count"), [(0.7, 1200), (0.6, 800)])
def test_filter_decisions_identical_to_rouge_score(seed_instructions, threshold, count):
    rng = random.Random(threshold)
    candidates = perturbed_instructions(seed_instructions, count, rng)
    expected = reference_filter(candidates, seed_instructions, threshold)
    index = RougeNoveltyIndex(threshold)
    index.extend(seed_instructions)
    got = [index.add_if_novel(text).novel for text in candidates]
    assert got == expected
    # Both outcomes occur often enough for the comparison to mean something.
    assert 20 < sum(got) < len(got) - 20


def test_index_reports_the_nearest_instruction_and_skips_most_pairs(seed_instructions):
    index = RougeNoveltyIndex(0.7)
    index.extend(seed_instructions)
    # Grow the index to a couple of hundred instructions with novel edits of the seeds.
    rng = random.Random(2)
    while len(index) < 200:
        index.add_if_novel(perturbed_instructions(seed_instructions, 1, rng)[0])
    scored_before = index.pairs_scored
    target = seed_instructions[10]
    decision = index.check(target + " please")
    assert not decision.novel
    assert index.texts[decision.nearest_index] == target
    assert decision.max_fmeasure > 0.7
    assert index.check("Completely unrelated zebra quantum marmalade xylophone.").novel
    # The overlap bound leaves only a few exact LCS computations per candidate, out of 200.
    assert index.pairs_scored - scored_before < 10


def test_threshold_must_be_a_fraction():
    with pytest.raises(ValueError, match="threshold"):
        RougeNoveltyIndex(1.5)


def test_dedup_command_keeps_first_of_near_duplicates(tmp_path):
    records = [
        {"instruction": "Give three tips for staying healthy.", "input": "", "output": "a"},
        {"instruction": "Give three tips for staying healthy today.", "input": "", "output": "b"},
        {"instruction": "Translate the sentence into French.", "input": "Hi", "output": "Salut"},
        {"instruction": "give 3 tips for staying HEALTHY!", "input": "", "output": "c"},
    ]
    src = tmp_path / "in.json"
    src.write_text(json.dumps(records))
    out = tmp_path / "out.json"
    proc = subprocess.run(
        [sys.executable, "-m", "corral.cli", "dedup", str(src), "--output", str(out)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    kept = json.loads(out.read_text())
    # "give 3 tips..." differs from record 0 in one of six tokens: F = 5/6 > 0.7, dropped too.
    assert rouge_l_fmeasure(records[3]["instruction"], records[0]["instruction"]) > 0.7
    assert [r["output"] for r in kept] == ["a", "Salut"]
    assert "drop record 1" in proc.stdout and "drop record 3" in proc.stdout
    assert "kept" in proc.stdout


def test_dedup_command_names_a_bad_record(tmp_path):
    src = tmp_path / "bad.json"
    src.write_text(json.dumps([{"instruction": "ok ok ok ok", "output": "x"}, {"output": "y"}]))
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "corral.cli",
            "dedup",
            str(src),
            "--output",
            str(tmp_path / "o.json"),
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 2
    assert "record 1" in proc.stderr and "instruction" in proc.stderr
    assert not (tmp_path / "o.json").exists()
