"""`corral eval`: answer an evaluation set with a base and a tuned model, and compare them.

- ROUGE-L (F-measure, rouge_score's rules) of each answer against the reference, and lengths.
- Optionally a pairwise judge: any OpenAI-compatible endpoint (`--judge-base-url`), or a local model
  (`--judge NAME`). Each pair is judged in both orders (base first, then tuned first); a model wins
  an item only when it wins both orders, otherwise the item is a tie. That cancels the judge's
  position bias instead of letting it pick the winner.

The evaluation set is Self-Instruct's user-oriented format (`instruction, instances[{input,
output}]`) or Alpaca records. It is for evaluation only: never train on it.
"""

from __future__ import annotations

import re
import statistics
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from corral.records import read_seed_tasks

JUDGE_PROMPT = """You are an impartial judge. Compare two responses to the same instruction and \
decide which one follows the instruction better: more helpful, correct and relevant.

### Instruction:
{instruction}
{input_block}
### Response A:
{answer_a}

### Response B:
{answer_b}

Which response is better? Reply with a single letter: A or B."""

_VERDICT = re.compile(r"\b(?:response\s*)?([AB])\b", re.IGNORECASE)


@dataclass
class EvalItem:
    instruction: str
    input: str
    reference: str


def read_eval_set(path: str | Path, limit: int | None = None) -> list[EvalItem]:
    """The first instance of each task (user-oriented JSONL or Alpaca records), up to `limit`."""
    items = []
    for task in read_seed_tasks(path):
        first = task.instances[0]
        items.append(EvalItem(task.instruction, first["input"], first["output"]))
    return items[:limit] if limit else items


def judge_prompt(item: EvalItem, answer_a: str, answer_b: str) -> str:
    input_block = f"\n### Input:\n{item.input}\n" if item.input.strip() else ""
    return JUDGE_PROMPT.format(
        instruction=item.instruction, input_block=input_block, answer_a=answer_a, answer_b=answer_b
    )


def parse_verdict(text: str) -> str | None:
    """'A', 'B', or None when the judge's reply names neither (or both first at once)."""
    match = _VERDICT.search(text.strip())
    return match.group(1).upper() if match else None


def combine_orders(first: str | None, second: str | None) -> str:
    """Winner of one item from verdicts in both orders: first = (base A, tuned B), second swapped."""
    if first == "B" and second == "A":
        return "tuned"
    if first == "A" and second == "B":
        return "base"
    return "tie"


class LocalJudge:
    """A local causal LM as judge: reads its next-token scores of the answer labels.

    Reading the labels' scores (`A`/`B` for a pairwise verdict, `1`..`5` for a score) instead of
    sampling text means even a small model always answers, and the same inputs always get the
    same answer.
    """

    def __init__(self, model: str, labels: Sequence[str] = ("A", "B")) -> None:
        import torch

        from corral.models import load_model, load_tokenizer, quiet_transformers

        with quiet_transformers():
            self.tokenizer = load_tokenizer(model, padding_side="left")
            self.model = load_model(model, dtype=torch.float32, tokenizer=self.tokenizer)
        self.model.eval()
        self.name = model
        self.label_ids = {
            label: sorted(
                {
                    ids[0]
                    for text in (label, f" {label}")
                    if len(ids := self.tokenizer(text, add_special_tokens=False).input_ids) == 1
                }
            )
            for label in labels
        }

    def _render(self, prompt: str) -> str:
        if getattr(self.tokenizer, "chat_template", None):
            return self.tokenizer.apply_chat_template(
                [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
            )
        return prompt + "\n\nAnswer:"

    def label_probabilities(self, prompts: Sequence[str]) -> list[dict[str, float]]:
        """For each prompt, the probability of each label as the next token, among the labels."""
        import torch

        found: list[dict[str, float]] = []
        for start in range(0, len(prompts), 4):
            batch = [self._render(p) for p in prompts[start : start + 4]]
            encoded = self.tokenizer(batch, return_tensors="pt", padding=True)
            with torch.inference_mode():
                logits = self.model(**encoded).logits[:, -1, :].float()
            for row in logits:
                best = torch.stack([row[ids].max() for ids in self.label_ids.values()])
                found.append(dict(zip(self.label_ids, best.softmax(-1).tolist(), strict=True)))
        return found

    def judge(self, prompts: Sequence[str]) -> list[str | None]:
        return ["A" if p["A"] >= p["B"] else "B" for p in self.label_probabilities(prompts)]

    def describe(self) -> dict[str, Any]:
        return {"kind": "local", "model": self.name, "method": "next-token score of A vs B"}


class EndpointJudge:
    """Any OpenAI-compatible endpoint as judge (chat API, temperature 0, a few tokens)."""

    def __init__(self, model: str, base_url: str | None, concurrency: int = 8) -> None:
        from data_gen.teachers import OpenAICompatibleTeacher

        self.teacher = OpenAICompatibleTeacher(model, base_url=base_url, concurrency=concurrency)

    def judge(self, prompts: Sequence[str]) -> list[str | None]:
        from data_gen.teachers import Completion, SamplingParams

        replies = self.teacher.complete(
            list(prompts), SamplingParams(temperature=0.0, max_tokens=8)
        )
        return [parse_verdict(r.text) if isinstance(r, Completion) else None for r in replies]

    def describe(self) -> dict[str, Any]:
        return {**self.teacher.describe(), "method": "reply parsed for A or B"}


def _answer_all(model_or_run: str, items: list[EvalItem], max_new_tokens: int) -> list[Any]:
    from inference.generation import answer_instructions

    records = [{"instruction": i.instruction, "input": i.input} for i in items]
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
        for role in contestants:
            row[role] = answers[role][index].text
        result["items"].append(row)
    if judge is not None and tuned:
        base_texts = [a.text for a in answers["base"]]
        tuned_texts = [a.text for a in answers["tuned"]]
        prompts = [
            judge_prompt(i, b, t) for i, b, t in zip(items, base_texts, tuned_texts, strict=True)
        ]
        prompts += [
            judge_prompt(i, t, b) for i, b, t in zip(items, base_texts, tuned_texts, strict=True)
        ]
        verdicts = judge.judge(prompts)
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
