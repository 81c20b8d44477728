"""`corral audit`: what is wrong with an Alpaca dataset, record by record, in one pass.

Each check names its records and what `--fix` does about them:

| check | finds | --fix |
|---|---|---|
| contamination | an instruction near an evaluation item (ROUGE-L >= 0.7) or a shared 13-gram | drop |
| near_seed | an instruction near a seed task (the novelty filter would have dropped it) | drop |
| exact_duplicate | the same instruction, input and output as an earlier record | drop |
| near_duplicate | an instruction within ROUGE-L 0.7 of an earlier, different one (dedup's index) | drop |
| empty_output | an output with no text | drop |
| repetition_loop | an output that repeats itself (a 3-gram loop, or a line over and over) | drop |
| copies_prompt | an output that only repeats the instruction or the input | drop |
| placeholder_output | an output that is a placeholder (`N/A`, `<nooutput>`, ...) | drop |
| refusal | "As an AI language model", "I'm sorry, but I cannot", ... | drop |
| low_score | with --min-score: a judge's `score` (corral score) below it, or none | drop |
| placeholder_input | an input that stands for none (`<noinput>` and its misspellings, `N/A`) | input emptied |
| length_outlier | an output far longer or shorter than the rest (robust z of log length > 4) | kept, listed |
| non_english | mostly non-ASCII letters where the dataset is ASCII | kept, listed |

Pure: records in, findings out; the CLI reads and writes the files.
"""

from __future__ import annotations

import math
import re
import statistics
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from corral.contamination import find_contamination
from corral.errors import RecordError
from corral.records import SeedTask
from corral.rouge import RougeNoveltyIndex, rouge_tokens

DROP, REPAIR, LIST = "drop", "repair", "list"
CHECKS: dict[str, tuple[str, str]] = {
    "contamination": (DROP, "near an evaluation item (ROUGE-L >= 0.7) or a shared 13-gram"),
    "near_seed": (DROP, "instruction near a seed task (ROUGE-L > 0.7)"),
    "exact_duplicate": (DROP, "same instruction, input and output as an earlier record"),
    "near_duplicate": (DROP, "instruction within ROUGE-L 0.7 of an earlier one"),
    "empty_output": (DROP, "no output text"),
    "repetition_loop": (DROP, "the output repeats itself"),
    "copies_prompt": (DROP, "the output only repeats the instruction or input"),
    "placeholder_output": (DROP, "the output is a placeholder"),
    "refusal": (DROP, "a refusal or AI-assistant boilerplate"),
    "low_score": (DROP, "a judge scored it below --min-score, or gave no score"),
    "placeholder_input": (REPAIR, "the input stands for none (emptied by --fix)"),
    "length_outlier": (LIST, "output length far from the rest"),
    "non_english": (LIST, "mostly non-ASCII letters in an ASCII dataset"),
}

_PLACEHOLDER_INPUT = re.compile(
    r"^\s*(<\s*no[\s_-]*(input|imput|inpt)s?\s*>|<\s*none\s*>|no[\s_-]*inputs?|n/?a|none|null|nil|"
    r"nan|-+|\.+)\s*\.?\s*$",
    re.IGNORECASE,
)
_PLACEHOLDER_OUTPUT = re.compile(
    r"^\s*(<\s*no[\s_-]*outputs?\s*>|no[\s_-]*outputs?|n/?a|none|null|nil|nan)\s*\.?\s*$",
    re.IGNORECASE,
)
_REFUSAL = re.compile(
    r"\b(as an ai(\s+language)?\s+model|as a (large )?language model|i'?m sorry,? but i (can(no|')t|"
    r"am (not able|unable))|i (cannot|can't|am unable to|am not able to) "
    r"(fulfill|complete|provide|assist|help with|comply)|i do not have (the ability|access|"
    r"personal (opinions|experiences)))",
    re.IGNORECASE,
)


@dataclass(frozen=True)
class Finding:
    index: int  # the record's position in the file
    check: str
    detail: str
    related: int | None = None  # the earlier record it repeats, or the evaluation/seed item


@dataclass
class AuditResult:
    total: int
    findings: list[Finding] = field(default_factory=list)

    def by_check(self) -> dict[str, list[Finding]]:
        grouped: dict[str, list[Finding]] = {name: [] for name in CHECKS}
        for finding in self.findings:
            grouped[finding.check].append(finding)
        return grouped

    def to_dict(self, examples: int = 3) -> dict[str, Any]:
        return {
            "kind": "corral-audit",
            "records": self.total,
            "checks": {
                name: {
                    "action": CHECKS[name][0],
                    "what": CHECKS[name][1],
                    "records": len(found),
                    "examples": [vars(f) for f in found[:examples]],
                }
                for name, found in self.by_check().items()
            },
            "to_drop": len(self.dropped_indices()),
        }

    def dropped_indices(self) -> set[int]:
        return {f.index for f in self.findings if CHECKS[f.check][0] == DROP}

    def fix(self, records: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
        """The records without those a drop-check found, placeholder inputs emptied."""
        dropped = self.dropped_indices()
        repair = {f.index for f in self.findings if CHECKS[f.check][0] == REPAIR}
        fixed = []
        for index, record in enumerate(records):
            if index in dropped:
                continue
            fixed.append({**record, "input": ""} if index in repair else dict(record))
        return fixed


def _normal(text: str) -> str:
    return " ".join(rouge_tokens(text))


def repetition_detail(output: str) -> str | None:
    """Why an output looks like a generation loop, or None."""
    lines = [line.strip() for line in output.splitlines() if line.strip()]
    if lines:
        line, count = Counter(lines).most_common(1)[0]
        if count >= 3 and count * len(line) >= 0.5 * len(output.strip()):
            return f"the line {line[:40]!r} {count} times"
    words = output.split()
    if len(words) >= 20:
        grams = Counter(zip(words, words[1:], words[2:], strict=False))
        gram, count = grams.most_common(1)[0]
        if count >= 4 and 3 * count >= 0.3 * len(words):
            return f"{' '.join(gram)!r} {count} times in {len(words)} words"
    return None


def _non_ascii_share(text: str) -> float:
    """The share of words that hold a non-ASCII letter (a few accented names stay low)."""
    words = text.split()
    foreign = sum(any(c.isalpha() and not c.isascii() for c in word) for word in words)
    return foreign / len(words) if words else 0.0


def audit_records(
    records: Sequence[dict[str, Any]],
    *,
    eval_tasks: Sequence[SeedTask] = (),
    seed_tasks: Sequence[SeedTask] = (),
    threshold: float = 0.7,
    min_score: float | None = None,
) -> AuditResult:
    """Every check on every record (the table in the module docstring)."""
    result = AuditResult(total=len(records))
    add = result.findings.append
    for hit in find_contamination(records, eval_tasks, threshold) if eval_tasks else ():
        detail = (
            f"ROUGE-L {hit.rouge_l} to evaluation item {hit.eval_index}"
            if hit.reason == "near_instruction"
            else f"shares {hit.ngram!r} with evaluation item {hit.eval_index}"
        )
        add(Finding(hit.record_index, "contamination", detail, hit.eval_index))

    seeds = RougeNoveltyIndex(threshold)
    seeds.extend(task.instruction for task in seed_tasks)
    novelty = RougeNoveltyIndex(threshold)
    first_of_text: dict[tuple[str, str, str], int] = {}
    first_of_instruction: dict[str, int] = {}
    log_lengths = [math.log1p(len(r.get("output", "").split())) for r in records]
    median = statistics.median(log_lengths) if log_lengths else 0.0
    # Robust spread (MAD), with a floor: in a dataset of equal lengths one essay still stands out.
    spread = max(
        1.4826 * statistics.median(abs(x - median) for x in log_lengths) if records else 0.0,
        0.25,
    )
    shares = [_non_ascii_share(r["instruction"] + r.get("output", "")) for r in records]
    ascii_dataset = bool(shares) and statistics.median(shares) < 0.01

    for index, record in enumerate(records):
        instruction, input_, output = (
            record["instruction"], record.get("input", ""), record.get("output", "")
        )  # fmt: skip
        if seed_tasks:
            decision = seeds.check(instruction)
            if not decision.novel:
                add(Finding(index, "near_seed", f"ROUGE-L {decision.max_fmeasure:.3f} to seed "
                            f"{decision.nearest_index}", decision.nearest_index))  # fmt: skip
        key = (instruction.strip(), input_.strip(), output.strip())
        if key in first_of_text:
            add(Finding(index, "exact_duplicate", f"same as record {first_of_text[key]}",
                        first_of_text[key]))  # fmt: skip
        else:
            first_of_text[key] = index
            stripped = instruction.strip()
            # Another instance of the same task (same instruction, other input) is no duplicate.
            if stripped not in first_of_instruction:
                first_of_instruction[stripped] = index
                decision = novelty.add_if_novel(instruction)
                if not decision.novel:
                    near = first_of_instruction[novelty.texts[decision.nearest_index].strip()]
                    add(Finding(index, "near_duplicate",
                                f"ROUGE-L {decision.max_fmeasure:.3f} to record {near}", near))  # fmt: skip
        if not output.strip():
            add(Finding(index, "empty_output", "no text"))
        elif _PLACEHOLDER_OUTPUT.match(output):
            add(Finding(index, "placeholder_output", repr(output.strip()[:40])))
        else:
            loop = repetition_detail(output)
            if loop:
                add(Finding(index, "repetition_loop", loop))
            normal = _normal(output)
            if normal and normal == _normal(instruction):
                add(Finding(index, "copies_prompt", "the output is the instruction"))
            elif normal and input_.strip() and normal == _normal(input_):
                add(Finding(index, "copies_prompt", "the output is the input"))
            refusal = _REFUSAL.search(output)
            if refusal:
                add(Finding(index, "refusal", repr(refusal.group(0))))
        if min_score is not None:
            score = record.get("score")
            if not isinstance(score, int | float) or isinstance(score, bool):
                add(Finding(index, "low_score", "no score (run corral score first)"))
            elif not math.isfinite(score):
                add(Finding(index, "low_score", f"score {score} is not a number"))
            elif score < min_score:
                add(Finding(index, "low_score", f"score {score} < {min_score}"))
        if input_.strip() and _PLACEHOLDER_INPUT.match(input_):
            add(Finding(index, "placeholder_input", repr(input_.strip()[:40])))
        if abs(log_lengths[index] - median) / spread > 4:
            words = len(output.split())
            add(
                Finding(index, "length_outlier", f"{words} words (median {math.expm1(median):.0f})")
            )
        if ascii_dataset and shares[index] > 0.3:
            add(Finding(index, "non_english", f"{shares[index]:.0%} non-ASCII letters"))
    result.findings.sort(key=lambda f: (f.index, f.check))
    return result


def check_scores(records: Sequence[dict[str, Any]], path: str) -> None:
    """Refuse a `score` that is not a finite number (NaN, Infinity, "4.9", true): such a record
    would pass or fail --min-score by accident, and NaN written back is not JSON. A missing or
    null score is "unscored" (the low_score check)."""
    for index, record in enumerate(records):
        score = record.get("score")
        if score is None:
            continue
        if isinstance(score, bool) or not isinstance(score, int | float):
            got = f"{type(score).__name__} {score!r}"
        elif not math.isfinite(score):
            got = repr(score)
        else:
            continue
        raise RecordError(
            path,
            f"expected a finite number (a judge's 1-5, from corral score) or null, got {got}",
            index=index,
            field="score",
        )


def format_audit(result: AuditResult, examples: int = 2) -> str:
    """The audit as a table: check, records, what --fix does, and examples."""
    lines = [f"{'check':<19} {'records':>7}  {'--fix':<7} examples"]
    for name, found in result.by_check().items():
        action = {DROP: "drop", REPAIR: "repair", LIST: "list"}[CHECKS[name][0]]
        shown = "; ".join(f"#{f.index}: {f.detail}" for f in found[:examples]) or "-"
        lines.append(f"{name:<19} {len(found):>7}  {action:<7} {shown[:100]}")
    lines.append(
        f"{result.total} records; --fix would drop {len(result.dropped_indices())} and keep "
        f"{result.total - len(result.dropped_indices())}"
    )
    return "\n".join(lines)
