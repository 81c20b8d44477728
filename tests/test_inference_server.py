"""`corral serve` as a real process on 127.0.0.1, driven by the official `openai` client and by raw
HTTP for what a well-behaved client never sends (malformed, oversized, unauthorised requests)."""

from __future__ import annotations

import asyncio
import json

import httpx
import openai
import pytest
from corral.data_gen.teachers import Completion, OpenAICompatibleTeacher
from corral.data_gen.teachers import SamplingParams as TeacherSamplingParams
from servers import corral_serve, wait_until

pytestmark = pytest.mark.slow

API_KEY = "sk-corral-test"


@pytest.fixture(scope="module")
def server(embedded_model_path):
    """One server for the module: the embedded model, an API key from the environment."""
    with corral_serve(
        ["--model", "embedded", "--max-batch-size", "8"], env={"CORRAL_API_KEY": API_KEY}
    ) as base:
        yield base


@pytest.fixture
def client(server):
    return openai.OpenAI(base_url=f"{server}/v1", api_key=API_KEY, max_retries=0, timeout=120)


def health(server) -> dict:
    response = httpx.get(f"{server}/health", timeout=10)
    assert response.status_code == 200
    return response.json()


MESSAGES = [{"role": "user", "content": "Name three fruits, one per line."}]


def test_models_and_api_key(server, client):
    models = client.models.list()
    assert [m.id for m in models.data] == ["embedded"]
    for key in ("wrong-key", None):
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        response = httpx.get(f"{server}/v1/models", headers=headers, timeout=10)
        assert response.status_code == 401
        assert response.json()["error"]["code"] == "invalid_api_key"
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{server}/v1", api_key="wrong", max_retries=0).models.list()


def test_chat_completion_and_stream_agree(client):
    reply = client.chat.completions.create(
        model="embedded", messages=MESSAGES, max_tokens=20, temperature=0
    )
    text = reply.choices[0].message.content
    assert text.strip() and reply.choices[0].message.role == "assistant"
    assert reply.choices[0].finish_reason in ("stop", "length")
    usage = reply.usage
    assert 0 < usage.completion_tokens <= 20 and usage.prompt_tokens > 10
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens

    chunks = list(
        client.chat.completions.create(
            model="embedded",
            messages=MESSAGES,
            max_tokens=20,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    deltas = [c.choices[0].delta.content or "" for c in chunks if c.choices]
    assert len([d for d in deltas if d]) >= 2  # streamed piece by piece
    assert "".join(deltas) == text
    assert chunks[-1].usage.completion_tokens == usage.completion_tokens
    finish = [
        c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason
    ]
    assert finish == [reply.choices[0].finish_reason]


def test_multi_turn_chat_renders_every_turn_with_the_chat_template(client, embedded_tokenizer):
    messages = [
        {"role": "system", "content": "Answer with one word."},
        {"role": "user", "content": "What color is the sky?"},
        {"role": "assistant", "content": "Blue."},
        {"role": "user", "content": "And grass?"},
    ]
    reply = client.chat.completions.create(
        model="embedded", messages=messages, max_tokens=8, temperature=0
    )
    expected = embedded_tokenizer.apply_chat_template(
        messages, add_generation_prompt=True, tokenize=True, return_dict=False
    )
    assert reply.usage.prompt_tokens == len(expected)


def test_completions_with_stop_sequences_and_prompt_lists(client):
    prompt = "Monday, Tuesday, Wednesday,"
    free = client.completions.create(model="embedded", prompt=prompt, max_tokens=12, temperature=0)
    free_text = free.choices[0].text
    stop_word = free_text.split()[1]
    reply = client.completions.create(
        model="embedded",
        prompt=prompt,
        max_tokens=12,
        temperature=0,
        stop=[stop_word, "never-seen"],
    )
    choice = reply.choices[0]
    assert choice.finish_reason == "stop"
    assert choice.text == free_text[: free_text.index(stop_word)]
    assert reply.usage.completion_tokens < free.usage.completion_tokens

    several = client.completions.create(
        model="embedded",
        prompt=["One, two,", "The capital of France is"],
        max_tokens=4,
        temperature=0,
    )
    assert [c.index for c in several.choices] == [0, 1]
    assert all(c.text for c in several.choices) and several.usage.completion_tokens <= 8

    streamed = client.completions.create(
        model="embedded",
        prompt="Monday, Tuesday, Wednesday,",
        max_tokens=12,
        temperature=0,
        stream=True,
    )
    assert "".join(c.choices[0].text for c in streamed if c.choices) == free.choices[0].text


def test_raw_stream_is_server_sent_events_ending_in_done(server):
    body = {"model": "embedded", "messages": MESSAGES, "max_tokens": 5, "stream": True}
    with httpx.stream(
        "POST",
        f"{server}/v1/chat/completions",
        json=body,
        headers={"Authorization": f"Bearer {API_KEY}"},
        timeout=60,
    ) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in response.iter_lines() if line]
    assert all(line.startswith("data: ") for line in lines)
    assert lines[-1] == "data: [DONE]"
    first = json.loads(lines[0][len("data: ") :])
    assert (
        first["object"] == "chat.completion.chunk"
        and first["choices"][0]["delta"]["role"] == "assistant"
    )


BAD_REQUESTS = [
    (b"{not json", 400, None),
    (b'{"model": "embedded"}', 400, None),
    (b'{"model": "embedded", "messages": []}', 400, None),
    (b'{"model": "embedded", "messages": [{"role": "robot", "content": "hi"}]}', 400, None),
    (
        b'{"model": "embedded", "messages": [{"role": "user", "content": "hi"}], "temperature": 7}',
        400,
        None,
    ),
    (
        b'{"model": "embedded", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 0}',
        400,
        None,
    ),
    (
        b'{"model": "embedded", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 9000}',
        400,
        "context_length_exceeded",
    ),
    (b'{"model": "embedded", "messages": [{"role": "user", "content": "hi"}], "n": 3}', 400, None),
    (
        b'{"model": "embedded", "messages": [{"role": "user", "content": "hi"}], "stream": true, '
        b'"return_token_ids": true}',
        400,
        None,
    ),
    (
        b'{"model": "gpt-4", "messages": [{"role": "user", "content": "hi"}]}',
        404,
        "model_not_found",
    ),
    (b"[1, 2, 3]", 400, None),
]


@pytest.mark.parametrize(("body", "status", "code"), BAD_REQUESTS)
def test_bad_requests_get_4xx_in_openai_error_shape(server, body, status, code):
    response = httpx.post(
        f"{server}/v1/chat/completions",
        content=body,
        headers={"Authorization": f"Bearer {API_KEY}", "Content-Type": "application/json"},
        timeout=30,
    )
    assert response.status_code == status
    error = response.json()["error"]
    assert error["message"] and error["type"] == "invalid_request_error"
    if code:
        assert error["code"] == code


def test_oversized_requests_are_refused_and_the_server_stays_healthy(server, client):
    huge = {"model": "embedded", "messages": [{"role": "user", "content": "x" * 2_000_000}]}
    response = httpx.post(
        f"{server}/v1/chat/completions",
        json=huge,
        headers={"Authorization": f"Bearer {API_KEY}"},
        timeout=30,
    )
    assert response.status_code == 413
    assert response.json()["error"]["code"] == "request_too_large"
    # The same without a Content-Length (chunked upload) is cut off while it streams in.
    chunks = (b"x" * 65536 for _ in range(40))
    response = httpx.post(
        f"{server}/v1/chat/completions",
        content=chunks,
        headers={"Authorization": f"Bearer {API_KEY}", "Content-Type": "application/json"},
        timeout=30,
    )
    assert response.status_code == 413
    # A prompt that fits the body limit but not the context window.
    long_prompt = {"model": "embedded", "prompt": "word " * 9000, "max_tokens": 4}
    response = httpx.post(
        f"{server}/v1/completions",
        json=long_prompt,
        headers={"Authorization": f"Bearer {API_KEY}"},
        timeout=60,
    )
    assert (
        response.status_code == 400
        and response.json()["error"]["code"] == "context_length_exceeded"
    )
    assert health(server)["status"] == "ok"
    reply = client.chat.completions.create(model="embedded", messages=MESSAGES, max_tokens=3)
    assert reply.usage.completion_tokens >= 1


def test_concurrent_requests_share_forward_passes(server):
    before = health(server)["engine"]

    async def run() -> list:
        client = openai.AsyncOpenAI(
            base_url=f"{server}/v1", api_key=API_KEY, max_retries=0, timeout=120
        )
        questions = [f"Count from {i} to {i + 5}." for i in range(6)]
        return await asyncio.gather(
            *(
                client.chat.completions.create(
                    model="embedded",
                    messages=[{"role": "user", "content": q}],
                    max_tokens=12,
                    temperature=0,
                )
                for q in questions
            )
        )

    replies = asyncio.run(run())
    assert len(replies) == 6 and all(r.choices[0].message.content for r in replies)
    after = health(server)["engine"]
    tokens = sum(r.usage.completion_tokens for r in replies)
    passes = after["forward_passes"] - before["forward_passes"]
    assert after["max_batch_size_seen"] >= 3
    assert passes < tokens  # one pass produced tokens for several requests


def wait_idle_after_cancel(server, cancelled_before: int) -> dict:
    """The server's health once it has counted a new cancellation and holds no request."""
    states = []

    def idle_after_cancel() -> bool:
        states.append(health(server))
        engine = states[-1]["engine"]
        return states[-1]["pending"] == 0 and engine["requests_cancelled"] > cancelled_before

    try:
        wait_until(idle_after_cancel, timeout=30, what="a cancelled request, then an idle engine")
    except TimeoutError as exc:
        raise AssertionError(f"{exc}; last health: {states[-1]}") from None
    return states[-1]


def test_non_streaming_client_that_gives_up_cancels_generation(server):
    before = health(server)["engine"]["requests_cancelled"]
    # EOS suppressed, so only the cancellation can end this request early.
    body = {
        "model": "embedded",
        "messages": MESSAGES,
        "max_tokens": 2000,
        "logit_bias": {"2": -100},
    }
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(
            f"{server}/v1/chat/completions",
            json=body,
            headers={"Authorization": f"Bearer {API_KEY}"},
            timeout=httpx.Timeout(10, read=1.5),
        )
    state = wait_idle_after_cancel(server, before)
    assert state["pending"] == 0
    assert state["engine"]["requests_cancelled"] == before + 1


def test_client_disconnect_cancels_generation(server):
    before = health(server)["engine"]["requests_cancelled"]
    body = {"model": "embedded", "messages": MESSAGES, "max_tokens": 2000, "stream": True}
    with httpx.stream(
        "POST",
        f"{server}/v1/chat/completions",
        json=body,
        headers={"Authorization": f"Bearer {API_KEY}"},
        timeout=60,
    ) as response:
        for line in response.iter_lines():
            if '"content"' in line and '"content":""' not in line:
                break  # got real text: now hang up
    state = wait_idle_after_cancel(server, before)
    assert state["pending"] == 0
    assert state["engine"]["requests_cancelled"] == before + 1


def test_serves_as_data_gen_teacher(server, monkeypatch):
    monkeypatch.setenv("CORRAL_TEST_TEACHER_KEY", API_KEY)
    teacher = OpenAICompatibleTeacher(
        "embedded",
        base_url=f"{server}/v1",
        api="completions",
        api_key_env="CORRAL_TEST_TEACHER_KEY",
        concurrency=2,
    )
    try:
        params = TeacherSamplingParams(temperature=0.0, max_tokens=8, stop=("\n",))
        completions = teacher.complete(
            ["List of tasks:\n1.", "Task 1: Write a haiku.\nTask 2:"], params
        )
    finally:
        teacher.close()
    assert all(isinstance(c, Completion) for c in completions), completions
    assert all("\n" not in c.text for c in completions)
    assert teacher.stats.completions == 2 and teacher.stats.completion_tokens > 0
