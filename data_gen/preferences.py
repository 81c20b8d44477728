"""`corral generate --mode preferences`: preference pairs for DPO, from a dataset's instructions.

For each instruction of `preference_prompts`, two answers are sampled (from the teacher, from a
model or tuned run, or one from each), a judge compares them in both orders, and the pair is kept
only when the judge picks the same answer both times: `{prompt, input, chosen, rejected}`. What
the judge said, and how consistently, goes to `OUTPUT.judgments.jsonl`. Runs in rounds journaled
like every other generation run, so a killed run resumes with nothing judged twice.

This module is where stage 1 uses stage 3: a tuned model answers through `inference` (its own
template, its Dolly-style extraction), because a model must be asked in the format it was
trained on, and only inference knows how.
"""

from __future__ import annotations

import hashlib
import json
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

from corral.data_gen.config import GenerateConfig
from corral.data_gen.journal import Journal
from corral.data_gen.judges import EndpointJudge, LocalJudge, combine_orders, judge_prompt
from corral.data_gen.manifest import build_manifest, run_paths
from corral.data_gen.teachers import Completion, SamplingParams
from corral.inference.loading import load_for_inference

from corral.config import config_to_dict
from corral.errors import UsageError
from corral.fileio import atomic_open, atomic_write_text, check_output_path, exclusive_output
from corral.records import read_alpaca, write_alpaca

TEACHER = "teacher"


def judgments_path(output: str | Path) -> Path:
    output = Path(output)
    stem = output.with_suffix("") if output.suffix else output
    return Path(f"{stem}.judgments.jsonl")


class _Answerers:
    """Who answers: the teacher, models or runs (through inference), two answers per prompt."""

    def __init__(self, config: GenerateConfig, teacher: Any) -> None:
        self.config = config
        self.teacher = teacher
        sources = list(config.answer_sources)
        # One source answers twice (two samples); two sources answer once each.
        self.slots = sources * 2 if len(sources) == 1 else sources[:2]
        self._loaded: dict[str, Any] = {}

    def answer(self, records: list[dict[str, Any]], round_no: int) -> list[list[str | None]]:
        """Two answers per record (None where a source failed)."""
        columns = []
        for slot, source in enumerate(self.slots):
            seed = self.config.seed * 1000 + round_no * 10 + slot  # another sample per slot
            if source == TEACHER:
                columns.append(self._from_teacher(records))
            else:
                columns.append(self._from_model(source, records, seed))
        return [list(pair) for pair in zip(*columns, strict=True)]

    def _from_teacher(self, records: list[dict[str, Any]]) -> list[str | None]:
        # Two calls sample twice: an endpoint at temperature > 0, a local teacher reseeded per call.
        prompts = [
            r["instruction"] + (f"\n\n{r['input']}" if r.get("input") else "") for r in records
        ]
        c = self.config
        replies = self.teacher.complete(
            prompts,
            SamplingParams(temperature=c.temperature, top_p=c.top_p, max_tokens=c.max_tokens),
        )
        return [r.text.strip() or None if isinstance(r, Completion) else None for r in replies]

    def _from_model(
        self, source: str, records: list[dict[str, Any]], seed: int
    ) -> list[str | None]:
        from corral.inference.generation import answer_instructions

        if source not in self._loaded:
            self._loaded[source] = load_for_inference(source)
        answers = answer_instructions(
            source,
            [{"instruction": r["instruction"], "input": r.get("input", "")} for r in records],
            max_new_tokens=self.config.max_tokens,
            temperature=max(self.config.temperature, 0.01),
            seed=seed,
            loaded=self._loaded[source],
        )
        return [a.text.strip() or None for a in answers]


def _build_judge(config: GenerateConfig) -> Any:
    if config.judge_base_url:
        return EndpointJudge(config.judge_model or config.model, config.judge_base_url)
    if config.judge:
        return LocalJudge(config.judge)
    if config.teacher == "openai":
        return EndpointJudge(config.model, config.base_url or None)
    return LocalJudge(config.model)


def generate_preferences(
    config: GenerateConfig, *, progress: bool = True, overwrite: bool = False
) -> dict[str, Any]:
    """Run (or resume) a preferences run; returns its manifest. `overwrite` starts over."""
    if not config.preference_prompts:
        raise UsageError("mode preferences needs preference_prompts=FILE (the instructions)")
    prompts_path = Path(config.preference_prompts)
    output, journal_path, manifest_path = run_paths(config.output)
    for path in (output, journal_path, manifest_path, judgments_path(output)):
        check_output_path(path, inputs=(prompts_path,))
    records = read_alpaca(prompts_path, require_output=False)[: config.num_instructions]
    with exclusive_output(output, what="dataset"):
        if overwrite:
            for path in (journal_path, manifest_path, output, judgments_path(output)):
                path.unlink(missing_ok=True)
        finished = [p for p in (output, manifest_path) if p.exists()]
        if finished and not journal_path.exists():
            raise UsageError(
                f"{finished[0]}: a dataset is already there and its journal "
                f"{journal_path.name} is gone, so the run cannot be resumed; re-run with "
                "--overwrite to replace it, or choose another --output"
            )
        return _run(config, records, prompts_path, progress)


def _run(
    config: GenerateConfig, records: list[dict[str, Any]], prompts_path: Path, progress: bool
) -> dict[str, Any]:
    from corral.data_gen.pipeline import build_teacher, teacher_identity
    from tqdm import tqdm

    output, journal_path, manifest_path = run_paths(config.output)
    started = time.monotonic()
    fingerprint = {
        "mode": "preferences",
        "prompts_sha256_16": hashlib.sha256(prompts_path.read_bytes()).hexdigest()[:16],
        "teacher": teacher_identity(config),
        "answer_sources": list(config.answer_sources),
        "judge": [config.judge, config.judge_base_url, config.judge_model],
        "seed": config.seed,
        **{
            name: getattr(config, name)
            for name in ("temperature", "top_p", "max_tokens", "presence_penalty")
        },
    }
    journal = Journal(journal_path, task_problem=_pair_problem)
    state = journal.open(fingerprint)
    done = int(state.last_commit.get("prompts_done", 0))
    counts: Counter = Counter(state.last_commit.get("counts", {}))
    pairs = list(state.tasks)
    teacher = judge = None
    try:
        if done < len(records):
            needs_teacher = TEACHER in config.answer_sources
            teacher = build_teacher(config) if needs_teacher else None
            judge = _build_judge(config)
            answerers = _Answerers(config, teacher)
            bar = tqdm(total=len(records), initial=done, unit="prompt", desc="preferences",
                       disable=not progress, file=sys.stderr)  # fmt: skip
            size = config.rounds_size()
            round_no = state.rounds
            while done < len(records):
                round_no += 1
                batch = records[done : done + size]
                kept = _judge_round(batch, done, answerers.answer(batch, round_no), judge, counts)
                pairs += kept
                done += len(batch)
                journal.commit(
                    kept, {"round": round_no, "prompts_done": done, "counts": dict(counts)}
                )
                bar.update(len(batch))
                bar.set_postfix(pairs=len(pairs), refresh=True)
            bar.close()
    finally:
        journal.close()
        for holder in (teacher, judge):
            if holder is not None:
                holder.close()

    write_alpaca(
        output,
        [{k: p[k] for k in ("prompt", "input", "chosen", "rejected") if k in p} for p in pairs],
    )
    with atomic_open(judgments_path(output)) as handle:
        for pair in pairs:
            handle.write(json.dumps({"prompt": pair["prompt"], **pair["judgment"]}) + "\n")
    manifest = build_manifest(
        mode="preferences",
        output=output,
        journal=journal_path,
        seed_tasks={"path": str(prompts_path), "count": len(records), "sha256_16": ""},
        teacher=teacher_identity(config),
        tasks=pairs,
        records=len(pairs),
        candidates=done,
        drops=dict(counts),
        teacher_stats={},
        duration_s=time.monotonic() - started,
        resumed=state.resumed,
        config=config_to_dict(config),
    )

    atomic_write_text(manifest_path, json.dumps(manifest, indent=2, ensure_ascii=False) + "\n")
    return manifest


def _pair_problem(entry: dict[str, Any]) -> str | None:
    """What is wrong with a journaled preference pair (what the output is written from)."""
    for name in ("prompt", "chosen", "rejected"):
        if not isinstance(entry.get(name), str):
            return f"a pair needs '{name}' (str), got {entry.get(name)!r}"
    if not isinstance(entry.get("judgment"), dict):
        return f"a pair needs 'judgment' (an object), got {entry.get('judgment')!r}"
    return None


def _judge_round(
    batch: list[dict[str, Any]],
    first_index: int,
    answers: list[list[str | None]],
    judge: Any,
    counts: Counter,
) -> list[dict[str, Any]]:
    """Judge each record's two answers in both orders; keep the pairs the judge agrees on."""
    judged = []
    for offset, (record, (first, second)) in enumerate(zip(batch, answers, strict=True)):
        if first is None or second is None:
            counts["answer_failed"] += 1
        elif first.strip() == second.strip():
            counts["identical_answers"] += 1
        else:
            judged.append((first_index + offset, record, first, second))
    if not judged:
        return []
    prompts = [judge_prompt(r["instruction"], r.get("input", ""), a, b) for _, r, a, b in judged]
    prompts += [judge_prompt(r["instruction"], r.get("input", ""), b, a) for _, r, a, b in judged]
    verdicts = judge.judge(prompts)
    kept = []
    for position, (index, record, first, second) in enumerate(judged):
        forward, backward = verdicts[position], verdicts[len(judged) + position]
        outcome = combine_orders(forward, backward)  # "base" = first answer, "tuned" = second
        if outcome == "tie":
            counts["judge_inconsistent" if None not in (forward, backward) else "unparsed"] += 1
            continue
        chosen, rejected = (first, second) if outcome == "base" else (second, first)
        kept.append(
            {
                "prompt": record["instruction"],
                **({"input": record["input"]} if record.get("input") else {}),
                "chosen": chosen,
                "rejected": rejected,
                "judgment": {
                    "record": index,
                    "verdicts": {"first_shown_first": forward, "second_shown_first": backward},
                    "agreement": "both orders",
                    "judge": judge.describe(),
                },
            }
        )
    return kept
