"""The batching engine on the real embedded model: batched greedy decoding matches transformers'
own `generate` token for token, requests join a running batch, and sampling settings, stop
strings and cancellation behave."""

from __future__ import annotations

import queue

import pytest
import torch
from corral.inference.engine import GenerationEngine
from corral.inference.params import SamplingParams
from corral.inference.sampling import sample_next_tokens

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_torch_thread")]


QUESTIONS = [
    "Say hi.",
    "What is the capital of France? Answer in one short sentence, please.",
    "List three colors of the rainbow, one per line, and nothing else at all.",
]


@pytest.fixture(scope="module")
def prompts(embedded_tokenizer):
    return [
        embedded_tokenizer.apply_chat_template(
            [{"role": "user", "content": q}],
            add_generation_prompt=True,
            tokenize=True,
            return_dict=False,
        )
        for q in QUESTIONS
    ]


@pytest.fixture(scope="module")
def engine(embedded_model, embedded_tokenizer):
    return GenerationEngine(embedded_model, embedded_tokenizer, max_batch_size=8)


def reference_greedy(model, tokenizer, prompt_ids, max_new_tokens, repetition_penalty=1.0):
    with torch.inference_mode():
        out = model.generate(
            torch.tensor([prompt_ids]),
            attention_mask=torch.ones(1, len(prompt_ids), dtype=torch.long),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
            repetition_penalty=repetition_penalty,
        )
    return out[0, len(prompt_ids) :].tolist()


def test_batched_greedy_matches_transformers_generate(
    engine, prompts, embedded_model, embedded_tokenizer
):
    params = SamplingParams(max_new_tokens=8, stop_token_ids=(embedded_tokenizer.eos_token_id,))
    results = engine.generate(prompts, params)
    for prompt, result in zip(prompts, results, strict=True):
        expected = reference_greedy(embedded_model, embedded_tokenizer, prompt, 8)
        assert result.token_ids == expected
        assert result.prompt_tokens == len(prompt)
        assert result.completion_tokens == len(expected)
        assert result.text == embedded_tokenizer.decode(
            [t for t in expected if t != embedded_tokenizer.eos_token_id], skip_special_tokens=True
        )
    assert engine.stats.max_batch_size_seen >= 2


def test_repetition_penalty_matches_transformers(
    engine, prompts, embedded_model, embedded_tokenizer
):
    """The local teacher's setting (1.3 here, to change answers visibly): the same tokens as
    transformers' generate with the same penalty, over prompt and answer alike."""
    eos = embedded_tokenizer.eos_token_id
    params = SamplingParams(max_new_tokens=12, stop_token_ids=(eos,), repetition_penalty=1.3)
    results = engine.generate(prompts, params)
    changed = 0
    for prompt, result in zip(prompts, results, strict=True):
        expected = reference_greedy(embedded_model, embedded_tokenizer, prompt, 12, 1.3)
        assert result.token_ids == expected
        changed += expected != reference_greedy(embedded_model, embedded_tokenizer, prompt, 12)
    assert changed  # the penalty did something on these prompts


def test_request_joining_a_running_batch_gets_the_same_tokens(
    embedded_model, embedded_tokenizer, prompts
):
    engine = GenerationEngine(embedded_model, embedded_tokenizer, max_batch_size=4)
    params = SamplingParams(max_new_tokens=10)
    alone = engine.generate(prompts[:2], params)
    engine.start()
    try:
        first_events: queue.Queue = queue.Queue()
        second_events: queue.Queue = queue.Queue()
        engine.submit(prompts[0], params, first_events.put)
        # Wait until the first request is decoding, then add the second one mid-flight.
        assert first_events.get(timeout=60).result is None
        engine.submit(prompts[1], params, second_events.put)
        results = []
        for events in (first_events, second_events):
            while (event := events.get(timeout=120)).result is None:
                pass
            results.append(event.result)
    finally:
        engine.shutdown()
    assert [r.token_ids for r in results] == [r.token_ids for r in alone]
    assert engine.stats.max_batch_size_seen == 2


def test_stop_strings_and_length_limits(engine, prompts):
    free = engine.generate([prompts[2]], SamplingParams(max_new_tokens=10))[0]
    assert free.finish_reason == "length" and free.completion_tokens == 10
    stop_word = free.text.split()[2]
    stopped = engine.generate([prompts[2]], SamplingParams(max_new_tokens=10, stop=(stop_word,)))[0]
    assert stopped.finish_reason == "stop"
    assert stopped.text == free.text[: free.text.index(stop_word)]
    assert stopped.completion_tokens < 10


def test_text_held_back_for_a_possible_stop_string_is_released_at_the_end(
    engine, prompts, embedded_tokenizer
):
    eos = (embedded_tokenizer.eos_token_id,)
    free = engine.generate([prompts[1]], SamplingParams(max_new_tokens=16, stop_token_ids=eos))[0]
    # A stop string that starts like the end of the answer but never completes.
    almost = free.text[-1] + "\u2063never"
    held = engine.generate(
        [prompts[1]], SamplingParams(max_new_tokens=16, stop_token_ids=eos, stop=(almost,))
    )[0]
    assert held.text == free.text and held.finish_reason == free.finish_reason


def test_per_request_sampling_settings_in_one_batch(engine, prompts):
    """Seeded sampling reproduces; top_k=1 and a tiny top_p reduce to greedy; all in one batch."""
    seeded = SamplingParams(max_new_tokens=6, temperature=2.0, seed=1234)
    results = engine.generate(
        [prompts[0], prompts[0], prompts[0], prompts[1], prompts[1], prompts[1]],
        [
            seeded,
            seeded,
            SamplingParams(max_new_tokens=6, temperature=2.0, seed=99),
            SamplingParams(max_new_tokens=6),
            SamplingParams(max_new_tokens=6, temperature=1.0, top_k=1, seed=5),
            SamplingParams(max_new_tokens=6, temperature=1.0, top_p=1e-6, seed=5),
        ],
    )
    assert results[0].token_ids == results[1].token_ids
    assert results[2].token_ids != results[0].token_ids
    assert results[3].token_ids == results[4].token_ids == results[5].token_ids


def test_sampler_top_p_keeps_the_smallest_set_reaching_the_mass():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    params = SamplingParams(temperature=1.0, top_p=0.7)
    generator = torch.Generator().manual_seed(0)
    drawn = {sample_next_tokens(logits, [params], [generator])[0] for _ in range(300)}
    assert drawn == {0, 1}
    biased = SamplingParams(logit_bias={0: -100.0})
    assert sample_next_tokens(logits, [biased], [generator]) == [1]


def test_cancel_stops_generation_early(embedded_model, embedded_tokenizer, prompts):
    engine = GenerationEngine(embedded_model, embedded_tokenizer)
    engine.start()
    try:
        events: queue.Queue = queue.Queue()
        handle = engine.submit(prompts[2], SamplingParams(max_new_tokens=500), events.put)
        assert events.get(timeout=60).result is None
        handle.cancel()
        while (event := events.get(timeout=60)).result is None:
            pass
    finally:
        engine.shutdown()
    assert event.result.finish_reason == "cancelled"
    assert event.result.completion_tokens < 100
    assert engine.pending == 0 and engine.stats.requests_cancelled == 1


def test_prompt_too_long_for_the_context_is_refused(engine):
    with pytest.raises(ValueError, match="context length"):
        engine.submit(
            [1] * 10, SamplingParams(max_new_tokens=engine.context_length), lambda e: None
        )


def test_stream_yields_deltas_that_add_up_to_the_text(embedded_model, embedded_tokenizer, prompts):
    engine = GenerationEngine(embedded_model, embedded_tokenizer)
    engine.start()
    try:
        events = list(engine.stream(prompts[1], SamplingParams(max_new_tokens=12)))
    finally:
        engine.shutdown()
    deltas = [e.text for e in events if e.result is None]
    assert len(deltas) >= 2
    assert "".join(deltas) == events[-1].result.text


def test_prefill_token_budget_splits_a_burst_of_prompts(
    embedded_model, embedded_tokenizer, prompts
):
    params = SamplingParams(max_new_tokens=3)
    together = GenerationEngine(embedded_model, embedded_tokenizer).generate(prompts, params)
    budgeted = GenerationEngine(embedded_model, embedded_tokenizer, max_prefill_tokens=1)
    results = budgeted.generate(prompts, params)
    assert budgeted.stats.prefills == len(prompts)  # one prompt per prefill pass
    assert [r.token_ids for r in results] == [r.token_ids for r in together]


def test_a_failing_request_gets_an_error_and_the_engine_keeps_serving(
    embedded_model, embedded_tokenizer, prompts
):
    engine = GenerationEngine(embedded_model, embedded_tokenizer)
    engine.start()
    try:
        bad = list(
            engine.stream([len(embedded_tokenizer) + 1000], SamplingParams(max_new_tokens=2))
        )
        good = list(engine.stream(prompts[0], SamplingParams(max_new_tokens=2)))
    finally:
        engine.shutdown()
    assert bad[-1].result.finish_reason == "error" and "index" in bad[-1].result.error.lower()
    assert good[-1].result.finish_reason == "length" and good[-1].result.completion_tokens == 2
