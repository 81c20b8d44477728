"""Seed tasks to Alpaca JSON: the Stanford Alpaca and Self-Instruct generation loops.

A run goes in rounds. Each round sends a batch of prompts to the teacher (concurrently for an
endpoint, as one generation batch for a local model), parses the replies, filters them (rules,
then ROUGE-L novelty against the seeds and everything kept), and commits the accepted tasks to
the journal. Re-running the same command resumes from the last committed round. When the target is
reached, the Alpaca JSON and a manifest are written atomically beside the journal.
"""

from __future__ import annotations

import hashlib
import json
import math
import random
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from corral.data_gen import filters, parsers, prompts
from corral.data_gen.config import GenerateConfig
from corral.data_gen.filters import InstructionRules, filter_instances
from corral.data_gen.journal import Journal
from corral.data_gen.lineage import lineage_path, write_lineage
from corral.data_gen.manifest import build_manifest, read_estimate, run_paths
from corral.data_gen.methods import method_fingerprint, method_for
from corral.data_gen.teachers import Completion, FailedRequest, OpenAIBatchTeacher, SamplingParams

from corral.config import config_to_dict
from corral.contamination import ContaminationIndex
from corral.errors import UsageError
from corral.fileio import atomic_write_text, check_output_path, exclusive_output
from corral.records import SeedTask, read_seed_tasks, write_alpaca
from corral.rouge import RougeNoveltyIndex


class GenerationError(RuntimeError):
    """The run cannot go on (the teacher keeps producing nothing usable); the message says why."""


@dataclass
class GenerationResult:
    output_path: Path
    manifest_path: Path
    journal_path: Path
    instructions: int
    records: int
    drops: dict[str, int]
    teacher: dict[str, Any]
    duration_s: float
    resumed: bool
    manifest: dict[str, Any] = field(default_factory=dict)


def load_seeds(config: GenerateConfig) -> tuple[list[SeedTask], dict[str, Any]]:
    path = config.seed_tasks_path()
    seeds = read_seed_tasks(path)
    return seeds, {"path": str(path), "count": len(seeds), "sha256_16": _sha256_16(path)}


def build_teacher(config: GenerateConfig) -> Any:
    """The teacher a config names (loads a local model, or prepares an endpoint client)."""
    from corral.data_gen.teachers import LocalTeacher, OpenAICompatibleTeacher

    if config.teacher == "openai":
        if config.api == "batch":
            kind, extra = OpenAIBatchTeacher, {"poll_seconds": config.batch_poll_seconds}
        else:
            kind, extra = OpenAICompatibleTeacher, {"api": config.api}
        teacher = kind(
            config.model,
            **extra,
            base_url=config.base_url or None,
            api_key_env=config.api_key_env,
            concurrency=config.concurrency,
            max_retries=config.max_retries,
            timeout=config.request_timeout,
            backoff_base=config.backoff_base,
            backoff_cap=config.backoff_cap,
            price_per_1k_prompt_tokens=config.price_per_1k_prompt_tokens,
            price_per_1k_completion_tokens=config.price_per_1k_completion_tokens,
            patience=config.teacher_patience,
            max_failures_in_a_row=config.max_failures_in_a_row,
        )
        try:
            teacher.check_reachable()  # before the first paid request, not after 50 rounds
        except BaseException:
            teacher.close()
            raise
        return teacher
    return LocalTeacher(
        config.model,
        api=config.api,
        batch_size=config.local_batch_size,
        repetition_penalty=config.repetition_penalty,
        seed=config.seed,
        dtype=config.local_dtype,
    )


def sampling_settings(config: GenerateConfig) -> dict[str, Any]:
    """The teacher's sampling settings of a run (per step for Self-Instruct)."""
    settings = {
        "temperature": config.temperature,
        "top_p": config.top_p,
        "max_tokens": config.max_tokens,
        "presence_penalty": config.presence_penalty,
    }
    if config.mode == "self-instruct":
        settings["instances"] = {
            "temperature": config.instance_temperature,
            "max_tokens": config.instance_max_tokens,
            "presence_penalty": config.instance_presence_penalty,
        }
    return settings


def teacher_identity(config: GenerateConfig) -> dict[str, Any]:
    if config.teacher == "openai":
        return {
            "kind": "openai-compatible",
            "model": config.model,
            "base_url": config.base_url,
            "api": config.api,
        }
    return {"kind": "local", "model": config.model, "api": config.api}


# Settings that change what the teacher is asked or what is kept: a journal made with other
# values is not resumed (the data would mix two settings under a manifest naming one). The target
# count, concurrency, round size, retries, timeouts, prices and the local dtype may change.
ASKED_SETTINGS = (
    "turns",
    "temperature",
    "top_p",
    "max_tokens",
    "presence_penalty",
    "repetition_penalty",
    "num_prompt_instructions",
    "tasks_per_request",
    "num_human_demos",
    "num_machine_demos",
    "max_bootstrap_tasks",
    "classification_examples",
    "instance_examples",
    "instance_max_tokens",
    "instance_temperature",
    "instance_presence_penalty",
    "max_instances",
    "min_instruction_words",
    "max_instruction_words",
    "blocklist",
)


def run_fingerprint(config: GenerateConfig, seeds_info: dict[str, Any]) -> dict[str, Any]:
    """What must match for a journal to be resumed: the run's identity and `ASKED_SETTINGS`."""
    return {
        "mode": config.mode,
        "seed_tasks_sha256_16": seeds_info["sha256_16"],
        "teacher": teacher_identity(config),
        "rouge_threshold": config.rouge_threshold,
        "seed": config.seed,
        # Only when set, so journals from before the option existed still resume.
        **({"eval_set_sha256_16": _sha256_16(Path(config.eval_set))} if config.eval_set else {}),
        **{name: _plain(getattr(config, name)) for name in ASKED_SETTINGS},
    }


def _plain(value: Any) -> Any:
    """A setting as it reads back from the journal's JSON (tuples become lists)."""
    return list(value) if isinstance(value, tuple) else value


def _sha256_16(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()[:16]


def records_from_tasks(tasks: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Alpaca records, one per instance of every accepted task; in conversations mode, one
    ShareGPT conversation per task."""
    if tasks and "conversation" in tasks[0]:
        speakers = {"user": "human", "assistant": "gpt"}
        return [
            {
                "conversations": [
                    {"from": speakers[m["role"]], "value": m["content"]} for m in t["conversation"]
                ]
            }  # fmt: skip
            for t in tasks
        ]
    return [
        {"instruction": t["instruction"], "input": inst["input"], "output": inst["output"]}
        | ({"reasoning": inst["reasoning"]} if inst.get("reasoning") else {})  # magpie, evol
        for t in tasks
        for inst in t["instances"]
    ]


class _Generator:
    """One run's state: seeds, rules, novelty index, counters. Used by `generate_dataset`."""

    def __init__(self, config: GenerateConfig, seeds: list[SeedTask], teacher: Any) -> None:
        self.config = config
        self.seeds = seeds
        self.teacher = teacher
        self.rules = InstructionRules(
            config.min_instruction_words, config.max_instruction_words, tuple(config.blocklist)
        )
        self.index = RougeNoveltyIndex(config.rouge_threshold)
        self.index.extend(s.instruction for s in seeds)
        self.protected = (
            ContaminationIndex(read_seed_tasks(config.eval_set)) if config.eval_set else None
        )
        self.machine_instructions: list[str] = []
        self.drops: Counter = Counter()
        self.candidates = 0
        classification = [s for s in seeds if s.is_classification]
        others = [s for s in seeds if not s.is_classification]
        self.classification_seeds = classification
        self.other_seeds = others
        # A fixed, balanced few-shot set for "Is it classification?": identical prompts every time.
        half = config.classification_examples // 2
        picked = (
            classification[:half]
            + others[: config.classification_examples - min(half, len(classification))]
        )
        random.Random(0).shuffle(picked)
        self.classification_fewshot = picked[: config.classification_examples]
        self.method = method_for(config, seeds, teacher)  # magpie and evol rounds (methods.py)

    def restore(self, tasks: list[dict[str, Any]], drops: dict[str, int], candidates: int) -> None:
        """Continue a journaled run: its kept tasks join the pool, its counters carry on."""
        for task in tasks:
            self.index.add(task["instruction"])
            self.machine_instructions.append(task["instruction"])
        self.drops = Counter(drops)
        self.candidates = candidates
        if self.method is not None:
            self.method.restore(tasks)

    def round(self, rng: random.Random, size: int) -> list[dict[str, Any]]:
        """One round of the configured mode: `size` first requests, and the tasks accepted."""
        if self.method is not None:
            return self.method.round(self, rng, size)
        if self.config.mode == "alpaca":
            return self.alpaca_round(rng, size)
        if self.config.mode == "conversations":
            return self.conversation_round(rng, size)
        return self.self_instruct_round(rng, size)

    # ------------------------------------------------------------ shared steps

    def _sampling(self, stop: list[str]) -> SamplingParams:
        c = self.config
        return SamplingParams(
            temperature=c.temperature,
            top_p=c.top_p,
            max_tokens=c.max_tokens,
            stop=tuple(stop),
            presence_penalty=c.presence_penalty,
        )

    def _accept_instruction(self, instruction: str, *, add: bool) -> dict[str, Any] | None:
        """Rules, then novelty. `add=False` only checks (Self-Instruct adds after instances)."""
        reason = self.rules.drop_reason(instruction)
        if reason:
            self.drops[reason] += 1
            return None
        decision = self.index.add_if_novel(instruction) if add else self.index.check(instruction)
        if not decision.novel:
            self.drops[filters.NOT_NOVEL] += 1
            return None
        nearest = (
            self.index.texts[decision.nearest_index] if decision.nearest_index is not None else None
        )
        return {"nearest_instruction": nearest, "rouge_l": round(decision.max_fmeasure, 4)}

    def _contaminated(self, instruction: str, instances: list[dict[str, str]]) -> bool:
        """Whether a task matches the evaluation set (counted as a drop when it does)."""
        if self.protected is None:
            return False
        text = "\n".join([instruction, *(f"{i['input']}\n{i['output']}" for i in instances)])
        if self.protected.match(instruction, text) is None:
            return False
        self.drops[filters.CONTAMINATED] += 1
        return True

    def _completions(self, prompts_: list[str], params: SamplingParams) -> list[Completion | None]:
        results = self.teacher.complete(prompts_, params)
        out: list[Completion | None] = []
        for r in results:
            if isinstance(r, FailedRequest):
                self.drops[filters.REQUEST_FAILED] += 1
                out.append(None)
            else:
                out.append(r)
        return out

    def _parsed_candidates(
        self, prompts_: list[str], params: SamplingParams, parse: Callable[[str, str], Any]
    ) -> Iterator[tuple[int, dict[str, Any]]]:
        """(request index, item) for each item the teacher's completions parse into, counting
        parse drops and candidates."""
        for request, completion in enumerate(self._completions(prompts_, params)):
            if completion is None:
                continue
            parsed = parse(completion.text, completion.finish_reason)
            self.drops.update(parsed.drops)
            for item in parsed.items:
                self.candidates += 1
                yield request, item

    # ------------------------------------------------------------ Stanford Alpaca

    def alpaca_round(self, rng: random.Random, size: int) -> list[dict[str, Any]]:
        c = self.config
        k = min(c.num_prompt_instructions, len(self.seeds))
        shown = [rng.sample(self.seeds, k) for _ in range(size)]
        batch = [prompts.alpaca_prompt(demos, c.tasks_per_request) for demos in shown]
        params = self._sampling(prompts.alpaca_stop_sequences(c.tasks_per_request))
        accepted = []
        for request, item in self._parsed_candidates(batch, params, parsers.parse_alpaca_tasks):
            if self._contaminated(item["instruction"], [item]):
                continue
            info = self._accept_instruction(item["instruction"], add=True)
            if info is None:
                continue
            accepted.append(
                {
                    "instruction": item["instruction"],
                    "instances": [{"input": item["input"], "output": item["output"]}],
                    **info,
                    "lineage": {"request": request, "seeds": [s.id for s in shown[request]]},
                }
            )
        return accepted

    # ------------------------------------------------------------ conversations (self-chat)

    def conversation_round(self, rng: random.Random, size: int) -> list[dict[str, Any]]:
        """First turns as in Alpaca mode (rules, novelty and contamination checked there), then
        `turns - 1` follow-ups: the teacher plays the user, then answers. A conversation whose
        follow-up or answer comes back unusable keeps the turns it has."""
        tasks = self.alpaca_round(rng, size)
        for task in tasks:
            first = task["instances"][0]
            question = task["instruction"] + (f"\n\n{first['input']}" if first["input"] else "")
            task["conversation"] = [
                {"role": "user", "content": question},
                {"role": "assistant", "content": first["output"]},
            ]
        params = self._sampling(prompts.turn_stop_sequences())
        for turn in range(1, self.config.turns):
            growing = [t for t in tasks if len(t["conversation"]) == 2 * turn]
            if not growing:
                break
            asked = []
            questions = self._completions(
                [prompts.follow_up_prompt(t["conversation"]) for t in growing], params
            )
            for task, completion in zip(growing, questions, strict=True):
                text = parsers.parse_turn(completion.text, completion.finish_reason) if (
                    completion is not None
                ) else None  # fmt: skip
                if text is None:
                    self.drops[filters.UNUSABLE_TURN] += 1
                    continue
                task["conversation"].append({"role": "user", "content": text})
                asked.append(task)
            answers = self._completions(
                [prompts.reply_prompt(t["conversation"]) for t in asked], params
            )
            for task, completion in zip(asked, answers, strict=True):
                text = parsers.parse_turn(completion.text, completion.finish_reason) if (
                    completion is not None
                ) else None  # fmt: skip
                if text is None:
                    self.drops[filters.UNUSABLE_TURN] += 1
                    task["conversation"].pop()  # the question stays unasked
                    continue
                task["conversation"].append({"role": "assistant", "content": text})
        return tasks

    # ------------------------------------------------------------ Self-Instruct

    def self_instruct_round(self, rng: random.Random, size: int) -> list[dict[str, Any]]:
        c = self.config
        # Step 1: bootstrap instructions from human and machine demonstrations.
        batch = []
        origins = []
        for request in range(size):
            machine = rng.sample(
                self.machine_instructions, min(c.num_machine_demos, len(self.machine_instructions))
            )
            n_human = c.num_human_demos + c.num_machine_demos - len(machine)
            human = rng.sample(self.seeds, min(n_human, len(self.seeds)))
            demos = [s.instruction for s in human] + machine
            rng.shuffle(demos)
            batch.append(prompts.bootstrap_prompt(demos))
            origins.append(
                {"request": request, "seeds": [s.id for s in human], "machine": list(machine)}
            )
        params = self._sampling(prompts.bootstrap_stop_sequences(c.max_bootstrap_tasks))
        candidates: list[tuple[str, dict[str, Any]]] = []
        in_round = RougeNoveltyIndex(c.rouge_threshold)
        for request, item in self._parsed_candidates(
            batch, params, parsers.parse_bootstrap_instructions
        ):
            info = self._accept_instruction(item["instruction"], add=False)
            if info is None:
                continue
            if not in_round.add_if_novel(item["instruction"]).novel:
                self.drops[filters.NOT_NOVEL] += 1
                continue
            candidates.append((item["instruction"], {**info, "lineage": origins[request]}))
        if not candidates:
            return []

        # Step 2: is each a classification task?
        instance_params = SamplingParams(
            temperature=c.instance_temperature,
            top_p=1.0,
            max_tokens=3,
            presence_penalty=0.0,
        )
        answers = self._completions(
            [
                prompts.classification_prompt(self.classification_fewshot, text)
                for text, _ in candidates
            ],
            instance_params,
        )
        is_cls = [
            bool(parsers.parse_classification_answer(a.text)) if a is not None else False
            for a in answers
        ]

        # Step 3: instances, output-first for classification tasks.
        instance_prompts = []
        for (text, _), cls in zip(candidates, is_cls, strict=True):
            pool = (self.classification_seeds if cls else self.other_seeds) or self.seeds
            examples = rng.sample(pool, min(c.instance_examples, len(pool)))
            instance_prompts.append(prompts.instances_prompt(examples, text, is_classification=cls))
        params = SamplingParams(
            temperature=c.instance_temperature,
            top_p=1.0,
            max_tokens=c.instance_max_tokens,
            stop=tuple(prompts.instances_stop_sequences()),
            presence_penalty=c.instance_presence_penalty,
        )
        accepted = []
        for (text, info), cls, completion in zip(
            candidates, is_cls, self._completions(instance_prompts, params), strict=True
        ):
            if completion is None:
                continue
            parsed = parsers.parse_instances(
                completion.text, is_classification=cls, finish_reason=completion.finish_reason
            )
            self.drops.update(parsed.drops)
            kept, dropped = filter_instances(parsed.items)
            self.drops.update(dropped)
            kept = kept[: c.max_instances]
            if not kept:
                self.drops[filters.NO_VALID_INSTANCES] += 1
                continue
            if self._contaminated(text, kept):
                continue
            # Step 4: the instruction joins the pool (checked again against this round's earlier
            # acceptances, which it already passed as candidates).
            if not self.index.add_if_novel(text).novel:
                self.drops[filters.NOT_NOVEL] += 1
                continue
            accepted.append(
                {"instruction": text, "is_classification": cls, "instances": kept, **info}
            )
        return accepted


def generate_dataset(
    config: GenerateConfig,
    *,
    teacher: Any = None,
    progress: bool = True,
    log: Callable[[str], None] | None = None,
    overwrite: bool = False,
) -> GenerationResult:
    """Run (or resume) a generation and write the Alpaca JSON and its manifest.

    `teacher` may be passed in (any object with `complete(prompts, SamplingParams)`, `stats`,
    `describe()`); otherwise it is built from the config, and only if work remains. The outputs
    are checked before anything else (none may be the seed file, each must be writable), and one
    process at a time runs a given output.
    """
    output_path = run_paths(config.output)[0]
    for path in (*run_paths(config.output), lineage_path(config.output)):
        check_output_path(path, inputs=(config.seed_tasks_path(), config.eval_set or None))
    with exclusive_output(output_path, what="dataset"):
        return _generate(config, teacher, progress, log, overwrite)


def _generate(
    config: GenerateConfig,
    teacher: Any,
    progress: bool,
    log: Callable[[str], None] | None,
    overwrite: bool,
) -> GenerationResult:
    log = log or (lambda text: print(text, file=sys.stderr))
    started = time.monotonic()
    seeds, seeds_info = load_seeds(config)
    output_path, journal_path, manifest_path = run_paths(config.output)
    fresh = overwrite or not journal_path.exists()
    if fresh and not overwrite:
        finished = [p for p in (output_path, manifest_path) if p.exists()]
        if finished:
            # Without its journal a finished dataset cannot be resumed or checked against these
            # settings: replacing it would discard what was paid for.
            raise UsageError(
                f"{finished[0]}: a dataset is already there and its journal "
                f"{journal_path.name} is gone, so the run cannot be resumed; re-run with "
                "--overwrite to replace it, or choose another --output"
            )
    own_teacher = teacher is None
    if own_teacher and fresh:
        # A new run needs the teacher: reach it before deleting or creating any file.
        teacher = build_teacher(config)
    try:
        if overwrite:
            for path in (journal_path, manifest_path, output_path, lineage_path(config.output)):
                path.unlink(missing_ok=True)
        journal = Journal(journal_path)
        state = journal.open({**run_fingerprint(config, seeds_info), **method_fingerprint(config)})
        if own_teacher and teacher is None and len(state.tasks) < config.num_instructions:
            teacher = build_teacher(config)  # a resumed run that still has work to do
        if isinstance(teacher, OpenAIBatchTeacher):
            # Batches sent before a crash are polled, not sent (and paid for) again.
            teacher.resume_batches(state.batches, journal.record_batch, log)
    except BaseException:
        if own_teacher and teacher is not None:
            teacher.close()
        raise
    target = config.num_instructions
    tasks = state.tasks
    previous = state.last_commit
    elapsed_before = float(previous.get("elapsed_s", 0.0))
    drops: dict[str, int] = dict(previous.get("drops", {}))
    if state.resumed:
        log(f"resuming {journal_path}: {len(tasks)} of {target} instructions already kept")

    work_to_do = len(tasks) < target
    teacher_stats = previous.get("teacher", {})
    teacher_info = teacher_identity(config)
    candidates = int(previous.get("candidates", 0))
    try:
        if work_to_do:
            # The teacher's counters become this run's totals, carried over from earlier sessions.
            teacher.reset_stats(teacher_stats)
            gen = _Generator(config, seeds, teacher)
            gen.restore(tasks, drops, candidates)
            tasks = _run_rounds(
                config, gen, journal, tasks, state.rounds, started, elapsed_before, progress
            )
            drops, candidates = dict(gen.drops), gen.candidates
            teacher_stats = teacher.stats.to_dict()
            teacher_info = teacher.describe()
    finally:
        journal.close()
        if own_teacher and teacher is not None:
            teacher.close()

    tasks = tasks[:target]
    records = records_from_tasks(tasks)
    write_alpaca(output_path, records)
    write_lineage(
        lineage_path(config.output),
        tasks,
        [s.instruction for s in seeds],
        teacher=teacher_info,
        sampling=sampling_settings(config),
    )
    duration = elapsed_before + (time.monotonic() - started if work_to_do else 0.0)
    manifest = build_manifest(
        mode=config.mode,
        output=output_path,
        journal=journal_path,
        seed_tasks=seeds_info,
        teacher=teacher_info,
        tasks=tasks,
        records=len(records),
        candidates=candidates,
        drops=drops,
        teacher_stats=teacher_stats,
        duration_s=duration,
        resumed=state.resumed,
        config=config_to_dict(config),
        estimate=read_estimate(config.output),
    )
    atomic_write_text(manifest_path, json.dumps(manifest, indent=2, ensure_ascii=False) + "\n")
    return GenerationResult(
        output_path=output_path,
        manifest_path=manifest_path,
        journal_path=journal_path,
        instructions=len(tasks),
        records=len(records),
        drops=drops,
        teacher=teacher_info,
        duration_s=duration,
        resumed=state.resumed,
        manifest=manifest,
    )


def _run_rounds(
    config: GenerateConfig,
    gen: _Generator,
    journal: Journal,
    tasks: list[dict[str, Any]],
    rounds_done: int,
    started: float,
    elapsed_before: float,
    progress: bool,
) -> list[dict[str, Any]]:
    from tqdm import tqdm

    target = config.num_instructions
    size = config.rounds_size()
    round_no = rounds_done
    idle = 0
    requests_at_start = gen.teacher.stats.requests
    bar = tqdm(
        total=target,
        initial=len(tasks),
        unit="instr",
        desc=f"generate ({config.mode})",
        disable=not progress,
        dynamic_ncols=True,
        file=sys.stderr,
    )

    def show_errors(_error: str) -> None:
        # As they happen, not once a round: a failing teacher shows at once.
        bar.set_postfix(kept=len(tasks), errors=sum(gen.teacher.stats.errors.values()))

    if progress and hasattr(gen.teacher, "on_error"):
        gen.teacher.on_error = show_errors
    try:
        while len(tasks) < target:
            round_no += 1
            # One generator per round, derived from the run seed: a resumed run samples the same
            # demonstrations for the same round.
            rng = random.Random(f"{config.seed}:{round_no}")
            accepted = gen.round(rng, size)
            surplus = len(accepted) - (target - len(tasks))
            if surplus > 0:
                # Good tasks beyond the target (the last round asked for more than was left).
                gen.drops[filters.OVER_TARGET] += surplus
                accepted = accepted[: target - len(tasks)]
            for task in accepted:
                gen.machine_instructions.append(task["instruction"])
                task["lineage"]["round"] = round_no
            tasks.extend(accepted)
            journal.commit(
                accepted,
                {
                    "round": round_no,
                    "tasks": len(tasks),
                    "candidates": gen.candidates,
                    "drops": dict(gen.drops),
                    "teacher": gen.teacher.stats.to_dict(),
                    "elapsed_s": round(elapsed_before + time.monotonic() - started, 3),
                },
            )
            seconds = max(time.monotonic() - started, 1e-9)
            rate = (gen.teacher.stats.requests - requests_at_start) / seconds
            failed = sum(gen.teacher.stats.errors.values())
            bar.set_postfix(
                kept=len(tasks),
                dropped=sum(gen.drops.values()),
                req_s=f"{rate:.1f}" if rate >= 10 else f"{rate:.2f}",
                **({"errors": failed} if failed else {}),
                refresh=False,
            )
            bar.update(len(accepted))
            bar.refresh()
            idle = 0 if accepted else idle + 1
            if idle >= config.max_idle_rounds:
                top = ", ".join(f"{k}={v}" for k, v in gen.drops.most_common(4)) or "none"
                raise GenerationError(
                    f"{idle} rounds in a row kept nothing (drops so far: {top}); the teacher's "
                    "replies are not usable: check the model, the api (chat/completions) and the "
                    "prompt settings. Re-running resumes from what was kept."
                )
    finally:
        bar.close()
        if progress and hasattr(gen.teacher, "on_error"):
            gen.teacher.on_error = None
    return tasks


def estimate_generation(
    config: GenerateConfig, *, teacher: Any = None, probes: int = 4
) -> dict[str, Any]:
    """What the asked run would cost, from one probe round of `probes` requests.

    The probe round is a real round (the same prompts, parsing and filters) whose accepted tasks
    are thrown away: no journal, no output. Figures scale its requests, tokens, kept tasks and time
    to `num_instructions`. Novelty is checked against the seeds alone in the probe; in the real run
    it also checks against everything kept, which drops more as the pool grows, so the requests
    and cost are a lower bound and the run's manifest sets the actual figures beside these.
    """
    from corral.data_gen.teachers import TeacherError, TeacherStats

    seeds, seeds_info = load_seeds(config)
    own_teacher = teacher is None
    if own_teacher:
        teacher = build_teacher(config)
    try:
        teacher.reset_stats()
        generator = _Generator(config, seeds, teacher)
        rng = random.Random(f"{config.seed}:estimate")
        started = time.monotonic()
        accepted = generator.round(rng, probes)
        seconds = time.monotonic() - started
        stats: TeacherStats = teacher.stats
        teacher_info = teacher.describe()
    finally:
        if own_teacher:
            teacher.close()
    if stats.requests and not stats.completions:
        errors = ", ".join(f"{k} {v}" for k, v in sorted(stats.errors.items())) or "none"
        where = teacher_info.get("base_url") or teacher_info.get("model")
        raise TeacherError(
            f"the teacher at {where} answered none of the {probes} probe requests "
            f"({stats.requests} attempts; errors: {errors}): no estimate"
        )
    requests = max(stats.requests, 1)
    kept_per_request = len(accepted) / requests
    target = config.num_instructions
    needed = math.ceil(target / kept_per_request) if kept_per_request else None
    in_flight = min(probes, config.rounds_size())
    per_request_s = seconds * in_flight / requests  # latency of one request, as measured
    parallel = config.concurrency if config.teacher == "openai" else config.local_batch_size
    prompt_per = stats.prompt_tokens / requests
    completion_per = stats.completion_tokens / requests

    def scaled(value: float, digits: int = 1) -> float | None:
        return None if needed is None else round(value * needed, digits)

    cost_per = (
        prompt_per * config.price_per_1k_prompt_tokens
        + completion_per * config.price_per_1k_completion_tokens
    ) / 1000
    return {
        "kind": "corral-estimate",
        "mode": config.mode,
        "teacher": teacher_info,
        "num_instructions": target,
        "probe": {
            "requests": stats.requests,
            "failed_requests": stats.failed_requests,
            "candidates": generator.candidates,
            "kept": len(accepted),
            "dropped": dict(sorted(generator.drops.items())),
            "prompt_tokens": stats.prompt_tokens,
            "completion_tokens": stats.completion_tokens,
            "seconds": round(seconds, 2),
        },
        "seed_tasks": seeds_info,
        "kept_per_request": round(kept_per_request, 4),
        "requests": needed,
        "prompt_tokens": scaled(prompt_per),
        "completion_tokens": scaled(completion_per),
        "wall_seconds": scaled(per_request_s / parallel),
        "cost_usd": scaled(cost_per, 6),
        "lower_bound": True,
    }


def format_estimate(estimate: dict[str, Any]) -> str:
    """The estimate as a short table."""
    probe = estimate["probe"]
    lines = [
        f"Estimate for {estimate['num_instructions']} instructions ({estimate['mode']} mode), "
        f"from {probe['requests']} probe requests that kept {probe['kept']} of "
        f"{probe['candidates']} candidates in {probe['seconds']} s:",
    ]
    if estimate["requests"] is None:
        lines.append("  the probe kept nothing: no estimate (check the teacher's replies)")
        return "\n".join(lines)
    hours = estimate["wall_seconds"] / 3600
    lines += [
        f"  requests          >= {estimate['requests']:,} ({estimate['kept_per_request']} kept each)",
        f"  prompt tokens     >= {estimate['prompt_tokens']:,.0f}",
        f"  completion tokens >= {estimate['completion_tokens']:,.0f}",
        f"  wall time         >= {estimate['wall_seconds']:,.0f} s ({hours:.2f} h) at this concurrency",
        f"  cost              >= ${estimate['cost_usd']:,.2f}"
        + ("" if estimate["cost_usd"] else " (set price_per_1k_prompt_tokens=... to price it)"),
        "  lower bounds: the probe checked novelty against the seeds only; the manifest of the run",
        "  sets the actual figures beside these",
    ]
    return "\n".join(lines)


def format_summary(result: GenerationResult) -> str:
    """A one-screen summary of a finished run."""
    m = result.manifest
    counts = m["counts"]
    lines = [
        f"Generated {result.instructions} instructions -> {result.records} Alpaca records "
        f"({m['mode']} mode{', resumed' if result.resumed else ''})",
        f"  output    {result.output_path}",
        f"  manifest  {result.manifest_path}",
        f"  journal   {result.journal_path}",
        f"  teacher   {m['teacher'].get('kind')} {m['teacher'].get('model')}"
        + (f" at {m['teacher']['base_url']}" if m["teacher"].get("base_url") else ""),
        f"  requests  {m['requests']} ({m['retries']} retries, {m['failed_requests']} failed)"
        + (f"; errors {m['request_errors']}" if m["request_errors"] else ""),
        f"  tokens    {m['tokens']['prompt']} prompt + {m['tokens']['completion']} completion"
        + (f"; cost ${m['cost_usd']:.4f}" if m["cost_usd"] else ""),
        f"  time      {m['duration_s']:.1f} s",
        *(
            [
                "  estimated "
                + ", ".join(
                    f"{key} {pair['estimated']} (actual {pair['actual']})"
                    for key, pair in m["estimate"].items()
                )
            ]
            if m.get("estimate")
            else []
        ),
        f"  candidates parsed {counts['candidates']}, kept {result.instructions}, dropped:",
    ]
    dropped = counts["dropped"]
    if dropped:
        width = max(len(k) for k in dropped)
        for reason, n in sorted(dropped.items(), key=lambda kv: -kv[1]):
            lines.append(f"    {reason:<{width}}  {n}")
    else:
        lines.append("    (nothing)")
    return "\n".join(lines)


DEMO_PRESET = Path(__file__).resolve().parents[1] / "configs" / "data_gen" / "embedded_demo.yaml"


def generate_demo_dataset(
    output_dir: str | Path,
    num_instructions: int = 30,
    *,
    progress: bool = True,
    overrides: tuple[str, ...] = (),
) -> GenerationResult:
    """A small Alpaca dataset from the embedded teacher, in `output_dir/alpaca_data.json`.

    Uses configs/data_gen/embedded_demo.yaml when present (a source checkout), else the same
    settings built in. Resumable like any run: calling it again continues or reuses the result.
    """
    from corral.config import load_config

    output = str(Path(output_dir) / "alpaca_data.json")
    if DEMO_PRESET.is_file():
        config = load_config(
            GenerateConfig,
            DEMO_PRESET,
            list(overrides),
            num_instructions=num_instructions,
            output=output,
        )
    else:
        config = load_config(
            GenerateConfig,
            None,
            list(overrides),
            mode="alpaca",
            teacher="local",
            model="embedded",
            api="completions",
            tasks_per_request=5,
            temperature=0.7,
            top_p=0.9,
            max_tokens=192,
            repetition_penalty=1.1,
            num_instructions=num_instructions,
            output=output,
        )
    return generate_dataset(config, progress=progress)
