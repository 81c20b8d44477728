"""The MFU model (corral.training.mfu) that the training benchmarks and the GPU check share."""

from __future__ import annotations

import pytest
from corral.training.mfu import Architecture, flops_per_token

# SmolLM2-135M, the embedded model: 30 layers, 9 query heads sharing 3 key/value heads.
SMOLLM2_135M = {
    "vocab_size": 49152,
    "hidden_size": 576,
    "intermediate_size": 1536,
    "num_hidden_layers": 30,
    "num_attention_heads": 9,
    "num_key_value_heads": 3,
    "tie_word_embeddings": True,
}


def test_lora_flops_count_every_multiply_once_by_hand():
    arch = Architecture.from_config(SMOLLM2_135M)
    h, kv, inter, layers, vocab = 576, 192, 1536, 30, 49152
    n_mm = layers * (2 * h * h + 2 * h * kv + 3 * h * inter) + vocab * h
    n_adapter = layers * 8 * ((h + h) + (h + kv))  # rank 8 on q_proj (h->h) and v_proj (h->kv)
    assert arch.matmul_params == n_mm
    assert arch.lora_params(8, ["q_proj", "v_proj"]) == n_adapter
    lora = flops_per_token(arch, method="lora", adapter_params=n_adapter, context=100.0)
    assert lora["flops_per_token"] == 4 * n_mm + 6 * n_adapter + 12 * layers * h * 100.0
    full = flops_per_token(arch, method="full", adapter_params=n_adapter, context=100.0)
    assert full["flops_per_token"] - lora["flops_per_token"] == 2 * n_mm - 6 * n_adapter
    assert full["N_adapter"] == 0


def test_a_config_without_its_shape_is_refused():
    with pytest.raises(ValueError, match="lacks num_attention_heads"):
        Architecture.from_config({**SMOLLM2_135M, "num_attention_heads": None})
