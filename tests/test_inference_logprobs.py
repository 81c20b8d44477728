"""Log-probabilities from the server, as evaluation harnesses read them: `/v1/completions` with
`echo` and `logprobs` (token-id prompts, scoring the prompt itself) and chat `logprobs`. The app
runs on a thread on 127.0.0.1 with the tiny random LLaMA; requests go through the official
`openai` client or plain HTTP."""

from __future__ import annotations

import math

import httpx
import openai
import pytest
import torch
from servers import app_on_a_thread


@pytest.fixture(scope="module")
def tiny_server(tiny_model_path):
    from corral.inference.loading import load_for_inference
    from corral.inference.server import build_server

    loaded = load_for_inference("tiny-random", template="alpaca")
    with app_on_a_thread(build_server(loaded, model_name="tiny", max_batch_size=4)) as base:
        yield base, loaded


@pytest.fixture
def client(tiny_server):
    base, _ = tiny_server
    return openai.OpenAI(base_url=f"{base}/v1", api_key="none", max_retries=0, timeout=60)


def reference_logprobs(loaded, ids: list[int]) -> list[float]:
    """log P(ids[i] | ids[:i]) for i >= 1 from one plain forward pass, outside the engine."""
    with torch.no_grad():
        logits = loaded.model(torch.tensor([ids])).logits[0].float()
    log_probs = logits.log_softmax(-1)
    return [log_probs[i - 1, ids[i]].item() for i in range(1, len(ids))]


def test_echo_scores_every_prompt_token_like_a_plain_forward_pass(tiny_server, client):
    """What loglikelihood evaluation reads: the prompt's tokens with their logprobs (the first
    null), then the generated token; each value matches a forward pass outside the server."""
    _, loaded = tiny_server
    ids = loaded.tokenizer("The capital of France is Paris")["input_ids"]
    reply = client.completions.create(
        model="tiny", prompt=[ids], max_tokens=1, logprobs=1, echo=True, temperature=0
    )
    logprobs = reply.choices[0].logprobs
    assert len(logprobs.tokens) == len(logprobs.token_logprobs) == len(ids) + 1
    assert logprobs.token_logprobs[0] is None and logprobs.top_logprobs[0] is None
    expected = reference_logprobs(loaded, ids)
    for got, want in zip(logprobs.token_logprobs[1 : len(ids)], expected, strict=True):
        assert got == pytest.approx(want, abs=1e-4)
    # The text starts with the prompt, token by token; the offsets index into it.
    text = reply.choices[0].text
    assert text.startswith(loaded.tokenizer.decode(ids, skip_special_tokens=False))
    for token, offset in zip(logprobs.tokens, logprobs.text_offset, strict=True):
        assert text[offset : offset + len(token)] == token


def test_greedy_tokens_are_exactly_their_top_alternative(tiny_server, client):
    """Harnesses decide `is_greedy` by comparing the token's logprob with the top alternative's
    using ==; both must come from the same computation, and the generated (greedy) token must
    be the top one."""
    _, loaded = tiny_server
    ids = loaded.tokenizer("Give three tips for staying healthy.")["input_ids"]
    reply = client.completions.create(
        model="tiny", prompt=ids, max_tokens=4, logprobs=3, echo=True, temperature=0
    )
    logprobs = reply.choices[0].logprobs
    for token, value, top in zip(
        logprobs.tokens[1:], logprobs.token_logprobs[1:], logprobs.top_logprobs[1:], strict=True
    ):
        assert top[token] == value
        assert 3 <= len(top) <= 4  # the three likeliest, plus the chosen token when it is not
    for value, top in zip(
        logprobs.token_logprobs[len(ids) :], logprobs.top_logprobs[len(ids) :], strict=True
    ):
        assert value == max(top.values())  # temperature 0 picks the likeliest
    for value in logprobs.token_logprobs[1:]:
        assert value <= 0.0 and math.isfinite(value)


def test_a_batch_of_token_prompts_comes_back_in_order(tiny_server, client):
    _, loaded = tiny_server
    prompts = [
        loaded.tokenizer(text)["input_ids"]
        for text in ("Name a color.", "Write a haiku about the sea and the wind.", "Hi")
    ]
    reply = client.completions.create(
        model="tiny", prompt=prompts, max_tokens=1, logprobs=0, echo=True, temperature=0
    )
    choices = sorted(reply.choices, key=lambda c: c.index)
    assert [c.index for c in choices] == [0, 1, 2]
    for prompt, choice in zip(prompts, choices, strict=True):
        assert len(choice.logprobs.token_logprobs) == len(prompt) + 1
        expected = reference_logprobs(loaded, prompt)
        got = choice.logprobs.token_logprobs[1 : len(prompt)]
        assert got == pytest.approx(expected, abs=1e-4)  # left padding changes nothing


def test_max_tokens_zero_with_echo_scores_the_prompt_alone(tiny_server, client):
    _, loaded = tiny_server
    ids = loaded.tokenizer("Paris is in France")["input_ids"]
    reply = client.completions.create(
        model="tiny", prompt=ids, max_tokens=0, logprobs=0, echo=True, temperature=0
    )
    choice = reply.choices[0]
    assert len(choice.logprobs.token_logprobs) == len(ids)
    assert choice.text == loaded.tokenizer.decode(ids, skip_special_tokens=False)
    assert reply.usage.completion_tokens == 0


def test_text_prompts_echo_their_own_text(client):
    reply = client.completions.create(
        model="tiny", prompt="Once upon a time", max_tokens=3, echo=True, temperature=0
    )
    assert reply.choices[0].text.startswith("Once upon a time")
    assert reply.choices[0].logprobs is None


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"prompt": [[1, 2, 10**9]], "max_tokens": 1}, "prompt"),
        ({"prompt": [[1, -3]], "max_tokens": 1}, "prompt"),
        ({"prompt": [[]], "max_tokens": 1}, "prompt"),
        ({"prompt": "hi", "max_tokens": 0}, "max_tokens"),
        ({"prompt": "hi", "logprobs": 21}, "logprobs"),
        ({"prompt": "hi", "logprobs": 1, "stream": True}, "stream"),
        ({"prompt": "hi", "seed": 2**64}, "seed"),
    ],
)
def test_bad_scoring_requests_are_client_errors(tiny_server, body, field):
    base, _ = tiny_server
    response = httpx.post(f"{base}/v1/completions", json={"model": "tiny", **body}, timeout=30)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == field or field in error["message"], error


def test_chat_logprobs_cover_the_answer_tokens(tiny_server, client):
    _, loaded = tiny_server
    reply = client.chat.completions.create(
        model="tiny",
        messages=[{"role": "user", "content": "Name a color."}],
        max_tokens=6,
        temperature=0,
        logprobs=True,
        top_logprobs=2,
    )
    choice = reply.choices[0]
    content = choice.logprobs.content
    assert content, "no logprobs for the answer"
    assert "".join(entry.token for entry in content).strip() == choice.message.content.strip()
    for entry in content:
        assert entry.top_logprobs[0].logprob == entry.logprob  # greedy: the likeliest token
        assert bytes(entry.bytes).decode("utf-8") == entry.token
        assert len(entry.top_logprobs) >= 2


def test_chat_top_logprobs_without_logprobs_is_a_client_error(tiny_server):
    base, _ = tiny_server
    response = httpx.post(
        f"{base}/v1/chat/completions",
        json={"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "top_logprobs": 2},
        timeout=30,
    )
    assert response.status_code == 400
    assert response.json()["error"]["param"] == "top_logprobs"
