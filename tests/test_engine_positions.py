"""The batching engine feeds every token at its true position: rotary embeddings make an
off-by-one position a different model, whose greedy answers drift from transformers' and vLLM's."""

from __future__ import annotations

import inspect

import pytest
import torch
from corral.inference.params import SamplingParams


class RecordingModel(torch.nn.Module):
    """The model, unchanged, with the position ids of every forward pass written down."""

    def __init__(self, model) -> None:
        super().__init__()
        self.model = model
        self.config = model.config
        self.calls: list[torch.Tensor] = []

    def forward(self, **kwargs):
        self.calls.append(kwargs["position_ids"].detach().cpu().clone())
        return self.model(**kwargs)


def test_prefill_and_decode_positions_continue_each_prompt(tiny_model_path):
    from corral.inference.engine import GenerationEngine

    from corral.models import load_model, load_tokenizer

    tokenizer = load_tokenizer("tiny-random", padding_side="left")
    model = RecordingModel(load_model("tiny-random", dtype=torch.float32, tokenizer=tokenizer))
    engine = GenerationEngine(model, tokenizer, max_batch_size=4)
    prompts = [list(range(10, 15)), list(range(20, 28))]  # 5 and 8 tokens
    new_tokens = 4
    engine.generate(prompts, SamplingParams(max_new_tokens=new_tokens))

    prefill, *decodes = model.calls
    # Left padding: the shorter prompt's real tokens still count from 0.
    assert prefill[0, -5:].tolist() == [0, 1, 2, 3, 4]
    assert prefill[1].tolist() == list(range(8))
    # The k-th generated token is fed at len(prompt) + k (k from 0).
    assert len(decodes) == new_tokens - 1
    for k, positions in enumerate(decodes):
        assert positions[:, 0].tolist() == [5 + k, 8 + k]


@pytest.mark.slow
def test_greedy_answers_equal_a_full_forward_pass_at_every_step(
    embedded_model, embedded_tokenizer, one_torch_thread
):
    """No cache, no batching: the argmax chain of plain forward passes is the reference."""
    from corral.inference.engine import GenerationEngine

    from corral.templates import alpaca_template

    template = alpaca_template(embedded_tokenizer.eos_token)
    prompt = embedded_tokenizer(template.format_prompt("Name a fruit that is yellow."))["input_ids"]
    engine = GenerationEngine(embedded_model, embedded_tokenizer, max_batch_size=2)
    generated = engine.generate([prompt], SamplingParams(max_new_tokens=24))[0].token_ids
    sequence = list(prompt)
    with torch.inference_mode():
        for _ in generated:
            logits = embedded_model(input_ids=torch.tensor([sequence])).logits[0, -1]
            sequence.append(int(logits.argmax()))
    assert generated == sequence[len(prompt) : len(prompt) + len(generated)]


def test_a_wrapped_model_gets_the_cache_under_the_name_its_transformers_uses(tiny_model_path):
    """transformers 5.24 renamed the forward's `past_key_values` to `cache` (the old name warns
    until 5.40): the engine asks the wrapped model's forward which name it takes."""
    import warnings

    from corral.inference.engine import GenerationEngine
    from corral.inference.kv_cache import cache_keyword

    from corral.models import load_model, load_tokenizer

    tokenizer = load_tokenizer("tiny-random", padding_side="left")
    inner = load_model("tiny-random", dtype=torch.float32, tokenizer=tokenizer)
    model = RecordingModel(inner)
    assert cache_keyword(model) == cache_keyword(inner)
    assert cache_keyword(inner) in inspect.signature(inner.forward).parameters
    engine = GenerationEngine(model, tokenizer, max_batch_size=2)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        results = engine.generate([[10, 11, 12]], SamplingParams(max_new_tokens=3))
    assert results[0].completion_tokens == 3
    assert not [w for w in caught if "deprecated" in str(w.message)], caught
