"""The engine's own decode step and packed weights (inference/decode_step.py): the same tokens and
logits as transformers' forward, the models it leaves to transformers, and the thread policy."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from corral.inference.decode_step import (
    PackedLinear,
    pack_linear_weights,
    packing_unavailable_reason,
    unsupported_reason,
)
from corral.inference.engine import GenerationEngine
from corral.inference.params import SamplingParams

from corral.models import load_model, load_tokenizer

pytestmark = pytest.mark.usefixtures("one_torch_thread")

# Prompts of different lengths, so rows are left-padded against each other.
TEXTS = ["Say hi.", "What is the capital of France? Answer in one sentence.", "Colors:"]


def _prompts(tokenizer) -> list[list[int]]:
    return [tokenizer(text)["input_ids"] for text in TEXTS]


def _greedy(model, tokenizer, **engine_options):
    engine = GenerationEngine(model, tokenizer, max_batch_size=4, **engine_options)
    params = SamplingParams(max_new_tokens=12, logprobs=0)
    return engine, engine.generate(_prompts(tokenizer), params)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fast_decode_step_gives_transformers_tokens_and_logprobs(tiny_model_path, dtype):
    tokenizer = load_tokenizer(str(tiny_model_path))
    reference_engine, reference = _greedy(
        load_model(str(tiny_model_path), dtype=dtype), tokenizer, fast_path=False
    )
    engine, results = _greedy(
        load_model(str(tiny_model_path), dtype=dtype), tokenizer, pack_weights=True
    )
    assert reference_engine.fast_path_unavailable == "turned off"
    assert engine.fast_path_unavailable is None and engine.packing_unavailable is None
    tolerance = 1e-4 if dtype == torch.float32 else 5e-2
    for expected, got in zip(reference, results, strict=True):
        assert got.token_ids == expected.token_ids
        for (want, _), (have, _) in zip(expected.logprobs, got.logprobs, strict=True):
            assert have == pytest.approx(want, abs=tolerance)
    assert engine.stats.decode_steps > 0


@pytest.mark.slow
def test_packed_embedded_model_answers_like_transformers_generate(
    embedded_model_path, embedded_model, embedded_tokenizer
):
    # A model of its own: packing changes it in place, and the session's model stays as it is.
    model = load_model(str(embedded_model_path), dtype=torch.float32).eval()
    engine = GenerationEngine(model, embedded_tokenizer, max_batch_size=4, pack_weights=True)
    assert isinstance(model.model.layers[0].self_attn.q_proj, PackedLinear)
    prompts = [
        embedded_tokenizer.apply_chat_template(
            [{"role": "user", "content": text}], add_generation_prompt=True, return_dict=False
        )
        for text in TEXTS
    ]
    eos = embedded_tokenizer.eos_token_id
    results = engine.generate(prompts, SamplingParams(max_new_tokens=16, stop_token_ids=(eos,)))
    for prompt, result in zip(prompts, results, strict=True):
        with torch.inference_mode():
            expected = embedded_model.generate(
                torch.tensor([prompt]),
                attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                max_new_tokens=16,
                do_sample=False,
                eos_token_id=eos,
                pad_token_id=embedded_tokenizer.pad_token_id,
            )[0, len(prompt) :].tolist()
        assert result.token_ids == expected


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("bias", [False, True])
def test_packed_linear_computes_the_linear_and_drops_the_plain_weight(dtype, bias):
    torch.manual_seed(0)
    linear = torch.nn.Linear(64, 96, bias=bias).to(dtype)
    packed = PackedLinear(linear, rows_hint=8)
    assert not hasattr(packed, "weight") and "packed" in repr(packed)
    for shape in [(5, 64), (3, 1, 64), (2, 7, 64)]:
        inputs = torch.randn(shape, dtype=dtype)
        expected = F.linear(inputs, linear.weight, linear.bias)
        got = packed(inputs)
        assert got.shape == expected.shape
        assert torch.allclose(
            got.float(), expected.float(), atol=1e-2 if dtype != torch.float32 else 1e-5
        )


def test_packing_twice_changes_nothing(tiny_model_path):
    model = load_model(str(tiny_model_path), dtype=torch.float32)
    ids = torch.tensor([[5, 6, 7, 8]])
    with torch.inference_mode():
        before = model(ids).logits
        pack_linear_weights(model)
        first = model.model.layers[0].mlp.down_proj
        pack_linear_weights(model)
        assert model.model.layers[0].mlp.down_proj is first
        after = model(ids).logits  # transformers' own forward runs on the packed layers
    assert torch.allclose(before, after, atol=1e-5)


def test_models_outside_the_family_keep_transformers_forward(tiny_model_path):
    from peft import LoraConfig, get_peft_model
    from transformers import Qwen3Config, Qwen3ForCausalLM

    qwen3 = Qwen3ForCausalLM(
        Qwen3Config(
            vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, head_dim=8,
        )
    )  # fmt: skip
    assert "qwen3" in unsupported_reason(qwen3)
    assert "qwen3" in packing_unavailable_reason(qwen3)

    tokenizer = load_tokenizer(str(tiny_model_path))
    adapted = get_peft_model(
        load_model(str(tiny_model_path), dtype=torch.float32),
        LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False),
    )
    reason = unsupported_reason(adapted)
    assert reason is not None and "adapter" in reason
    engine = GenerationEngine(adapted, tokenizer, max_batch_size=2, pack_weights=True)
    assert engine.fast_path_unavailable == reason and engine.packing_unavailable == reason
    results = engine.generate(_prompts(tokenizer)[:2], SamplingParams(max_new_tokens=4))
    assert all(len(result.token_ids) == 4 for result in results)


def test_prefills_and_decode_steps_run_on_their_own_thread_counts(tiny_model_path):
    seen: list[int] = []

    class Recording(GenerationEngine):
        def _advance(self, logits, first_row):  # each step's tokens, as they are picked
            seen.append(torch.get_num_threads())
            super()._advance(logits, first_row)

    tokenizer = load_tokenizer(str(tiny_model_path))
    model = load_model(str(tiny_model_path), dtype=torch.float32)
    engine = Recording(model, tokenizer, decode_threads=1, prefill_threads=2)
    engine.generate(_prompts(tokenizer)[:1], SamplingParams(max_new_tokens=4))
    # The first token comes from the prefill, the others from decode steps.
    assert seen == [2, 1, 1, 1]
