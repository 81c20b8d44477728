"""`/v1/completions` details on a small context: the server app on a thread on 127.0.0.1 with the
tiny random LLaMA, driven by the official `openai` client."""

from __future__ import annotations

import openai
import pytest
from servers import app_on_a_thread

CONTEXT = 64


@pytest.fixture(scope="module")
def tiny_server(tiny_model_path):
    from corral.inference.loading import load_for_inference
    from corral.inference.server import build_server

    loaded = load_for_inference("tiny-random", template="alpaca")
    loaded.context_length = CONTEXT  # a small window, so prompts can fill most of it cheaply
    with app_on_a_thread(build_server(loaded, model_name="tiny")) as base:
        yield base, loaded


@pytest.fixture
def client(tiny_server):
    base, _ = tiny_server
    return openai.OpenAI(base_url=f"{base}/v1", api_key="none", max_retries=0, timeout=60)


def test_each_prompt_of_a_batch_gets_its_own_token_budget(tiny_server, client):
    """Without max_tokens each prompt may generate up to 16 tokens or what its context leaves;
    a long prompt beside a short one must not cut the short one's budget."""
    _, loaded = tiny_server
    tokenizer = loaded.tokenizer
    short = "Name a color."
    long_ids = tokenizer("word " * 200)["input_ids"][: CONTEXT - 5]  # leaves room for 5 tokens
    long_text = tokenizer.decode(long_ids, skip_special_tokens=True)
    assert len(tokenizer(long_text)["input_ids"]) == CONTEXT - 5
    no_end = {str(tokenizer.eos_token_id): -100}  # generate to the budget, never stop early
    reply = client.completions.create(
        model="tiny", prompt=[short, long_text], temperature=0, logit_bias=no_end
    )
    by_index = {choice.index: choice for choice in reply.choices}
    assert by_index[0].finish_reason == by_index[1].finish_reason == "length"
    # 16 for the short prompt, 5 for the long one (both got 5 when the batch shared one budget).
    assert reply.usage.completion_tokens == 16 + 5
