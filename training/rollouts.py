"""Rollouts for online RL: completions sampled from the policy being trained, then scored.

Here stage 2 uses stage 3 (`inference.engine`): the rollouts come from Corral's own
continuous-batching engine, the one `corral serve` runs, driven synchronously on the policy's
live weights in this process. No copy of the model is made and no weights are synced: the engine
calls the peft model itself, whose LoRA layers are unmerged, so the decode fast path and weight
packing (inference/decode_step.py) stay off and every rollout sees the adapter as trained so far.
The model is switched to eval mode (no dropout) for the rollout and back afterwards; the engine
runs under `torch.inference_mode`, so no activations are kept.

Prompts are rendered by the run's template (`format_prompt` + `encode_prompt`, what the server
does), so what is rolled out is what is served. Each prompt gets `num_generations` completions,
sampled with temperature/top_p from a seed per completion derived from (run seed, step, position),
so a resumed run draws the same rollouts. A completion that reaches `max_completion_length`
without its end marker is flagged truncated.

`completion_examples` turns a rollout into training examples (prompt + completion, only the
completion trained, its end marker included), collated like SFT examples, so the loss forward
computes logits at completion tokens only.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from corral.training.data import TokenizedExample, mask_prompt_tokens

from corral.templates import PromptTemplate, encode_prompt, stop_strings, stop_token_ids


@dataclass
class Rollout:
    """The completions of one rollout, groups of `num_generations` contiguous."""

    records: list[dict[str, Any]]  # the prompt record of each completion
    prompt_ids: list[list[int]]
    completion_ids: list[list[int]]  # sampled tokens, a final stop token included
    completions: list[str]  # text, cut before the end marker (what reward functions read)
    truncated: list[bool]  # hit max_completion_length without stopping
    num_generations: int
    seconds: float = 0.0
    # Filled by the objective: rewards per function, total, advantages, old/ref log-probabilities.
    scores: dict[str, Any] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.completion_ids)


def completion_seed(seed: int, step: int, position: int) -> int:
    """The sampling seed of completion `position` of the rollout at `step`: distinct per
    completion and step, the same on a resume."""
    return (seed * 1_000_003 + step * 65_537 + position) % (2**63 - 1)


def render_prompt_ids(
    tokenizer: Any, template: PromptTemplate, record: dict[str, Any]
) -> list[int]:
    """A prompt record's token ids as the server would give them to the model."""
    text = template.format_prompt(record["prompt"], record.get("input", ""))
    return encode_prompt(tokenizer, template, text)


def generate_rollout(
    model: Any,
    tokenizer: Any,
    template: PromptTemplate,
    records: Sequence[dict[str, Any]],
    *,
    num_generations: int,
    max_completion_length: int,
    temperature: float = 1.0,
    top_p: float = 1.0,
    seed: int = 0,
    step: int = 0,
    max_batch_size: int = 16,
) -> Rollout:
    """`num_generations` completions of each record's prompt from `model` as it is now.

    `model` is the policy itself (the peft model, unwrapped from any data-parallel wrapper).
    """
    import torch
    from corral.inference.engine import GenerationEngine
    from corral.inference.params import SamplingParams

    started = time.monotonic()
    expanded = [record for record in records for _ in range(num_generations)]
    prompt_ids = [render_prompt_ids(tokenizer, template, record) for record in expanded]
    stops, stop_texts = stop_token_ids(tokenizer, template), stop_strings(tokenizer, template)
    params = [
        SamplingParams(
            max_new_tokens=max_completion_length,
            temperature=temperature,
            top_p=top_p,
            stop=stop_texts,
            stop_token_ids=stops,
            seed=completion_seed(seed, step, position),
        )
        for position in range(len(expanded))
    ]
    training = model.training
    model.eval()
    try:
        # A fresh engine per rollout: it holds no weights, only the KV cache of this rollout.
        engine = GenerationEngine(
            model, tokenizer, max_batch_size=max_batch_size, fast_path=False, pack_weights=False
        )
        with torch.no_grad():
            results = engine.generate(prompt_ids, params)
    finally:
        model.train(training)
    errors = [r.error for r in results if r.finish_reason == "error"]
    if errors:
        raise RuntimeError(f"rollout generation failed: {errors[0]}")
    return Rollout(
        records=list(expanded),
        prompt_ids=prompt_ids,
        completion_ids=[list(r.token_ids) for r in results],
        completions=[r.text for r in results],
        truncated=[r.finish_reason == "length" for r in results],
        num_generations=num_generations,
        seconds=time.monotonic() - started,
    )


def completion_examples(rollout: Rollout) -> list[TokenizedExample]:
    """Prompt + completion of each rollout completion, only the completion's tokens trained."""
    examples = []
    for index, (prompt, completion) in enumerate(
        zip(rollout.prompt_ids, rollout.completion_ids, strict=True)
    ):
        input_ids, labels = mask_prompt_tokens(prompt, completion)
        examples.append(TokenizedExample(input_ids=input_ids, labels=labels, index=index))
    return examples
