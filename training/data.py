"""Training data: Alpaca records -> token ids with loss labels, validation split, batch plans.

Pure Python over token-id lists (no torch), so masking and batching are tested in milliseconds.
The prompt is encoded exactly as it is served and the completion on its own, and the two are
concatenated (`corral.served_tokens.tokenize_turns`), so the boundary between "what the model is
given" and "what it must learn to write" is exact for every tokenizer (no searching for a response
marker that may tokenize differently in context).
"""

from __future__ import annotations

import os
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from corral.records import (
    RecordError,
    conversation_from_record,
    is_conversation,
    iter_json_objects,
    read_alpaca,
    read_conversations,
    validate_alpaca_record,
)
from corral.served_tokens import encode_answer, tokenize_turns
from corral.templates import PromptTemplate

IGNORE_INDEX = -100  # label value that carries no loss (PyTorch cross-entropy convention)


@dataclass
class TokenizedExample:
    """One training example: `input_ids` and `labels` of equal length (IGNORE_INDEX = no loss)."""

    input_ids: list[int]
    labels: list[int]
    index: int  # the record's position in the source, for error messages and reproducibility

    def __len__(self) -> int:
        return len(self.input_ids)

    @property
    def num_label_tokens(self) -> int:
        """Tokens whose prediction is trained (the first token is never predicted)."""
        return sum(1 for label in self.labels[1:] if label != IGNORE_INDEX)


@dataclass
class TokenizationReport:
    """What happened to each record: kept, truncated (answer cut) or dropped for length."""

    total: int = 0
    kept: int = 0
    truncated: int = 0
    dropped_too_long: int = 0
    longest: int = 0
    dropped_indices: list[int] = field(default_factory=list)
    # Conversations whose served prompt is not a prefix of their training ids, and the first case.
    served_departures: int = 0
    departure: str = ""

    def summary(self) -> str:
        text = (
            f"{self.kept}/{self.total} examples kept, {self.truncated} truncated, "
            f"{self.dropped_too_long} dropped as too long (longest {self.longest} tokens)"
        )
        if self.served_departures:
            # One line, printed once where the run starts: the data summary is said there.
            text += (
                f"; warning: {self.served_departures} of {self.total} conversations are trained "
                f"on other ids than the prompts served for them (first: {self.departure})"
            )
        return text


def mask_prompt_tokens(
    prompt_ids: Sequence[int], completion_ids: Sequence[int], *, train_on_inputs: bool = False
) -> tuple[list[int], list[int]]:
    """(input_ids, labels): the prompt's labels are IGNORE_INDEX unless `train_on_inputs`."""
    input_ids = [*prompt_ids, *completion_ids]
    prompt_labels = list(prompt_ids) if train_on_inputs else [IGNORE_INDEX] * len(prompt_ids)
    return input_ids, [*prompt_labels, *completion_ids]


def encode_completion(tokenizer: Any, template: PromptTemplate, text: str) -> list[int]:
    """Token ids of answer + end marker; the EOS id is guaranteed last when EOS is the marker."""
    return encode_answer(tokenizer, template, text)


def tokenize_record(
    record: dict[str, Any],
    index: int,
    tokenizer: Any,
    template: PromptTemplate,
    *,
    max_length: int,
    truncation: str = "drop",
    train_on_inputs: bool = False,
) -> tuple[TokenizedExample | None, str]:
    """Tokenize one Alpaca record. Returns (example or None, "kept" | "truncated" | "too_long").

    The prompt's ids are the ones `infer` and `serve` send for the record (`tokenize_turns`).
    """
    prompt, completion = template.format_example(
        record["instruction"], record.get("input", ""), record["output"]
    )
    built = tokenize_turns(tokenizer, template, [(prompt, completion)])
    prompt_ids = built.input_ids[: built.answer_starts[0]]
    completion_ids = built.input_ids[built.answer_starts[0] :]
    status = "kept"
    if len(prompt_ids) + len(completion_ids) > max_length:
        # Truncating needs room for at least one answer token after the prompt.
        if truncation != "truncate" or len(prompt_ids) >= max_length:
            return None, "too_long"
        completion_ids = completion_ids[: max_length - len(prompt_ids)]
        status = "truncated"
    input_ids, labels = mask_prompt_tokens(
        prompt_ids, completion_ids, train_on_inputs=train_on_inputs
    )
    return TokenizedExample(input_ids=input_ids, labels=labels, index=index), status


def tokenize_each(
    items: Sequence[Any],
    tokenize_one: Callable[[Any, int], tuple[Any, str]],
    *,
    unit: str,
    field_name: str,
    max_length: int,
    truncation: str,
    source: str,
    length: Callable[[Any], int] = len,
) -> tuple[list[Any], TokenizationReport]:
    """Tokenize every item with `tokenize_one(item, index) -> (result or None, status)`, counting
    what was kept, truncated and dropped; raise RecordError (naming `field_name`) when none fits."""
    report = TokenizationReport(total=len(items))
    results: list[Any] = []
    for index, item in enumerate(items):
        result, status = tokenize_one(item, index)
        if result is None:
            report.dropped_too_long += 1
            report.dropped_indices.append(index)
            continue
        report.kept += 1
        report.truncated += status == "truncated"
        report.longest = max(report.longest, length(result))
        results.append(result)
    if items and not results:
        raise RecordError(
            source,
            f"every {unit} is longer than max_length={max_length} tokens with truncation="
            f"{truncation}; raise max_length or set truncation=truncate",
            index=0,
            field=field_name,
        )
    return results, report


def tokenize_records(
    records: Sequence[dict[str, Any]],
    tokenizer: Any,
    template: PromptTemplate,
    *,
    max_length: int,
    truncation: str = "drop",
    train_on_inputs: bool = False,
    source: str = "data",
) -> tuple[list[TokenizedExample], TokenizationReport]:
    """Tokenize every record; raise RecordError when none fits `max_length`."""
    return tokenize_each(
        records,
        lambda record, index: tokenize_record(
            record,
            index,
            tokenizer,
            template,
            max_length=max_length,
            truncation=truncation,
            train_on_inputs=train_on_inputs,
        ),
        unit="example",
        field_name="output",
        max_length=max_length,
        truncation=truncation,
        source=source,
    )


# ---------------------------------------------------------------- reading records


def load_records(data: str, *, split: str = "train") -> list[dict[str, Any]]:
    """Training records from a JSON/JSONL file, a `datasets` folder, or a `datasets` hub id.

    Alpaca (and Dolly) records come back as Alpaca records; when the first record is a
    conversation (ShareGPT `conversations` or OpenAI `messages`), every record is read as a
    conversation `{"messages": [...]}` (an Alpaca record among them as one turn).
    """
    if not data:
        raise RecordError("<config>", "no training data: set data=PATH (Alpaca JSON or JSONL)")
    path = Path(data).expanduser()
    if path.is_file():
        first = next(iter_json_objects(path), ({}, {}))[0]
        return read_conversations(path) if is_conversation(first) else read_alpaca(path)
    looks_like_hub_id = not path.suffix and not os.path.isabs(data) and not data.startswith(".")
    if path.is_dir() or looks_like_hub_id:
        return _load_datasets_records(data, path, split)
    raise RecordError(data, "file not found")


def _load_datasets_records(data: str, path: Path, split: str) -> list[dict[str, Any]]:
    import datasets

    try:
        saved = ("dataset_info.json", "dataset_dict.json")
        if path.is_dir() and any((path / name).exists() for name in saved):
            loaded = datasets.load_from_disk(str(path))
        else:
            loaded = datasets.load_dataset(str(path) if path.is_dir() else data)
    except FileNotFoundError as exc:
        raise RecordError(data, f"cannot load dataset: {exc}") from None
    except Exception as exc:  # datasets raises many types for unreachable or malformed sources
        raise RecordError(data, f"cannot load dataset: {type(exc).__name__}: {exc}") from None
    if isinstance(loaded, datasets.DatasetDict):
        if split not in loaded:
            raise RecordError(data, f"no split {split!r} (has {', '.join(loaded)})")
        loaded = loaded[split]
    rows = [dict(row) for row in loaded]
    read = conversation_from_record if rows and is_conversation(rows[0]) else validate_alpaca_record
    records = [read(row, data, {"index": i}) for i, row in enumerate(rows)]
    if not records:
        raise RecordError(data, f"split {split!r} holds no records")
    return records


def split_validation(
    records: Sequence[dict[str, Any]], val_size: float, seed: int
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(train, validation): a seeded random `val_size` fraction (<1) or count of records."""
    if val_size <= 0:
        return list(records), []
    count = int(val_size) if val_size >= 1 else max(1, round(len(records) * val_size))
    if count >= len(records):
        raise RecordError(
            "<config>",
            f"val_size={val_size} leaves no training records ({len(records)} records in total)",
        )
    order = list(range(len(records)))
    random.Random(seed).shuffle(order)
    val_indices = set(order[:count])
    train = [r for i, r in enumerate(records) if i not in val_indices]
    val = [r for i, r in enumerate(records) if i in val_indices]
    return train, val


# ---------------------------------------------------------------- batch plans


def plan_batches(
    lengths: Sequence[int],
    batch_size: int,
    *,
    seed: int,
    epoch: int,
    group_by_length: bool = True,
    shuffle: bool = True,
) -> list[list[int]]:
    """Micro-batches of example indices for one epoch; deterministic in (seed, epoch).

    With `group_by_length`, examples are shuffled, cut into mega-batches of 32 micro-batches, and
    each mega-batch is sorted by length before being split, so a batch holds similar lengths while
    the order across the epoch stays random. The batch order is shuffled again afterwards.
    """
    rng = random.Random(seed * 1_000_003 + epoch)
    order = list(range(len(lengths)))
    if shuffle:
        rng.shuffle(order)
    if group_by_length:
        mega = batch_size * 32
        grouped: list[int] = []
        for start in range(0, len(order), mega):
            chunk = order[start : start + mega]
            grouped.extend(sorted(chunk, key=lambda i: -lengths[i]))
        order = grouped
    batches = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    if shuffle and group_by_length:
        rng.shuffle(batches)
    return batches


def shard_for_process(
    batches: Sequence[list[int]], *, num_processes: int, process_index: int, per_step: int
) -> list[list[int]]:
    """This process's micro-batches: whole optimizer steps only, batch i to process i % n.

    Every process gets the same number of micro-batches (a ragged tail would hang a collective),
    so the tail that does not fill one step on every process is left out of this epoch.
    """
    usable = len(batches) // (num_processes * per_step) * num_processes * per_step
    return [batches[i] for i in range(process_index, usable, num_processes)]


def split_by_token_budget(
    indices: Sequence[int], lengths: Sequence[int], max_tokens: int
) -> list[list[int]]:
    """Split a micro-batch into consecutive chunks whose padded size (rows x longest) fits `max_tokens`.

    `max_tokens <= 0` keeps the micro-batch whole. A single example longer than the budget still
    gets a chunk of its own.
    """
    if max_tokens <= 0:
        return [list(indices)]
    chunks: list[list[int]] = []
    current: list[int] = []
    longest = 0
    for i in indices:
        widest = max(longest, lengths[i])
        if current and widest * (len(current) + 1) > max_tokens:
            chunks.append(current)
            current, widest = [], lengths[i]
        current.append(i)
        longest = widest
    if current:
        chunks.append(current)
    return chunks


def count_steps_per_epoch(config: Any, lengths: list[int], world: int) -> int:
    """Optimizer steps in one epoch: whole steps of every process's shard of the batch plan."""
    per_step = config.gradient_accumulation_steps
    plan = plan_batches(
        lengths, config.micro_batch_size, seed=config.seed, epoch=0, group_by_length=False
    )
    batches = shard_for_process(plan, num_processes=world, process_index=0, per_step=per_step)
    steps = len(batches) // per_step
    if steps == 0:
        raise RecordError(
            config.data,
            f"{len(lengths)} training examples do not fill one optimizer step of "
            f"{config.micro_batch_size} x {per_step} accumulation x {world} processes; "
            "lower micro_batch_size or gradient_accumulation_steps",
        )
    return steps
