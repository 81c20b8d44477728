"""Judges: a model that compares two answers, or scores one. Used to make preference pairs
(`corral generate --mode preferences`), by `corral eval` (pairwise win rates) and by `corral score`.

- `EndpointJudge`: any OpenAI-compatible endpoint through the teacher client (concurrent, retried,
  costed), reached once before the first verdict so a judge that is down fails the command;
- `LocalJudge`: a local causal LM that reads its next-token scores of the answer labels (`A`/`B`,
  or `1`..`5`) instead of sampling text, so even a small model always answers, and the same
  inputs always get the same answer.

Pairs are judged in both orders, and a side wins only when it wins both (`combine_orders`): the
judge's position bias becomes a tie instead of a winner.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

from corral.data_gen.teachers import Completion, OpenAICompatibleTeacher, SamplingParams

from corral.models import load_model, load_tokenizer, quiet_transformers

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


def judge_prompt(instruction: str, input: str, answer_a: str, answer_b: str) -> str:
    input_block = f"\n### Input:\n{input}\n" if input.strip() else ""
    return JUDGE_PROMPT.format(
        instruction=instruction, input_block=input_block, answer_a=answer_a, answer_b=answer_b
    )


def parse_verdict(text: str) -> str | None:
    """'A', 'B', or None when the judge's reply names neither (or both first at once)."""
    match = _VERDICT.search(text.strip())
    return match.group(1).upper() if match else None


def combine_orders(first: str | None, second: str | None) -> str:
    """The winner of one pair from verdicts in both orders: `first` with the base (or first
    answer) as A, `second` swapped. "tuned" (the second answer), "base", or "tie"."""
    if first == "B" and second == "A":
        return "tuned"
    if first == "A" and second == "B":
        return "base"
    return "tie"


class LocalJudge:
    """A local causal LM as judge: reads its next-token scores of the answer labels."""

    def __init__(self, model: str, labels: Sequence[str] = ("A", "B")) -> None:
        import torch

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

    def close(self) -> None:
        pass


class EndpointJudge:
    """Any OpenAI-compatible endpoint as judge (chat API, temperature 0, a few tokens)."""

    def __init__(self, model: str, base_url: str | None, concurrency: int = 8) -> None:
        self.teacher = OpenAICompatibleTeacher(model, base_url=base_url, concurrency=concurrency)
        try:
            self.teacher.check_reachable()  # a judge that is down fails now, not as "all ties"
        except BaseException:
            self.teacher.close()
            raise

    def judge(self, prompts: Sequence[str]) -> list[str | None]:
        replies = self.teacher.complete(
            list(prompts), SamplingParams(temperature=0.0, max_tokens=8)
        )
        return [parse_verdict(r.text) if isinstance(r, Completion) else None for r in replies]

    def describe(self) -> dict[str, Any]:
        return {**self.teacher.describe(), "method": "reply parsed for A or B"}

    def close(self) -> None:
        self.teacher.close()
