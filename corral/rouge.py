"""The ROUGE-L novelty filter: exact `rouge_score` decisions, fast enough for a million instructions.

Stanford Alpaca and Self-Instruct keep a new instruction only if its ROUGE-L F-measure
(`rouge_score.RougeScorer(["rougeL"], use_stemmer=False)`) against every seed and every kept
instruction is at most 0.7. Done naively that is N^2 pure-Python LCS tables: hours at 52K.

This index gives the same keep/drop decision for every candidate, cheaply (a similarity join):

1. Tokens follow rouge_score's rules exactly (Python's `str.lower()`, then runs of `[a-z0-9]`),
   mapped to integer ids. Each instruction's tokens are also keys (token, occurrence number), so
   the overlap of two key sets is exactly the multiset overlap of the token lists.
2. ROUGE-L F1 = 2*LCS/(m+n) and LCS <= overlap <= min(m, n). Passing the threshold t therefore
   needs overlap > t*m/(2-t) (and the same with n), and a length n within
   [t*m/(2-t), m*(2-t)/t] (the length filter).
3. Prefix filter over an inverted index. Keys have one global order, rarest first (ranked by how
   many kept instructions hold them; re-ranked, and the index rebuilt, each time the index doubles;
   keys first seen since the last ranking come first). A pair that can pass shares its first two
   common keys within each one's prefix, the first m - ceil(t*m/(2-t)) + 2 keys: only prefixes are
   indexed, only the candidate's prefix is looked up, and an instruction must turn up twice.
   Postings are split by the key's position in the instruction, and positions too far down to
   leave room for enough overlap are never read (PPJoin's positional filter). Frequent words
   ("the", "a") sit at the end of the order, outside prefixes, so they are never read.
4. The candidates left get their exact multiset overlap (numpy, from every instruction's stored
   keys); the pairs whose bound 2*overlap/(m+n) can pass get their exact LCS from rapidfuzz's
   Indel distance (C++, bit-parallel; Indel = m + n - 2*LCS). The F-measure is computed with
   rouge_score's own floating-point expression, so even ties at the threshold fall the same way.

Every bound is applied with a slack so floating-point rounding can only add candidates, never
lose one: the decision (and the reported nearest instruction) equals a full scan's.

Pure module: numpy and rapidfuzz only, no rouge_score (that is a test and benchmark dependency).
"""

from __future__ import annotations

import heapq
import math
import re
from array import array
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
from rapidfuzz import process
from rapidfuzz.distance import Indel

DEFAULT_ROUGE_THRESHOLD = 0.7

# rouge_score.tokenize: lowercase, every run of characters outside [a-z0-9] is a separator.
_TOKEN_RE = re.compile(r"[a-z0-9]+")

# Bounds are compared with this slack so floating-point rounding can only add pairs to the exact
# check, never skip one that rouge_score would score above the threshold.
_BOUND_SLACK = 1e-9

# Token lists are kept as strings, one character per token id (rapidfuzz compares them natively);
# ids past the last code point (over a million distinct words) fall back to lists of ints, which
# rapidfuzz compares with strings by code point.
_CHAR_LIMIT = 0x110000
# Below this many pairs a Python loop over Indel.distance beats one process.cdist call.
_BATCH_MIN = 12
# Key priorities are re-ranked by frequency (and the index rebuilt) when the number of instructions
# reaches this, then each time it doubles: O(N) work in all. Keys seen since get _NEW_KEY + id.
_FIRST_REBUILD = 256
# Prefixes are this many keys minus one longer than the minimum, and a pair must share this many
# keys within them (the first common keys of a pair that could pass are in both prefixes).
_SHARED_IN_PREFIX = 2
_NEW_KEY = 1 << 40


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


def _sequence(ids: list[int]) -> str | list[int]:
    if ids and max(ids) >= _CHAR_LIMIT:
        return list(ids)
    return "".join(map(chr, ids))


def _indel_distances(query: str | list[int], choices: list) -> np.ndarray:
    """Indel distance from `query` to each choice (m + n - 2*LCS), as int64."""
    if len(choices) < _BATCH_MIN:
        return np.array([Indel.distance(query, c) for c in choices], dtype=np.int64)
    return process.cdist([query], choices, scorer=Indel.distance, dtype=np.int32, workers=1)[
        0
    ].astype(np.int64)


@dataclass(frozen=True)
class NoveltyDecision:
    """Whether a candidate is novel, and its nearest kept instruction (for inspection)."""

    novel: bool
    # The highest F-measure among instructions whose overlap bound could pass the threshold
    # (multiset overlap > (t/2 - 1e-9) * (m + n); 0.0 when none could), and its index in the order
    # instructions were added (ties: the larger overlap bound, then the earlier instruction).
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
        # (token, occurrence) -> key id, numbered in order of first sight: the prefix order.
        self._keys: dict[tuple[int, int], int] = {}
        # The prefix order: key id -> priority, highest first. Keys ranked at the last rebuild
        # by how many kept instructions hold them (rarest highest); keys seen since then above
        # them all, newest first. Fixed between rebuilds, which re-index every prefix.
        self._priority: list[int] = []
        self._key_counts: list[int] = []  # key id -> kept instructions holding it
        self._next_rebuild = _FIRST_REBUILD
        # key id -> position j -> instructions holding the key at position j of their prefix
        self._postings: dict[int, list[array | None]] = {}
        self._sequences: list[str | list[int]] = []  # token ids as characters
        # Every instruction's key ids, end to end (instruction i: _flat[_starts[i]:][:length]),
        # and a per-check marker of the candidate's keys: exact overlaps, counted by numpy.
        self._flat = np.zeros(1 << 14, dtype=np.int32)
        self._flat_size = 0
        self._starts = np.zeros(1024, dtype=np.int64)
        self._lengths = np.zeros(1024, dtype=np.int64)
        self._marks = np.zeros(1 << 14, dtype=np.int8)
        self._prefix_lengths: dict[int, tuple[int, int, int]] = {}
        self._reaches: dict[tuple[int, int], int] = {}
        # Partners shorter than this need fewer than _SHARED_IN_PREFIX common keys.
        self._shortest_needing_all = next(
            (n for n in range(1, 1 << 16) if self._bounds(n, cache=False)[1] >= _SHARED_IN_PREFIX),
            1 << 62,
        )
        self.texts: list[str] = []
        self.pairs_scored = 0  # exact LCS computations (the rest were skipped by the bounds)

    def __len__(self) -> int:
        return len(self.texts)

    def _encode(self, text: str) -> list[int]:
        vocab = self._vocab
        return [vocab.setdefault(t, len(vocab)) for t in rouge_tokens(text)]

    def _key_ids(self, ids: list[int]) -> list[int]:
        # (token, k) for the k-th occurrence: the overlap of two key sets is then exactly the
        # multiset overlap sum_t min(count_a(t), count_b(t)). New keys get the next id.
        keys = self._keys
        seen: dict[int, int] = {}
        out = []
        for t in ids:
            k = seen.get(t, 0)
            seen[t] = k + 1
            key = (t, k)
            key_id = keys.get(key)
            if key_id is None:
                key_id = keys[key] = len(keys)
                self._priority.append(_NEW_KEY + key_id)
                self._key_counts.append(0)
            out.append(key_id)
        return out

    def _bounds(self, m: int, cache: bool = True) -> tuple[int, int, int]:
        """(prefix length, fewest common keys, longest partner) for an m-token instruction.

        A pair counts when its overlap exceeds needed = (t/2 - slack) * (m + n) (the bound every
        pass satisfies, slack included). With n >= overlap that means
        overlap > y = (t - 2 slack) m / (2 - t + 2 slack), so overlap >= lmin = floor(y) + 1,
        which is also the shortest partner; the prefix is all keys but the lmin - _SHARED_IN_PREFIX
        last; and m >= overlap gives n < m (2 - t + 2 slack) / (t - 2 slack).
        """
        bounds = self._prefix_lengths.get(m)
        if bounds is None:
            t, s = self.threshold, _BOUND_SLACK
            margin = 1e-9 * (m + 1)  # rounding of the expressions below
            y = (t - 2 * s) * m / (2 - t + 2 * s)
            lmin = max(1, math.floor(y - margin) + 1)
            prefix = max(0, min(m, m - lmin + _SHARED_IN_PREFIX))
            if t - 2 * s > 0:
                longest = math.floor(m * (2 - t + 2 * s) / (t - 2 * s) + margin)
            else:
                longest = 2**62
            bounds = (prefix, lmin, longest)
            if cache:
                self._prefix_lengths[m] = bounds
        return bounds

    def _prefix(self, keys: list[int], length: int) -> list[int]:
        # Highest priority first: the same fixed order for every instruction.
        return heapq.nlargest(length, keys, key=self._priority.__getitem__)

    def _rebuild(self) -> None:
        """Rank keys by how many kept instructions hold them, and re-index every prefix."""
        counts = np.array(self._key_counts, dtype=np.int64)
        order = np.argsort(-counts, kind="stable")  # most frequent first: lowest priority
        priority = np.empty_like(order)
        priority[order] = np.arange(order.size)
        self._priority = priority.tolist()
        self._postings = {}
        flat = self._flat.tolist()
        for index, (start, length) in enumerate(
            zip(self._starts.tolist(), self._lengths.tolist(), strict=False)
        ):
            if index == len(self.texts):
                break
            self._index_prefix(index, flat[start : start + length])
        self._next_rebuild = 2 * len(self.texts)

    def _index_prefix(self, index: int, keys: list[int]) -> None:
        # Postings per key and per position of the key in the instruction's order.
        postings = self._postings
        for position, key in enumerate(self._prefix(keys, self._bounds(len(keys))[0])):
            by_position = postings.get(key)
            if by_position is None:
                by_position = postings[key] = []
            while len(by_position) <= position:
                by_position.append(None)
            posting = by_position[position]
            if posting is None:
                posting = by_position[position] = array("i")
            posting.append(index)

    def _reach(self, m: int, i: int) -> int:
        """How many positions j of a posting can hold a pair with an m-token candidate whose key
        is at position i. A pair that could pass has its k-th common key at positions (i, j) with
        overlap <= k + min(m-1-i, n-1-j); for its first _SHARED_IN_PREFIX common keys, some
        partner length n in the window must then allow
        _SHARED_IN_PREFIX + min(m-1-i, n-1-j) > (t/2 - slack) * (m + n). Loose by 1e-6."""
        reach = self._reaches.get((m, i))
        if reach is None:
            _, shortest, longest = self._bounds(m)
            t = self.threshold
            if longest - shortest > 4096:
                reach = 1 << 30  # thresholds near 0: no pruning by position
            else:
                reach = 0
                for n in range(shortest, longest + 1):
                    needed = (t * 0.5 - _BOUND_SLACK) * (m + n)
                    if m - i - 1 + _SHARED_IN_PREFIX > needed - 1e-6:
                        reach = max(
                            reach, math.floor(n - 1 + _SHARED_IN_PREFIX - needed + 1e-6) + 1
                        )
            self._reaches[(m, i)] = reach
        return reach

    def check(self, text: str) -> NoveltyDecision:
        """Compare `text` with every added instruction: novel if max F-measure <= threshold."""
        ids = self._encode(text)
        return self._check_ids(ids, self._key_ids(ids))

    def _candidates(self, keys: list[int], m: int) -> np.ndarray:
        """Instructions that could pass: within the length window, and holding at least
        _SHARED_IN_PREFIX of the candidate's prefix keys in their own prefixes (the first common
        keys of a pair that could pass are in both prefixes, which are extended for it), at
        positions within reach (`_reach`, the positional bound of PPJoin)."""
        prefix_length, shortest, longest = self._bounds(m)
        postings = self._postings
        lists = []
        for i, key in enumerate(self._prefix(keys, prefix_length)):
            by_position = postings.get(key)
            if by_position is None:
                continue
            # Positions past the reach cannot hold a pair: those postings are never read.
            for posting in by_position[: self._reach(m, i)]:
                if posting is not None:
                    lists.append(np.frombuffer(posting, dtype=np.int32))
        if not lists:
            return np.zeros(0, dtype=np.int64)
        if len(lists) == 1:
            docs = lists[0].astype(np.int64)
            hits = np.ones(docs.size, dtype=np.int64)
        else:
            docs, hits = np.unique(np.concatenate(lists), return_counts=True)
            docs = docs.astype(np.int64)
        del lists  # release the postings' buffers (arrays cannot grow while exported)
        if self._bounds(m)[1] >= _SHARED_IN_PREFIX:
            # Partners shorter than _shortest_needing_all may pass with fewer common keys.
            keep = hits >= _SHARED_IN_PREFIX
            if self._shortest_needing_all > shortest:
                keep |= self._lengths[docs] < self._shortest_needing_all
            docs = docs[keep]
        n = self._lengths[docs]
        return docs[(n >= shortest) & (n <= longest)]

    def _check_ids(self, ids: list[int], keys: list[int]) -> NoveltyDecision:
        m = len(ids)
        if m == 0 or not self.texts:
            # rouge_score gives 0 for an empty token list.
            return NoveltyDecision(True, 0.0, None)
        docs = self._candidates(keys, m)
        if docs.size == 0:
            return NoveltyDecision(True, 0.0, None)
        t = self.threshold
        n = self._lengths[docs]
        # Keep the pairs whose bound 2 * overlap / (m + n) could pass (exact overlaps), then
        # score those exactly.
        overlap = self._overlaps(keys, docs, n)
        keep = overlap > (t * 0.5 - _BOUND_SLACK) * (m + n)
        if not keep.any():
            return NoveltyDecision(True, 0.0, None)
        docs, n, overlap = docs[keep], n[keep], overlap[keep]
        sequences = self._sequences
        self.pairs_scored += int(docs.size)
        lcs = (m + n - _indel_distances(_sequence(ids), [sequences[i] for i in docs.tolist()])) // 2
        # rouge_score's expression, operation for operation (target = candidate, m tokens).
        precision = lcs / n
        recall = lcs / m
        total = precision + recall
        with np.errstate(invalid="ignore", divide="ignore"):
            fmeasure = np.where(total > 0, 2 * precision * recall / total, 0.0)
        best_f = float(fmeasure.max())
        if best_f <= 0.0:
            return NoveltyDecision(True, 0.0, None)
        # The nearest: highest F-measure, then the highest overlap bound, then the earliest.
        bound = 2.0 * overlap / (m + n)
        tied = np.flatnonzero(fmeasure == best_f)
        best = tied[np.lexsort((docs[tied], -bound[tied]))[0]]
        return NoveltyDecision(best_f <= t, best_f, int(docs[best]))

    def _overlaps(self, keys: list[int], docs: np.ndarray, n: np.ndarray) -> np.ndarray:
        """Exact multiset overlaps with many instructions: mark the candidate's keys, gather each
        instruction's keys and sum the marks per instruction."""
        if self._marks.size < len(self._keys):
            self._marks = np.zeros(2 * len(self._keys), dtype=np.int8)
        marks = self._marks
        marks[keys] = 1
        ends = np.cumsum(n)
        positions = np.arange(int(ends[-1]), dtype=np.int64)
        positions += np.repeat(self._starts[docs] - (ends - n), n)
        overlap = np.add.reduceat(marks[self._flat[positions]].astype(np.int64), ends - n)
        marks[keys] = 0
        return overlap

    def add(self, text: str) -> int:
        """Add an instruction unconditionally (seeds, or records restored on resume)."""
        ids = self._encode(text)
        return self._add_ids(text, ids, self._key_ids(ids))

    def _add_ids(self, text: str, ids: list[int], keys: list[int]) -> int:
        index = len(self.texts)
        counts = self._key_counts
        for key in keys:
            counts[key] += 1
        self._index_prefix(index, keys)
        self._sequences.append(_sequence(ids))
        if index == self._lengths.size:
            self._lengths = np.concatenate([self._lengths, np.zeros_like(self._lengths)])
            self._starts = np.concatenate([self._starts, np.zeros_like(self._starts)])
        start, end = self._flat_size, self._flat_size + len(keys)
        while end > self._flat.size:
            self._flat = np.concatenate([self._flat, np.zeros_like(self._flat)])
        self._flat[start:end] = keys
        self._flat_size = end
        self._starts[index] = start
        self._lengths[index] = len(ids)
        self.texts.append(text)
        if len(self.texts) >= self._next_rebuild:
            self._rebuild()
        return index

    def add_if_novel(self, text: str) -> NoveltyDecision:
        """Check `text`; add it when novel. The decision says which happened."""
        ids = self._encode(text)
        keys = self._key_ids(ids)
        decision = self._check_ids(ids, keys)
        if decision.novel:
            self._add_ids(text, ids, keys)
        return decision

    def extend(self, texts: Iterable[str]) -> None:
        for text in texts:
            self.add(text)
