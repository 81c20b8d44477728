"""Answer instructions and conversations with a loaded model: prompts, generation, extraction.

Prompts come from `corral.templates` (the template a run trained with); generation runs on the
batching engine; the answer is cut out Dolly style by `inference.extraction`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from corral.inference.engine import GenerationEngine, GenerationResult
from corral.inference.extraction import ExtractedResponse, extract_response
from corral.inference.loading import LoadedModel, load_for_inference
from corral.inference.params import SamplingParams

from corral import served_tokens, templates
from corral.rundir import read_run_info


@dataclass
class Answer:
    """One answered instruction: the extracted answer and the raw generation behind it."""

    instruction: str
    input: str
    text: str  # the extracted answer
    raw: str  # everything generated, special tokens kept
    end_marker_found: bool  # did the model close its answer with the template's end marker?
    finish_reason: str
    completion_tokens: int


def templated_params(loaded: LoadedModel, **sampling: Any) -> SamplingParams:
    """Sampling settings that stop at the template's end marker (and at EOS)."""
    stop = tuple(sampling.pop("stop", ())) + loaded.stop_strings()
    stop_ids = tuple(sampling.pop("stop_token_ids", ())) + loaded.stop_token_ids()
    return SamplingParams(stop=stop, stop_token_ids=stop_ids, **sampling)


def encode_prompt(loaded: LoadedModel, text: str) -> list[int]:
    """Token ids of a rendered prompt, encoded the way training encodes prompts."""
    return templates.encode_prompt(loaded.tokenizer, loaded.template, text)


def render_conversation(loaded: LoadedModel, messages: Sequence[dict[str, str]]) -> str:
    """The prompt for a conversation that ends with a user message, in the model's template.

    With the `chat` template the tokenizer's own chat template renders every turn; instruction
    templates replay earlier turns in their own format. Training renders the prompts it trains on
    with the same function (`corral.served_tokens`), so what is served is what was trained.
    """
    return served_tokens.render_conversation(loaded.tokenizer, loaded.template, messages)


def answer_records(
    loaded: LoadedModel,
    engine: GenerationEngine,
    records: Sequence[dict[str, Any]],
    params: SamplingParams,
) -> list[Answer]:
    """Answer Alpaca records (instruction, input) in one batched run of the engine."""
    prompts = [record_prompt(loaded, r) for r in records]
    results = engine.generate(prompts, params)
    return [answer_from_result(loaded, r, res) for r, res in zip(records, results, strict=True)]


def record_prompt(loaded: LoadedModel, record: dict[str, Any]) -> list[int]:
    """Token ids of an Alpaca record's prompt in the model's template; a record with `messages`
    (a conversation ending with a user turn) is rendered whole, every earlier turn included."""
    if record.get("messages"):
        return encode_prompt(loaded, render_conversation(loaded, record["messages"]))
    prompt = loaded.template.format_prompt(record["instruction"], record.get("input") or "")
    return encode_prompt(loaded, prompt)


def answer_from_result(
    loaded: LoadedModel, record: dict[str, Any], result: GenerationResult
) -> Answer:
    """The answer to `record` cut out of a finished generation (Dolly-style extraction)."""
    extracted: ExtractedResponse = extract_response(
        result.token_ids, loaded.decode_keeping_special, loaded.markers
    )
    # Special tokens other than the markers are not part of an answer.
    text = extracted.text
    for special in loaded.tokenizer.all_special_tokens:
        text = text.replace(special, "")
    text = text.strip()
    return Answer(
        instruction=record["instruction"],
        input=record.get("input") or "",
        text=text,
        raw=loaded.decode_keeping_special(result.token_ids),
        end_marker_found=extracted.end_marker_found,
        finish_reason=result.finish_reason,
        completion_tokens=result.completion_tokens,
    )


def answer_instructions(
    model_or_run: str | Path,
    instructions: Sequence[str | dict[str, str]],
    *,
    max_new_tokens: int = 128,
    template: str | None = None,
    temperature: float = 0.0,
    seed: int | None = None,
    batch_size: int = 8,
    loaded: LoadedModel | None = None,
) -> list[Answer]:
    """Answer instructions with a base model name/folder or a training run directory.

    `model_or_run` is a model name or folder, a run directory or a merged export (the last two
    use the template they recorded). Greedy by default, so a base
    and a tuned model can be compared answer by answer; `Answer.end_marker_found` tells whether the
    model ended its answer the way the template asks (format adherence). Pass `loaded` to reuse a
    model already in memory.
    """
    if loaded is None:
        # A folder that records its template refuses another one.
        loaded = load_for_inference(str(model_or_run), template=template)
    records = [
        {"instruction": i, "input": ""} if isinstance(i, str) else {"input": "", **i}
        for i in instructions
    ]
    engine = loaded.make_engine(batch_size)
    params = templated_params(
        loaded, max_new_tokens=max_new_tokens, temperature=temperature, seed=seed
    )
    return answer_records(loaded, engine, records, params)


def compare_base_and_tuned(
    run: str | Path,
    instructions: Sequence[str | dict[str, str]],
    *,
    max_new_tokens: int = 128,
    batch_size: int = 8,
) -> tuple[list[Answer], list[Answer]]:
    """(base answers, tuned answers) to the same instructions, greedy, both in the run's template.

    The base model is the one the run was trained from, prompted exactly as the tuned model is, so
    any difference (in content, or in `end_marker_found`) comes from the training.
    """
    info = read_run_info(run)
    tuned = answer_instructions(
        run, instructions, max_new_tokens=max_new_tokens, batch_size=batch_size
    )
    base = answer_instructions(
        info.base_model_location(),
        instructions,
        max_new_tokens=max_new_tokens,
        template=info.template,
        batch_size=batch_size,
    )
    return base, tuned
