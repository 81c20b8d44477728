"""The prefix-filtered index (corral/rouge.py) decides exactly like a full scan, at scale.

Thousands of randomized instructions (templated, perturbed, near-duplicates a word or two away,
repeated words, empty ones) go through `RougeNoveltyIndex` and through a brute-force reference
that scores every kept instruction. The reference's LCS is rapidfuzz's Indel distance and its
F-measure `rouge_l_fmeasure_from_lcs`, both checked bit for bit against rouge_score in
tests/test_rouge.py; one smaller run uses rouge_score's own `_score_lcs` end to end.
"""

from __future__ import annotations

import random
from collections import Counter

import pytest
from rapidfuzz.distance import Indel
from rouge_score import rouge_scorer

import corral.rouge as rouge
from corral.rouge import RougeNoveltyIndex, rouge_l_fmeasure_from_lcs, rouge_tokens

WORDS = (
    "write explain list give describe summarize translate classify the a of to and in for "
    "about with poem story email recipe python function french essay tips ways reasons three "
    "five short long funny formal simple history science music ocean city dog cat river "
    "mountain planet code data bug test user plan trip budget garden winter"
).split()
TEMPLATES = [
    "Write a {a} {b} about the {c}.",
    "Explain the difference between {c} and {d}.",
    "Give {n} tips for {c} {d}.",
    "List {n} {a} facts about {c}.",
    "Translate this {b} about {c} into {d}.",
]


def corpus(count: int, rng: random.Random) -> list[str]:
    out: list[str] = []
    for _ in range(count):
        r = rng.random()
        if out and r < 0.35:
            # A near-duplicate of an earlier record: one or two edits lands around 0.7.
            words = rng.choice(out[-300:] if rng.random() < 0.7 else out).split()
            for _ in range(rng.randint(1, 2)):
                op = rng.random()
                if op < 0.3 and len(words) > 1:
                    del words[rng.randrange(len(words))]
                elif op < 0.6:
                    words.insert(rng.randrange(len(words) + 1), rng.choice(WORDS))
                elif words:
                    words[rng.randrange(len(words))] = rng.choice(WORDS)
            text = " ".join(words)
            out.append(text.upper() if rng.random() < 0.1 else text)
        elif r < 0.65:
            out.append(
                rng.choice(TEMPLATES).format(
                    a=rng.choice(WORDS),
                    b=rng.choice(WORDS),
                    c=rng.choice(WORDS),
                    d=rng.choice(WORDS),
                    n=rng.randint(2, 9),
                )
            )
        elif r < 0.67:
            out.append(rng.choice(["", "!!!", "the the the the", "a a b a b"]))
        else:
            out.append(" ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 25))))
    return out


def brute_force(texts: list[str], threshold: float, *, add_all: bool = False):
    """Score every kept instruction: (novel, max F over pairs whose overlap bound could pass,
    nearest index with the index's tie rule) per text."""
    kept: list[list[str]] = []
    vocab: dict[str, int] = {}
    out = []
    for text in texts:
        ids = [vocab.setdefault(t, len(vocab)) for t in rouge_tokens(text)]
        m = len(ids)
        best = (0.0, 0.0, None)  # (F, bound, -index) maximized
        counts = Counter(ids)
        for i, other in enumerate(kept):
            n = len(other)
            if m == 0 or n == 0 or 2 * min(m, n) / (m + n) <= threshold - 1e-8:
                continue  # overlap <= min(m, n): the bound cannot pass
            overlap = sum((counts & Counter(other)).values())
            if not overlap > (threshold * 0.5 - 1e-9) * (m + n):
                continue
            lcs = (m + n - Indel.distance(ids, other)) // 2
            f = rouge_l_fmeasure_from_lcs(lcs, m, n)
            key = (f, 2.0 * overlap / (m + n), -i)
            if best[2] is None or key > best:
                best = key
        f, _, neg = best
        novel = f <= threshold
        out.append((novel, f if neg is not None else 0.0, None if neg is None else -neg))
        if novel or add_all:
            kept.append(ids)
    return out


@pytest.mark.parametrize(
    ("threshold", "count", "seed"), [(0.7, 2500, 0), (0.5, 1200, 1), (0.9, 1200, 2)]
)
def test_decisions_and_nearest_equal_a_full_scan(threshold, count, seed):
    texts = corpus(count, random.Random(seed))
    expected = brute_force(texts, threshold)
    index = RougeNoveltyIndex(threshold)
    got = []
    for text in texts:
        d = index.add_if_novel(text)
        got.append((d.novel, d.max_fmeasure, d.nearest_index))
    assert [g[0] for g in got] == [e[0] for e in expected]
    assert got == expected
    # Both outcomes are common, and the index grew past rebuilds of its key order.
    assert 100 < sum(g[0] for g in got) < len(got) - 100
    assert len(index) > rouge._FIRST_REBUILD


def test_decisions_equal_rouge_score_itself():
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)
    tokenize = scorer._tokenizer.tokenize
    texts = corpus(700, random.Random(3))
    kept: list[list[str]] = []
    expected = []
    for text in texts:
        tokens = tokenize(text)
        novel = all(
            rouge_scorer._score_lcs(tokens, other).fmeasure <= 0.7
            for other in kept
            if tokens and other and 2 * min(len(tokens), len(other)) / (len(tokens) + len(other)) > 0.7 - 1e-9
        )  # fmt: skip
        expected.append(novel)
        if novel:
            kept.append(tokens)
    index = RougeNoveltyIndex(0.7)
    assert [index.add_if_novel(text).novel for text in texts] == expected


def test_exact_threshold_ties_fall_like_rouge_score():
    """Pairs whose F-measure is the threshold itself, up to rounding: F > t drops, F <= t keeps."""
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)
    rng = random.Random(4)
    for threshold in (0.5, 0.6, 0.7, 0.75, 0.8):
        for m in range(2, 24):
            for n in range(max(1, m // 2), 2 * m + 1):
                lcs = round(threshold * (m + n) / 2)
                if not 0 < lcs <= min(m, n):
                    continue
                # Two token lists with exactly that LCS: a shared run, then disjoint words.
                shared = [f"s{i}" for i in range(lcs)]
                a = " ".join(shared + [f"a{i}" for i in range(m - lcs)])
                b_words = shared + [f"b{i}" for i in range(n - lcs)]
                rng.shuffle(b_words[lcs:])
                b = " ".join(b_words)
                index = RougeNoveltyIndex(threshold)
                index.add(a)
                f = scorer.score(a, b)["rougeL"].fmeasure
                assert index.check(b).novel == (f <= threshold), (threshold, m, n, f)


def test_seeds_checks_and_empty_texts():
    index = RougeNoveltyIndex(0.7)
    index.extend(["", "Write a poem about the sea.", "Write a poem about the sea."])
    assert len(index) == 3
    assert index.check("").novel and index.check("").nearest_index is None
    d = index.check("write a POEM about the sea!")
    # Identical twins: the earlier one is the nearest.
    assert not d.novel and d.max_fmeasure == 1.0 and d.nearest_index == 1
    assert index.check("Completely different words here entirely").novel
    assert len(index) == 3  # check never adds


def test_threshold_zero_reports_the_nearest_over_any_shared_word():
    texts = corpus(400, random.Random(5))
    expected = brute_force(texts, 0.0, add_all=True)
    index = RougeNoveltyIndex(0.0)
    got = []
    for text in texts:
        d = index.check(text)
        got.append((d.novel, d.max_fmeasure, d.nearest_index))
        index.add(text)
    assert got == expected


def test_token_ids_past_the_last_code_point(monkeypatch):
    """Over a million distinct words: token lists fall back to lists of ints, same decisions."""
    monkeypatch.setattr(rouge, "_CHAR_LIMIT", 40)
    texts = corpus(800, random.Random(6))
    expected = brute_force(texts, 0.7)
    index = RougeNoveltyIndex(0.7)
    got = []
    for text in texts:
        d = index.add_if_novel(text)
        got.append((d.novel, d.max_fmeasure, d.nearest_index))
    assert got == expected
    assert any(isinstance(s, list) for s in index._sequences)
    assert any(isinstance(s, str) for s in index._sequences)
