"""`corral eval`: answer an evaluation set with a base and a tuned model, and compare them.

- ROUGE-L (F-measure, rouge_score's rules) of each answer against the reference, and lengths.
- Optionally a pairwise judge: any OpenAI-compatible endpoint (`--judge-base-url`), or a local model
  (`--judge NAME`). Each pair is judged in both orders (base first, then tuned first); a model wins
  an item only when it wins both orders, otherwise the item is a tie. That cancels the judge's
  position bias instead of letting it pick the winner.

The evaluation set is Self-Instruct's user-oriented format (`instruction, instances[{input,
output}]`), Alpaca records, or conversations (ShareGPT `conversations` or OpenAI `messages`):
a conversation's last user turn is the question, asked with every earlier turn as its history in
each model's own template, and its last assistant turn is the reference; the judge sees the
history too. It is for evaluation only: never train on it.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from corral.data_gen.judges import combine_orders, judge_prompt
from corral.data_gen.teachers import TeacherError

from corral.errors import RecordError
from corral.records import (
    conversation_from_record,
    is_conversation,
    iter_json_objects,
    seed_task_from_record,
)


@dataclass
class EvalItem:
    instruction: str  # for a conversation: its last user turn
    input: str
    reference: str
    # A conversation's turns before its last user turn (system included), as {role, content}.
    history: tuple[dict[str, str], ...] = ()

    def record(self) -> dict[str, Any]:
        """What the models answer: an Alpaca record, or the whole conversation so far."""
        record: dict[str, Any] = {"instruction": self.instruction, "input": self.input}
        if self.history:
            record["messages"] = [*self.history, {"role": "user", "content": self.instruction}]
        return record

    def judge_context(self) -> str:
        """The input the judge sees: the record's input, or the conversation before the question."""
        if not self.history:
            return self.input
        speakers = {"system": "System", "user": "User", "assistant": "Assistant"}
        lines = [f"{speakers[t['role']]}: {t['content']}" for t in self.history]
        return "Earlier in the conversation:\n" + "\n".join(lines)


def read_eval_set(path: str | Path, limit: int | None = None) -> list[EvalItem]:
    """The first instance of each task (user-oriented JSONL or Alpaca records), or the last
    exchange of each conversation with the turns before it; up to `limit` items."""
    items = []
    for position, (obj, loc) in enumerate(iter_json_objects(path)):
        if is_conversation(obj):
            messages = conversation_from_record(obj, path, loc)["messages"]
            question, reference = messages[-2]["content"], messages[-1]["content"]
            items.append(EvalItem(question, "", reference, history=tuple(messages[:-2])))
        else:
            task = seed_task_from_record(obj, path, loc, position)
            first = task.instances[0]
            items.append(EvalItem(task.instruction, first["input"], first["output"]))
        if limit and len(items) >= limit:
            break
    if not items:
        raise RecordError(path, "no evaluation items: the file holds an empty list")
    return items


def _answer_all(model_or_run: str, items: list[EvalItem], max_new_tokens: int) -> list[Any]:
    from corral.inference.generation import answer_instructions

    records = [item.record() for item in items]
    return answer_instructions(model_or_run, records, max_new_tokens=max_new_tokens)


def evaluate(
    eval_set: str | Path,
    base: str,
    tuned: str | None = None,
    *,
    limit: int | None = 20,
    max_new_tokens: int = 128,
    judge: Any = None,
) -> dict[str, Any]:
    """Answer `eval_set` with `base` (and `tuned`), score with ROUGE-L, optionally judge pairwise."""
    from corral.rouge import rouge_l_fmeasure

    items = read_eval_set(eval_set, limit)
    contestants = {"base": base, **({"tuned": tuned} if tuned else {})}
    answers = {role: _answer_all(name, items, max_new_tokens) for role, name in contestants.items()}
    result: dict[str, Any] = {
        "kind": "corral-eval",
        "eval_set": str(eval_set),
        "num_items": len(items),
        "max_new_tokens": max_new_tokens,
        "models": {},
        "items": [],
    }
    for role, name in contestants.items():
        texts = [a.text for a in answers[role]]
        rouge = [rouge_l_fmeasure(i.reference, t) for i, t in zip(items, texts, strict=True)]
        result["models"][role] = {
            "model": str(name),
            "rouge_l": statistics.fmean(rouge) if rouge else 0.0,
            "mean_words": statistics.fmean(len(t.split()) for t in texts) if texts else 0.0,
            "end_marker_rate": statistics.fmean(a.end_marker_found for a in answers[role])
            if texts
            else 0.0,
            "rouge_l_per_item": rouge,
        }
    for index, item in enumerate(items):
        row = {"instruction": item.instruction, "input": item.input, "reference": item.reference}
        if item.history:
            row["history"] = list(item.history)
        for role in contestants:
            row[role] = answers[role][index].text
        result["items"].append(row)
    if judge is not None and tuned:
        base_texts = [a.text for a in answers["base"]]
        tuned_texts = [a.text for a in answers["tuned"]]
        prompts = [
            judge_prompt(i.instruction, i.judge_context(), b, t)
            for i, b, t in zip(items, base_texts, tuned_texts, strict=True)
        ]
        prompts += [
            judge_prompt(i.instruction, i.judge_context(), t, b)
            for i, b, t in zip(items, base_texts, tuned_texts, strict=True)
        ]
        verdicts = judge.judge(prompts)
        unparsed = sum(v is None for v in verdicts)
        if unparsed > len(verdicts) // 2:
            # Mostly unparsed verdicts would read as "all ties": a failure, not a result.
            raise TeacherError(
                f"{unparsed} of {len(verdicts)} verdicts could not be read from the judge's "
                "replies (a request that failed every retry, or a reply naming neither A nor B)"
            )
        first, second = verdicts[: len(items)], verdicts[len(items) :]
        outcomes = [combine_orders(a, b) for a, b in zip(first, second, strict=True)]
        for row, a, b, outcome in zip(result["items"], first, second, outcomes, strict=True):
            row["judge"] = {"base_first": a, "tuned_first": b, "winner": outcome}
        n = len(items) or 1
        result["judge"] = {
            **judge.describe(),
            "win_rate": {k: outcomes.count(k) / n for k in ("tuned", "base", "tie")},
            # Share of items where the judge picked the same answer in both orders.
            "order_consistency": sum(o != "tie" for o in outcomes) / n,
            "unparsed_verdicts": sum(v is None for v in verdicts),
        }
    return result


def format_table(result: dict[str, Any]) -> str:
    """The results as a small fixed-width table."""
    lines = [f"{'model':<8} {'ROUGE-L':>8} {'words':>7} {'end marker':>11}  name"]
    for role, stats in result["models"].items():
        lines.append(
            f"{role:<8} {stats['rouge_l']:>8.3f} {stats['mean_words']:>7.1f} "
            f"{stats['end_marker_rate']:>10.0%}  {stats['model']}"
        )
    judge = result.get("judge")
    if judge:
        rates = judge["win_rate"]
        lines.append(
            f"judge {judge.get('model')}: tuned wins {rates['tuned']:.0%}, base wins "
            f"{rates['base']:.0%}, ties {rates['tie']:.0%} (both orders; consistent on "
            f"{judge['order_consistency']:.0%} of {result['num_items']} items)"
        )
    return "\n".join(lines)
