"""`corral score`: a judge rates every record 1-5 for how accurate and helpful its output is for its
instruction and input (the AlpaGasus idea: train on the best records, not on all of them).

The judge is any OpenAI-compatible endpoint (concurrent, retried and costed like a teacher; it
answers with the score on the first line and a one-line reason after it) or a local model (its
score is the expectation of its next-token distribution over the digits 1-5, so even a small
model always scores, and the same record always gets the same score). Scores are saved to
`OUTPUT.partial.jsonl` as they come, so an interrupted run resumes; OUTPUT is the records with
`score` and `score_reason` added, written atomically at the end. `corral audit --min-score`
keeps the best.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import statistics
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from corral.data_gen.judges import LocalJudge
from corral.data_gen.teachers import Completion, SamplingParams

from corral.errors import UsageError
from corral.records import read_alpaca, write_alpaca

SCORE_PROMPT = """Rate the response below on a scale from 1 to 5: how accurate, complete and \
helpful it is for the instruction (and its input, if any). 5 is a correct, complete and useful \
answer; 3 is partly right or partly helpful; 1 is wrong, empty, off-topic or a refusal.

### Instruction:
{instruction}
{input_block}
### Response:
{output}

Reply with the score alone on the first line, then one line that says why."""

_SCORE = re.compile(r"\b([1-5](?:\.\d+)?)\b")
PARTIAL_SUFFIX = ".partial.jsonl"
SCORES = (1, 2, 3, 4, 5)


def score_prompt(record: dict[str, Any]) -> str:
    input_ = (record.get("input") or "").strip()
    return SCORE_PROMPT.format(
        instruction=record["instruction"],
        input_block=f"\n### Input:\n{input_}\n" if input_ else "",
        output=record.get("output", ""),
    )


def parse_score(text: str) -> tuple[float | None, str]:
    """(score in 1..5, reason) from a judge's reply; (None, reply) when it holds no score."""
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    for position, line in enumerate(lines):
        match = _SCORE.search(line)
        if match and 1.0 <= float(match.group(1)) <= 5.0:
            rest = line[match.end() :].strip(" .:-") or " ".join(lines[position + 1 :])
            return float(match.group(1)), " ".join(rest.split())[:300]
    return None, " ".join(text.split())[:300]


@dataclass
class Verdict:
    score: float | None
    reason: str


class EndpointScorer:
    """An OpenAI-compatible endpoint as judge (chat API, temperature 0)."""

    def __init__(self, teacher: Any) -> None:
        self.teacher = teacher

    def score(self, records: Sequence[dict[str, Any]]) -> list[Verdict]:
        replies = self.teacher.complete(
            [score_prompt(r) for r in records], SamplingParams(temperature=0.0, max_tokens=96)
        )
        verdicts = []
        for reply in replies:
            if isinstance(reply, Completion):
                verdicts.append(Verdict(*parse_score(reply.text)))
            else:
                verdicts.append(Verdict(None, f"request failed: {reply.error}"))
        return verdicts

    def describe(self) -> dict[str, Any]:
        return {**self.teacher.describe(), "method": "score on the reply's first line"}

    def cost(self) -> dict[str, Any]:
        return self.teacher.stats.to_dict()

    def close(self) -> None:
        self.teacher.close()


class LocalScorer:
    """A local model as judge: the expected digit under its next-token distribution over 1-5."""

    def __init__(self, model: str, batch_size: int = 4) -> None:
        self.judge = LocalJudge(model, labels=tuple(str(n) for n in SCORES))
        self.batch_size = batch_size

    def score(self, records: Sequence[dict[str, Any]]) -> list[Verdict]:
        verdicts = []
        for probabilities in self.judge.label_probabilities([score_prompt(r) for r in records]):
            expected = sum(int(label) * p for label, p in probabilities.items())
            likeliest = max(probabilities, key=probabilities.get)
            verdicts.append(
                Verdict(
                    round(expected, 3),
                    f"P({likeliest})={probabilities[likeliest]:.2f} under {self.judge.name}",
                )
            )
        return verdicts

    def describe(self) -> dict[str, Any]:
        return {"kind": "local", "model": self.judge.name, "method": "expected next digit 1-5"}

    def cost(self) -> dict[str, Any]:
        return {}

    def close(self) -> None:
        pass


@dataclass
class ScoreSummary:
    records: int
    scored_now: int
    resumed: int
    unscored: int
    histogram: dict[str, int] = field(default_factory=dict)
    mean: float | None = None
    seconds: float = 0.0
    cost: dict[str, Any] = field(default_factory=dict)


def partial_path(output: Path) -> Path:
    return output.with_name(output.name + PARTIAL_SUFFIX)


def _read_partial(path: Path, header: dict[str, Any], total: int) -> dict[int, Verdict]:
    if not path.is_file():
        return {}
    lines = path.read_text(encoding="utf-8").splitlines()
    if not lines:
        return {}
    try:
        saved = json.loads(lines[0])
    except json.JSONDecodeError:
        saved = None
    if saved != header:
        raise UsageError(
            f"{path}: left by a run with another input or judge; delete it to start over, or "
            "rerun with the same arguments to resume"
        )
    done: dict[int, Verdict] = {}
    for number, line in enumerate(lines[1:], start=2):
        try:
            entry = json.loads(line)
        except json.JSONDecodeError:
            if number == len(lines):
                break  # cut short by the interruption: score that record again
            raise UsageError(f"{path}: line {number}: not valid JSON; delete the file") from None
        index = entry.get("index")
        if isinstance(index, int) and 0 <= index < total:
            done[index] = Verdict(entry.get("score"), entry.get("reason", ""))
    return done


def score_file(
    input_path: str | os.PathLike,
    output_path: str | os.PathLike,
    scorer: Any,
    *,
    chunk: int | None = None,
    progress: bool = True,
) -> ScoreSummary:
    """Score every record of `input_path`; write them with `score`/`score_reason` to output."""
    from tqdm import tqdm

    started = time.monotonic()
    # Records are written a round at a time: an endpoint judge's round is its concurrency, so a
    # kill loses only the requests in flight (paid answers not yet written); a local judge's 32.
    chunk = chunk or scorer.describe().get("concurrency", 32)
    input_path, output_path = Path(input_path), Path(output_path)
    records = read_alpaca(input_path)
    header = {
        "corral_scores": 1,
        "input_sha256": hashlib.sha256(input_path.read_bytes()).hexdigest(),
        "judge": {k: v for k, v in scorer.describe().items() if k != "concurrency"},
    }
    partial = partial_path(output_path)
    done = _read_partial(partial, header, len(records))
    resumed = len(done)
    todo = [i for i in range(len(records)) if i not in done]
    fresh = not partial.is_file() or not done
    with open(partial, "w" if fresh else "a", encoding="utf-8") as sink:
        if fresh:
            sink.write(json.dumps(header) + "\n")
        bar = tqdm(total=len(records), initial=resumed, unit="record", desc="scoring",
                   disable=not progress)  # fmt: skip
        judge = getattr(scorer, "teacher", None)
        if progress and hasattr(judge, "on_error"):
            # A failing judge shows at once, not after its chunk gives up.
            judge.on_error = lambda _: bar.set_postfix(errors=sum(judge.stats.errors.values()))
        try:
            for start in range(0, len(todo), chunk):
                indices = todo[start : start + chunk]
                for index, verdict in zip(
                    indices, scorer.score([records[i] for i in indices]), strict=True
                ):
                    done[index] = verdict
                    line = {"index": index, "score": verdict.score, "reason": verdict.reason}
                    sink.write(json.dumps(line, ensure_ascii=False) + "\n")
                sink.flush()
                os.fsync(sink.fileno())
                bar.update(len(indices))
        finally:
            bar.close()
    scored = [
        {**record, "score": done[i].score, "score_reason": done[i].reason}
        for i, record in enumerate(records)
    ]
    write_alpaca(output_path, scored)
    partial.unlink(missing_ok=True)
    values = [r["score"] for r in scored if r["score"] is not None]
    return ScoreSummary(
        records=len(records),
        scored_now=len(todo),
        resumed=resumed,
        unscored=len(records) - len(values),
        histogram={str(n): sum(1 for v in values if round(v) == n) for n in SCORES},
        mean=round(statistics.fmean(values), 3) if values else None,
        seconds=round(time.monotonic() - started, 2),
        cost=scorer.cost(),
    )
