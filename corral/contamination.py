"""Is an evaluation set leaking into training data? Two exact tests, used by `corral audit` and by
`corral generate --eval-set`. Pure: the core's ROUGE-L index and the standard library.

- near instruction: a training instruction whose ROUGE-L F-measure against an evaluation item's
  instruction is at least the threshold (0.7, the novelty filter's line);
- shared 13-gram: the training record (instruction, input and output) shares a run of 13 words
  with an evaluation item (instruction, input and reference output), the test GPT-3 and later
  decontamination studies use. Words are rouge_score's tokens (lowercase letters and digits).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from corral.records import SeedTask
from corral.rouge import RougeNoveltyIndex, rouge_tokens

NGRAM = 13
DEFAULT_THRESHOLD = 0.7
# The index reports "above its threshold"; contamination counts "at or above" the threshold.
_AT_OR_ABOVE = 1e-12


@dataclass(frozen=True)
class Contamination:
    """One training record that matches an evaluation item."""

    record_index: int
    eval_index: int
    reason: str  # "near_instruction" | "shared_13gram"
    rouge_l: float
    ngram: str  # the first shared 13-gram, for shared_13gram


def _ngrams(tokens: Sequence[str], n: int = NGRAM) -> Iterable[tuple[str, ...]]:
    return (tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1))


class ContaminationIndex:
    """The evaluation set, indexed once; `match(instruction, text)` tests one training record."""

    def __init__(self, tasks: Sequence[SeedTask], threshold: float = DEFAULT_THRESHOLD) -> None:
        self.tasks = list(tasks)
        self.threshold = threshold
        self._rouge = RougeNoveltyIndex(max(0.0, threshold - _AT_OR_ABOVE))
        self._rouge.extend(task.instruction for task in self.tasks)
        self._ngrams: dict[tuple[str, ...], int] = {}
        for index, task in enumerate(self.tasks):
            for gram in _ngrams(rouge_tokens(task_text(task))):
                self._ngrams.setdefault(gram, index)

    def match(self, instruction: str, text: str) -> tuple[int, str, float, str] | None:
        """(eval index, reason, ROUGE-L, shared n-gram) of the first match, or None."""
        decision = self._rouge.check(instruction)
        if not decision.novel and decision.nearest_index is not None:
            return decision.nearest_index, "near_instruction", decision.max_fmeasure, ""
        for gram in _ngrams(rouge_tokens(text)):
            eval_index = self._ngrams.get(gram)
            if eval_index is not None:
                return eval_index, "shared_13gram", decision.max_fmeasure, " ".join(gram)
        return None


def record_text(record: dict) -> str:
    """What of an Alpaca record the n-gram test reads: instruction, input and output."""
    return "\n".join(str(record.get(key) or "") for key in ("instruction", "input", "output"))


def task_text(task: SeedTask) -> str:
    """What of an evaluation item the n-gram test reads: instruction, every input and reference."""
    parts = [task.instruction]
    for instance in task.instances:
        parts += [instance["input"], instance["output"]]
    return "\n".join(parts)


def find_contamination(
    records: Sequence[dict], tasks: Sequence[SeedTask], threshold: float = DEFAULT_THRESHOLD
) -> list[Contamination]:
    """Every training record that matches an evaluation item, in record order."""
    index = ContaminationIndex(tasks, threshold)
    found = []
    for position, record in enumerate(records):
        hit = index.match(record["instruction"], record_text(record))
        if hit is not None:
            eval_index, reason, rouge_l, gram = hit
            found.append(Contamination(position, eval_index, reason, round(rouge_l, 4), gram))
    return found
