"""Alpaca records, conversations and Self-Instruct seed tasks: read, validate, write.

Formats (docs/formats.md):
- Alpaca: a JSON list of {"instruction", "input", "output"} objects, or the same objects one per
  line (JSONL). Extra keys are kept through a read/write round trip and never required. Dolly 15k
  records ({instruction, context, response, category}) read as Alpaca (context -> input,
  response -> output).
- Conversations: ShareGPT ({"conversations": [{"from": "human"|"gpt"|"system", "value"}]}) or
  OpenAI messages ({"messages": [{"role", "content"}]}); an Alpaca record is a one-turn
  conversation. Read as {"messages": [{"role", "content"}], ...extra keys}.
- Self-Instruct seeds: JSONL of {id, name, instruction, instances: [{input, output}], is_classification}.

Every problem with a file raises `RecordError`, whose message names the file, the record (line for
JSONL, index for JSON) and the field, so the CLI can print it as one line.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from corral.errors import RecordError
from corral.fileio import atomic_open

ALPACA_FIELDS = ("instruction", "input", "output")
# Dolly 15k's names for two of them.
DOLLY_FIELDS = {"input": "context", "output": "response"}


@dataclass
class SeedTask:
    """One seed task: an instruction and its demonstration instances."""

    instruction: str
    instances: list[dict[str, str]]
    is_classification: bool = False
    id: str = ""
    name: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    def as_alpaca(self) -> dict[str, str]:
        """The first instance as an Alpaca record (what Alpaca-mode prompts show)."""
        first = self.instances[0]
        return {"instruction": self.instruction, "input": first["input"], "output": first["output"]}


# ---------------------------------------------------------------- reading raw JSON / JSONL


def _looks_like_jsonl(path: Path, text: str) -> bool:
    if path.suffix.lower() == ".jsonl":
        return True
    if path.suffix.lower() == ".json":
        return False
    return not text.lstrip().startswith("[")


def iter_json_objects(path: str | os.PathLike) -> Iterator[tuple[dict[str, Any], dict[str, int]]]:
    """Yield (object, location) from a JSON list or a JSONL file.

    `location` is {"line": n} for JSONL (1-based, blank lines skipped) or {"index": i} for a JSON list.
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise RecordError(path, "file not found") from None
    except IsADirectoryError:
        raise RecordError(path, "is a directory; expected a JSON or JSONL file") from None
    except OSError as exc:
        raise RecordError(path, f"cannot read: {exc.strerror or exc}") from None
    except UnicodeDecodeError as exc:
        raise RecordError(path, f"not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    if not text.strip():
        raise RecordError(path, "file is empty: expected Alpaca JSON (a list of records) or JSONL")
    if _looks_like_jsonl(path, text):
        for line_no, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as exc:
                raise RecordError(
                    path, f"invalid JSON: {exc.msg} (column {exc.colno})", line=line_no
                ) from None
            if not isinstance(obj, dict):
                raise RecordError(
                    path, f"expected a JSON object, got {type(obj).__name__}", line=line_no
                )
            yield obj, {"line": line_no}
    else:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise RecordError(path, f"invalid JSON: {exc.msg}", line=exc.lineno) from None
        if not isinstance(data, list):
            raise RecordError(path, f"expected a JSON list of records, got {type(data).__name__}")
        for index, obj in enumerate(data):
            if not isinstance(obj, dict):
                raise RecordError(
                    path, f"expected a JSON object, got {type(obj).__name__}", index=index
                )
            yield obj, {"index": index}


# ---------------------------------------------------------------- Alpaca records


def validate_alpaca_record(
    obj: dict[str, Any],
    path: str | os.PathLike,
    location: dict[str, int],
    *,
    require_output: bool = True,
) -> dict[str, Any]:
    """Check one Alpaca record; return it with `input` defaulted to "" (other keys untouched).

    A Dolly 15k record (`context`, `response`) is read as Alpaca: context -> input, response ->
    output.
    """
    for alpaca, dolly in DOLLY_FIELDS.items():
        if alpaca in obj and dolly in obj:
            raise RecordError(
                path,
                f"holds both '{alpaca}' (Alpaca) and '{dolly}' (Dolly), which mean the same: "
                "keep one",
                field=dolly,
                **location,
            )
    # What the user's file calls each field, for the errors.
    named = {name: name for name in ALPACA_FIELDS}
    if "instruction" in obj and "output" not in obj and "response" in obj:
        named |= DOLLY_FIELDS
        obj = {k: v for k, v in obj.items() if k not in ("context", "response")} | {
            "output": obj["response"],
            **({"input": obj["context"]} if "context" in obj else {}),
        }
    for name in ALPACA_FIELDS:
        required = name == "instruction" or (name == "output" and require_output)
        if name not in obj:
            if required:
                raise RecordError(path, "missing required field", field=named[name], **location)
            continue
        value = obj[name]
        if not isinstance(value, str):
            raise RecordError(
                path,
                f"expected a string, got {type(value).__name__}",
                field=named[name],
                **location,
            )
    if not obj["instruction"].strip():
        raise RecordError(path, "instruction is empty", field="instruction", **location)
    record = dict(obj)
    record.setdefault("input", "")
    return record


def read_alpaca(path: str | os.PathLike, *, require_output: bool = True) -> list[dict[str, Any]]:
    """Read and validate an Alpaca JSON list or JSONL file. Raises RecordError on bad input."""
    records = [
        validate_alpaca_record(obj, path, loc, require_output=require_output)
        for obj, loc in iter_json_objects(path)
    ]
    if not records:
        raise RecordError(path, "no records: the file holds an empty list")
    return records


def write_alpaca(path: str | os.PathLike, records: Iterable[dict[str, Any]]) -> int:
    """Write records atomically: a JSON list (indented, like alpaca_data.json) or JSONL by suffix."""
    path = Path(path)
    records = list(records)
    with atomic_open(path) as handle:
        # allow_nan=False: NaN and Infinity are not JSON; no reader after us could load them.
        if path.suffix.lower() == ".jsonl":
            for record in records:
                handle.write(json.dumps(record, ensure_ascii=False, allow_nan=False) + "\n")
        else:
            json.dump(records, handle, ensure_ascii=False, indent=2, allow_nan=False)
            handle.write("\n")
    return len(records)


# ---------------------------------------------------------------- Self-Instruct seed tasks


def _seed_from_self_instruct(
    obj: dict[str, Any], path: str | os.PathLike, loc: dict[str, int]
) -> SeedTask:
    instruction = obj.get("instruction")
    if not isinstance(instruction, str) or not instruction.strip():
        raise RecordError(path, "expected a non-empty string", field="instruction", **loc)
    instances = obj["instances"]
    if not isinstance(instances, list) or not instances:
        raise RecordError(
            path, "expected a non-empty list of {input, output}", field="instances", **loc
        )
    clean: list[dict[str, str]] = []
    for i, inst in enumerate(instances):
        if not isinstance(inst, dict):
            raise RecordError(path, "expected an object", field=f"instances[{i}]", **loc)
        for key in ("input", "output"):
            value = inst.get(key, "" if key == "input" else None)
            if not isinstance(value, str):
                raise RecordError(path, "expected a string", field=f"instances[{i}].{key}", **loc)
        clean.append({"input": inst.get("input", ""), "output": inst["output"]})
    is_cls = obj.get("is_classification", False)
    if not isinstance(is_cls, bool):
        raise RecordError(path, "expected true or false", field="is_classification", **loc)
    known = {"id", "name", "instruction", "instances", "is_classification"}
    return SeedTask(
        instruction=instruction,
        instances=clean,
        is_classification=is_cls,
        id=str(obj.get("id", "")),
        name=str(obj.get("name", "")),
        extra={k: v for k, v in obj.items() if k not in known},
    )


def seed_task_from_record(
    obj: dict[str, Any], path: str | os.PathLike, loc: dict[str, int], position: int
) -> SeedTask:
    """One seed task from a Self-Instruct seed record or an Alpaca record (the `position`-th)."""
    if "instances" in obj:
        return _seed_from_self_instruct(obj, path, loc)
    record = validate_alpaca_record(obj, path, loc)
    return SeedTask(
        instruction=record["instruction"],
        instances=[{"input": record["input"], "output": record["output"]}],
        is_classification=bool(record.get("is_classification", False)),
        id=str(record.get("id", f"seed_{position}")),
        extra={k: v for k, v in record.items() if k not in (*ALPACA_FIELDS, "id")},
    )


def read_seed_tasks(path: str | os.PathLike) -> list[SeedTask]:
    """Read seed tasks: Self-Instruct seed JSONL as-is, or Alpaca records (JSON or JSONL)."""
    seeds = [
        seed_task_from_record(obj, path, loc, i)
        for i, (obj, loc) in enumerate(iter_json_objects(path))
    ]
    if not seeds:
        raise RecordError(path, "no seed tasks: the file holds an empty list")
    return seeds


# ---------------------------------------------------------------- conversations

CONVERSATION_ROLES = ("system", "user", "assistant")
# ShareGPT speakers, as exported by the tools that collected it.
SHAREGPT_SPEAKERS = {
    "system": "system",
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "chatgpt": "assistant",
    "bard": "assistant",
    "bing": "assistant",
}


def _turns(obj: dict[str, Any], path: str | os.PathLike, loc: dict[str, int]) -> list[dict]:
    """The turns of one record as [{role, content}], whichever format it is in."""
    if "conversations" in obj:
        key, role_key, text_key, roles = "conversations", "from", "value", SHAREGPT_SPEAKERS
    else:
        key, role_key, text_key = "messages", "role", "content"
        roles = {r: r for r in CONVERSATION_ROLES} | {"developer": "system"}
    turns = obj[key]
    if not isinstance(turns, list) or not turns:
        raise RecordError(path, "expected a non-empty list of turns", field=key, **loc)
    messages = []
    for number, turn in enumerate(turns):
        where = f"turn {number}"
        if not isinstance(turn, dict):
            raise RecordError(path, f"{where}: expected an object", field=key, **loc)
        speaker, text = turn.get(role_key), turn.get(text_key)
        if not isinstance(speaker, str) or speaker.lower() not in roles:
            raise RecordError(
                path,
                f"{where}: unknown speaker {speaker!r} (expected {', '.join(sorted(set(roles)))})",
                field=role_key,
                **loc,
            )
        if not isinstance(text, str):
            raise RecordError(path, f"{where}: expected a string", field=text_key, **loc)
        messages.append({"role": roles[speaker.lower()], "content": text})
    return messages


def _check_order(messages: list[dict], path: str | os.PathLike, loc: dict[str, int], key: str):
    """System first (optional), then user and assistant turns in turn; an unanswered last user
    turn is dropped (nothing to learn from it); at least one answer remains."""
    while messages and messages[-1]["role"] == "user":
        messages.pop()
    start = 1 if messages and messages[0]["role"] == "system" else 0
    for number, message in enumerate(messages[start:], start=start):
        expected = "user" if (number - start) % 2 == 0 else "assistant"
        if message["role"] != expected:
            raise RecordError(
                path,
                f"turn {number}: expected a {expected} turn, got {message['role']}",
                field=key,
                **loc,
            )
        if not message["content"].strip():
            raise RecordError(
                path, f"turn {number}: empty {message['role']} turn", field=key, **loc
            )
    if len(messages) - start < 2:
        raise RecordError(path, "no answered user turn", field=key, **loc)
    return messages


def conversation_from_record(
    obj: dict[str, Any], path: str | os.PathLike, loc: dict[str, int]
) -> dict[str, Any]:
    """One record (ShareGPT, OpenAI messages, or Alpaca/Dolly) as {"messages", ...extra keys}."""
    if "conversations" in obj and "messages" in obj:
        raise RecordError(
            path,
            "holds both 'conversations' (ShareGPT) and 'messages' (OpenAI): which one is the "
            "conversation? keep one",
            field="messages",
            **loc,
        )
    if "conversations" in obj or "messages" in obj:
        key = "conversations" if "conversations" in obj else "messages"
        messages = _check_order(_turns(obj, path, loc), path, loc, key)
        return {"messages": messages, **{k: v for k, v in obj.items() if k != key}}
    record = validate_alpaca_record(obj, path, loc)
    user = record["instruction"] + (f"\n\n{record['input']}" if record["input"] else "")
    extra = {k: v for k, v in record.items() if k not in ALPACA_FIELDS}
    return {
        "messages": [
            {"role": "user", "content": user},
            {"role": "assistant", "content": record["output"]},
        ],
        **extra,
    }


def read_conversations(path: str | os.PathLike) -> list[dict[str, Any]]:
    """Read conversations (ShareGPT, OpenAI messages, Alpaca or Dolly records; JSON or JSONL)."""
    conversations = [
        conversation_from_record(obj, path, loc) for obj, loc in iter_json_objects(path)
    ]
    if not conversations:
        raise RecordError(path, "no records: the file holds an empty list")
    return conversations


def is_conversation(obj: dict[str, Any]) -> bool:
    """Whether a raw record is a conversation (rather than an Alpaca record)."""
    return "conversations" in obj or "messages" in obj
