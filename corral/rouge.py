"""The ROUGE-L novelty filter: exact `rouge_score` decisions, fast enough for 52K instructions.

Stanford Alpaca and Self-Instruct keep a new instruction only if its ROUGE-L F-measure
(`rouge_score.RougeScorer(["rougeL"], use_stemmer=False)`) against every seed and every kept
instruction is at most 0.7. Done naively that is N^2 pure-Python LCS tables: hours at 52K.

This index gives the same keep/drop decision for every candidate, cheaply:

1. Tokens follow rouge_score's rules exactly (Python's `str.lower()`, then runs of `[a-z0-9]`),
   mapped to integer ids.
2. ROUGE-L F1 = 2*LCS/(m+n), and the LCS can never exceed the multiset overlap of the two token
   lists. Each instruction's tokens are indexed as (token, occurrence number) keys, whose set
   overlap is exactly that multiset overlap. Passing also needs LCS > t*m/(2-t), so a kept
   instruction sharing only the candidate's most frequent keys ("the", "a", ...) cannot pass:
   only the posting lists of the candidate's rarer keys are read, and the frequent keys are then
   counted (binary search in sorted postings) for the few instructions still in the running.
3. The few pairs left get their exact LCS from rapidfuzz's Indel distance (C++, bit-parallel):
   Indel = m + n - 2*LCS. The F-measure is then computed with rouge_score's own floating-point
   expression, so even ties at the threshold fall the same way.

Pure module: numpy and rapidfuzz only, no rouge_score (that is a test and benchmark dependency).
"""

from __future__ import annotations

import math
import re
from array import array
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
from rapidfuzz.distance import Indel

DEFAULT_ROUGE_THRESHOLD = 0.7

# rouge_score.tokenize: lowercase, every run of characters outside [a-z0-9] is a separator.
_TOKEN_RE = re.compile(r"[a-z0-9]+")

# Bounds are compared with this slack so floating-point rounding can only add pairs to the exact
# check, never skip one that rouge_score would score above the threshold.
_BOUND_SLACK = 1e-9


def rouge_tokens(text: str) -> list[str]:
    """rouge_score's default tokenization without stemming, reimplemented."""
    return _TOKEN_RE.findall(text.lower())


def rouge_l_fmeasure_from_lcs(lcs: int, target_len: int, prediction_len: int) -> float:
    """F-measure exactly as rouge_score computes it (same float operations, same order)."""
    if target_len == 0 or prediction_len == 0:
        return 0.0
    precision = lcs / prediction_len
    recall = lcs / target_len
    if precision + recall > 0:
        return 2 * precision * recall / (precision + recall)
    return 0.0


def rouge_l_fmeasure(target: str, prediction: str) -> float:
    """ROUGE-L F-measure of two texts, equal to rouge_score's `rougeL` fmeasure."""
    vocab: dict[str, int] = {}
    a = [vocab.setdefault(t, len(vocab)) for t in rouge_tokens(target)]
    b = [vocab.setdefault(t, len(vocab)) for t in rouge_tokens(prediction)]
    return rouge_l_fmeasure_from_lcs(_lcs(a, b), len(a), len(b))


def _lcs(a: list[int], b: list[int]) -> int:
    if not a or not b:
        return 0
    return (len(a) + len(b) - Indel.distance(a, b)) // 2


@dataclass(frozen=True)
class NoveltyDecision:
    """Whether a candidate is novel, and its nearest kept instruction (for inspection)."""

    novel: bool
    # The highest F-measure among instructions whose overlap bound could pass the threshold
    # (0.0 when none could), and its index in the order instructions were added.
    max_fmeasure: float
    nearest_index: int | None


class RougeNoveltyIndex:
    """Instructions kept so far; answers "is this new one novel?" like the reference filter.

    `check(text)` compares against everything added; `add(text)` adds unconditionally (seeds);
    `add_if_novel(text)` does both, as the generation loop and `corral dedup` need.
    """

    def __init__(self, threshold: float = DEFAULT_ROUGE_THRESHOLD) -> None:
        if not 0.0 <= threshold <= 1.0:
            raise ValueError(f"ROUGE-L threshold must be within [0, 1], got {threshold}")
        self.threshold = float(threshold)
        self._vocab: dict[str, int] = {}
        self._keys: dict[tuple[int, int], int] = {}
        self._postings: list[array] = []  # key id -> ids of instructions holding it
        self._token_ids: list[list[int]] = []
        self._lengths = array("i")
        self.texts: list[str] = []
        self.pairs_scored = 0  # exact LCS computations (the rest were skipped by the bound)

    def __len__(self) -> int:
        return len(self.texts)

    def _encode(self, text: str) -> list[int]:
        vocab = self._vocab
        return [vocab.setdefault(t, len(vocab)) for t in rouge_tokens(text)]

    @staticmethod
    def _occurrence_keys(ids: list[int]) -> list[tuple[int, int]]:
        # (token, k) for the k-th occurrence: the overlap of two key sets is then exactly the
        # multiset overlap sum_t min(count_a(t), count_b(t)).
        seen: dict[int, int] = {}
        keys = []
        for t in ids:
            k = seen.get(t, 0)
            seen[t] = k + 1
            keys.append((t, k))
        return keys

    def check(self, text: str) -> NoveltyDecision:
        """Compare `text` with every added instruction: novel if max F-measure <= threshold."""
        return self._check_ids(self._encode(text))

    def _check_ids(self, ids: list[int]) -> NoveltyDecision:
        m = len(ids)
        if m == 0 or not self.texts:
            # rouge_score gives 0 for an empty token list.
            return NoveltyDecision(True, 0.0, None)
        t = self.threshold
        known = []
        for key in self._occurrence_keys(ids):
            key_id = self._keys.get(key)
            if key_id is not None:
                known.append(self._postings[key_id])
        if not known:
            return NoveltyDecision(True, 0.0, None)
        # Passing needs LCS > t(m+n)/2, and LCS <= n, so LCS > t*m/(2-t) =: x. An instruction that
        # shares only keys from a set of at most x keys cannot pass; so the candidate's most
        # frequent keys ("the", "a", "of", ...) are left out of the lookup, and only instructions
        # sharing at least one of its rarer keys are looked at.
        x = t * m / (2.0 - t)
        n_frequent = min(len(known), max(0, math.floor(x - _BOUND_SLACK)))
        known.sort(key=len)
        n_rare = len(known) - n_frequent
        if n_rare == 0:
            return NoveltyDecision(True, 0.0, None)
        frequent = known[n_rare:]
        joined = array("i")
        for posting in known[:n_rare]:
            joined.extend(posting)
        rare_ids = np.frombuffer(joined, dtype=np.int32)
        if rare_ids.size * 16 < len(self.texts):
            docs, hits = np.unique(rare_ids, return_counts=True)
        else:
            counts = np.bincount(rare_ids)
            docs = np.flatnonzero(counts)
            hits = counts[docs]
        # Overlap needed to pass, per instruction: LCS > t(m+n)/2.
        needed = (t * 0.5 - _BOUND_SLACK) * (m + np.frombuffer(self._lengths, dtype=np.int32)[docs])
        # Each frequent key not yet looked at might still match: drop what cannot pass even so,
        # then add the frequent keys one at a time (least frequent first), pruning as we go.
        remaining = n_frequent
        keep = hits + remaining > needed
        docs, hits, needed = docs[keep], hits[keep], needed[keep]
        for posting in frequent:
            if docs.size == 0:
                return NoveltyDecision(True, 0.0, None)
            arr = np.frombuffer(posting, dtype=np.int32)
            # Postings are sorted: instruction ids are appended in order.
            pos = np.searchsorted(arr, docs)
            pos[pos == arr.size] = 0
            hits = hits + (arr[pos] == docs)
            remaining -= 1
            keep = hits + remaining > needed
            docs, hits, needed = docs[keep], hits[keep], needed[keep]
        if docs.size == 0:
            return NoveltyDecision(True, 0.0, None)
        bound = 2.0 * hits / (m + np.frombuffer(self._lengths, dtype=np.int32)[docs])
        best_f, best_i = 0.0, None
        if docs.size:
            # Highest bound first, so the nearest match is usually found early.
            order = np.argsort(-bound, kind="stable")
            for j in order.tolist():
                if bound[j] + _BOUND_SLACK < best_f:
                    break  # sorted by bound: nothing further can beat the best found
                i = int(docs[j])
                other = self._token_ids[i]
                self.pairs_scored += 1
                lcs = _lcs(ids, other)
                f = rouge_l_fmeasure_from_lcs(lcs, m, len(other))
                if f > best_f:
                    best_f, best_i = f, i
        return NoveltyDecision(best_f <= self.threshold, best_f, best_i)

    def add(self, text: str) -> int:
        """Add an instruction unconditionally (seeds, or records restored on resume)."""
        return self._add_ids(text, self._encode(text))

    def _add_ids(self, text: str, ids: list[int]) -> int:
        index = len(self.texts)
        for key in self._occurrence_keys(ids):
            key_id = self._keys.get(key)
            if key_id is None:
                key_id = self._keys[key] = len(self._postings)
                self._postings.append(array("i"))
            self._postings[key_id].append(index)
        self._token_ids.append(ids)
        self._lengths.append(len(ids))
        self.texts.append(text)
        return index

    def add_if_novel(self, text: str) -> NoveltyDecision:
        """Check `text`; add it when novel. The decision says which happened."""
        ids = self._encode(text)
        decision = self._check_ids(ids)
        if decision.novel:
            self._add_ids(text, ids)
        return decision

    def extend(self, texts: Iterable[str]) -> None:
        for text in texts:
            self.add(text)
