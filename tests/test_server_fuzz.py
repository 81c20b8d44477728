"""No request makes the server answer 500: hostile values in every field of the request schema.

The server app runs on a thread on 127.0.0.1 with the tiny random LLaMA and an API key. A fixed
seed draws a bounded number of requests (each field absent, or a value of the right type, a wrong
type, an edge value, or text with a lone surrogate), sent as raw JSON over HTTP, streamed and not.
Every answer must be 2xx or a 4xx in OpenAI's error shape; nothing may be 5xx.
"""

from __future__ import annotations

import json
import random

import httpx
import pytest
from servers import app_on_a_thread

API_KEY = "sk-fuzz"
MODEL = "tiny"
REQUESTS_PER_ENDPOINT = 120
SURROGATE = "\ud800"

TEXT = ["hi", " ", "### End", "a" * 300, "é✓😀", "\x00"]
BAD_TEXT = [f"x{SURROGATE}y", "\udfff"]
WRONG = [None, True, "7", [], {}, [None], {"a": SURROGATE}]

# Each field: (values a client may send, values it may not). Both sides get drawn.
COMMON_FIELDS = {
    "model": ([MODEL], [SURROGATE, f"tiny{SURROGATE}", "other", "", 5]),
    "max_tokens": ([1, 2, 4], [0, -1, 2**31, 2**70]),
    "temperature": ([0.0, 0.5, 1.0, 2.0], [2.5, -0.1, 1e308]),
    "top_p": ([0.5, 1.0], [0.0, -1.0, 1.5]),
    "top_k": ([0, 1, 5], [-1, 2**70]),
    "stop": ([*TEXT, ["\n"], ["a", "b"]], [*BAD_TEXT, ["a"] * 20, [SURROGATE], [1]]),
    "seed": ([0, 1, -1, 2**63 - 1, 2**64 - 1], [2**64, 2**70, -(2**64)]),
    "n": ([1], [2, 0]),
    "logit_bias": ([{"1": 5.0}], [{SURROGATE: 1.0}, {"x": "y"}]),
    "presence_penalty": ([0.0, 1.0], [3.0, -3.0]),
    "frequency_penalty": ([0.0, -1.0], [2.5]),
    "stream_options": ([{"include_usage": True}], [{SURROGATE: 1}, "yes"]),
    "user": (TEXT, BAD_TEXT),
}
CHAT_FIELDS = {
    "messages": (
        [[{"role": "user", "content": text}] for text in TEXT] + [
            [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}],
            [{"role": "user", "content": [{"type": "text", "text": "hi"}]}],
        ],
        [[{"role": "user", "content": text}] for text in BAD_TEXT] + [
            [],
            [{"role": "robot", "content": "hi"}],
            [{"role": "user", "content": [{"type": "text", "text": SURROGATE}]}],
            [{"role": "user", "content": [{"type": "image", "url": "x"}]}],
            [{"role": "user"}],
            "hi",
        ],
    ),
    "max_completion_tokens": ([1, 2], [0, 2**70]),
    "logprobs": ([True, False], ["yes"]),
    "top_logprobs": ([0, 2, 20], [21, -1]),
}  # fmt: skip
COMPLETION_FIELDS = {
    "prompt": (
        [*TEXT, [1, 2, 3], [[1, 2], [3]], ["a", "b"]],
        [*BAD_TEXT, "", [], [[]], [-1], [10**9], [2**70], ["a", 1], ["a", SURROGATE]],
    ),
    "logprobs": ([0, 1, 5, 20], [21, -1]),
    "echo": ([True, False], ["no"]),
}  # fmt: skip
REQUIRED = {"model", "messages", "prompt"}


def draw(fields: dict[str, tuple[list, list]], rng: random.Random) -> dict:
    """A request body: most fields absent; each present one valid, invalid, or of a wrong type."""
    hostile = rng.random() < 0.5  # half the requests carry no invalid value at all
    body = {}
    for name, (valid, invalid) in fields.items():
        if rng.random() < (0.97 if name in REQUIRED else 0.3):
            roll = rng.random()
            if not hostile or roll < 0.6:
                body[name] = rng.choice(valid)
            else:
                body[name] = rng.choice(WRONG) if roll > 0.9 else rng.choice(invalid)
    return body


@pytest.fixture(scope="module")
def fuzz_server(tiny_model_path):
    from corral.inference.loading import load_for_inference
    from corral.inference.server import build_server

    loaded = load_for_inference("tiny-random", template="alpaca")
    loaded.context_length = 128
    app = build_server(
        loaded, model_name=MODEL, api_key=API_KEY, max_batch_size=4, default_max_tokens=4
    )
    with app_on_a_thread(app) as base:
        yield base


def check(response: httpx.Response, body: dict) -> None:
    shown = json.dumps(body, ensure_ascii=True)[:400]
    assert response.status_code < 500, f"{response.status_code} for {shown}: {response.text[:300]}"
    if response.status_code >= 400:
        error = response.json()["error"]
        assert error["message"] and error["type"], shown


@pytest.mark.parametrize(
    ("path", "fields"),
    [("/v1/chat/completions", CHAT_FIELDS), ("/v1/completions", COMPLETION_FIELDS)],
)
def test_no_request_gets_a_server_error(fuzz_server, path, fields):
    rng = random.Random(f"fuzz{path}")
    statuses: dict[int, int] = {}
    headers = {"Authorization": f"Bearer {API_KEY}", "Content-Type": "application/json"}
    with httpx.Client(base_url=fuzz_server, headers=headers, timeout=60) as http:
        for _ in range(REQUESTS_PER_ENDPOINT):
            body = draw({**COMMON_FIELDS, **fields}, rng)
            # Raw JSON with \\u escapes: what a client that sends lone surrogates puts on the wire.
            payload = json.dumps(body, ensure_ascii=True)
            if body.get("stream") is True or rng.random() < 0.25:
                body["stream"] = True
                payload = json.dumps(body, ensure_ascii=True)
                with http.stream("POST", path, content=payload) as response:
                    response.read()  # a stream that starts 200 must also end without being cut
                    check(response, body)
            else:
                response = http.post(path, content=payload)
                check(response, body)
            statuses[response.status_code] = statuses.get(response.status_code, 0) + 1
    # The draw reaches both sides: answers and refusals.
    assert statuses.get(200, 0) > 0 and sum(v for k, v in statuses.items() if k >= 400) > 0


@pytest.mark.parametrize(
    "authorization",
    ["Bearer sk-füzz", "Bearer \u00ff\u00fe", "Bearer sk-fuzz\u00e9", "Basic \u00e9", "Bearer"],
)
def test_non_ascii_authorization_is_401_not_500(fuzz_server, authorization):
    response = httpx.get(
        f"{fuzz_server}/v1/models",
        headers=[(b"Authorization", authorization.encode("latin-1"))],
        timeout=30,
    )
    assert response.status_code == 401
    assert response.json()["error"]["code"] == "invalid_api_key"


@pytest.mark.parametrize("where", ["content", "model", "stop"])
def test_a_lone_surrogate_is_400_on_chat_completions_and_streams(fuzz_server, where):
    body = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    if where == "content":
        body["messages"][0]["content"] = f"a{SURROGATE}"
    elif where == "model":
        body["model"] = SURROGATE
    else:
        body["stop"] = [SURROGATE]
    headers = {"Authorization": f"Bearer {API_KEY}", "Content-Type": "application/json"}
    for stream in (False, True):
        payload = json.dumps({**body, "stream": stream}, ensure_ascii=True)
        response = httpx.post(
            f"{fuzz_server}/v1/chat/completions", content=payload, headers=headers, timeout=30
        )
        assert response.status_code == 400, response.text
        assert "surrogate" in response.json()["error"]["message"]
