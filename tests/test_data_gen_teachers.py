"""The OpenAI-compatible teacher over real HTTP on 127.0.0.1: retries, Retry-After, usage, cost."""

from __future__ import annotations

import random
import threading
import time

import pytest
from corral.data_gen.teachers import (
    Completion,
    FailedRequest,
    OpenAICompatibleTeacher,
    SamplingParams,
    TeacherError,
    backoff_delay,
    parse_retry_after,
)
from openai_test_server import OpenAITestServer


def echo(prompt: str, request: dict) -> str:
    return f"echo: {prompt}"


def make_teacher(server: OpenAITestServer, **kwargs) -> OpenAICompatibleTeacher:
    kwargs.setdefault("backoff_base", 0.02)
    kwargs.setdefault("timeout", 2.0)
    return OpenAICompatibleTeacher("canned-teacher", base_url=server.base_url, **kwargs)


@pytest.mark.parametrize("api", ["chat", "completions"])
def test_replies_come_back_in_order_with_usage_and_cost(api):
    with OpenAITestServer(echo, latency=0.01) as server:
        teacher = make_teacher(
            server,
            api=api,
            concurrency=4,
            price_per_1k_prompt_tokens=1.0,
            price_per_1k_completion_tokens=2.0,
        )
        try:
            prompts = [f"prompt number {i}" for i in range(10)]
            results = teacher.complete(prompts, SamplingParams(max_tokens=50))
        finally:
            teacher.close()
    assert [r.text for r in results] == [f"echo: {p}" for p in prompts]
    assert all(isinstance(r, Completion) and r.finish_reason == "stop" for r in results)
    stats = teacher.stats
    assert stats.requests == stats.completions == 10 and stats.retries == 0
    assert stats.prompt_tokens == 30 and stats.completion_tokens == 40
    assert stats.cost_usd == pytest.approx((30 * 1.0 + 40 * 2.0) / 1000)


def test_every_fault_is_retried_until_success():
    faults = ["429", "500", "503", "malformed", "drop", "slow"]
    with OpenAITestServer(echo, faults=faults, retry_after=0.05, slow_seconds=1.5) as server:
        teacher = make_teacher(server, concurrency=1, timeout=0.5, max_retries=8)
        try:
            [result] = teacher.complete(["hello"], SamplingParams())
        finally:
            teacher.close()
    assert isinstance(result, Completion) and result.text == "echo: hello"
    assert teacher.stats.retries == len(faults)
    assert teacher.stats.errors == {
        "http_429": 1,
        "http_500": 1,
        "http_503": 1,
        "malformed_reply": 1,
        "connection": 1,
        "timeout": 1,
    }


def test_retry_after_is_honoured():
    with OpenAITestServer(echo, faults=["429"], retry_after=0.6) as server:
        teacher = make_teacher(server, concurrency=1, backoff_base=0.001)
        try:
            started = time.monotonic()
            [result] = teacher.complete(["x"], SamplingParams())
            waited = time.monotonic() - started
        finally:
            teacher.close()
    assert isinstance(result, Completion)
    # Backoff alone would wait about a millisecond; the server asked for 0.6 s. A lower bound
    # only: a busy machine makes the wait longer, never shorter, so this cannot flake.
    assert waited >= 0.6
    assert server.stats["429"] == 1 and teacher.stats.retries == 1


def test_a_request_that_keeps_failing_is_reported_not_raised():
    with OpenAITestServer(echo, faults=["500"] * 3) as server:
        # One at a time: "a" meets all three errors and gives up, then "b" succeeds.
        teacher = make_teacher(server, concurrency=1, max_retries=2)
        try:
            results = teacher.complete(["a", "b"], SamplingParams())
        finally:
            teacher.close()
    assert isinstance(results[0], FailedRequest) and isinstance(results[1], Completion)
    assert "http_500 after 3 attempts" in results[0].error
    assert teacher.stats.failed_requests == 1


def test_a_refused_key_stops_the_run_at_once():
    with OpenAITestServer(echo, faults=["401"]) as server:
        teacher = make_teacher(server)
        try:
            with pytest.raises(TeacherError, match="refused the key"):
                teacher.complete(["a"], SamplingParams())
        finally:
            teacher.close()
    assert server.stats["requests"] == 1  # not retried


def test_no_key_and_no_endpoint_is_a_clear_error(monkeypatch):
    monkeypatch.delenv("CORRAL_TEST_MISSING_KEY", raising=False)
    with pytest.raises(TeacherError, match="CORRAL_TEST_MISSING_KEY"):
        OpenAICompatibleTeacher("gpt-x", api_key_env="CORRAL_TEST_MISSING_KEY")


class InFlight:
    """A responder that counts the requests the server holds at once. Each waits (on an event, not
    a clock) until `target` are in flight together, so the count shows the client's concurrency
    however slowly a busy machine delivers them; after that every request answers at once."""

    def __init__(self, target: int, patience: float = 60.0) -> None:
        self.target = target
        self.patience = patience
        self.now = self.most = 0
        self.reached = threading.Event()
        self._lock = threading.Lock()

    def __call__(self, prompt: str, request: dict) -> str:
        with self._lock:
            self.now += 1
            self.most = max(self.most, self.now)
            if self.now >= self.target:
                self.reached.set()
        try:
            self.reached.wait(self.patience)  # a client that never gets there fails below
            return echo(prompt, request)
        finally:
            with self._lock:
                self.now -= 1


def test_concurrency_keeps_many_requests_in_flight():
    in_flight = InFlight(target=16)
    with OpenAITestServer(in_flight) as server:
        teacher = make_teacher(server, concurrency=16, timeout=120.0)
        try:
            results = teacher.complete([str(i) for i in range(32)], SamplingParams())
        finally:
            teacher.close()
    assert [r.text for r in results] == [f"echo: {i}" for i in range(32)]
    # 16 requests were in flight together, and never more than the configured concurrency.
    assert in_flight.reached.is_set() and in_flight.most == 16
    assert teacher.stats.requests == 32 and teacher.stats.retries == 0


def test_backoff_grows_exponentially_with_jitter_and_respects_retry_after():
    rng = random.Random(0)
    delays = [backoff_delay(a, None, base=1.0, cap=100.0, rng=rng) for a in range(5)]
    for attempt, delay in enumerate(delays):
        assert 2**attempt / 2 <= delay <= 2**attempt
    assert len({round(d, 6) for d in (backoff_delay(3, None, rng=rng) for _ in range(20))}) > 10
    assert backoff_delay(6, None, base=1.0, cap=8.0, rng=rng) <= 8.0
    assert backoff_delay(0, 5.0, base=0.1, rng=rng) >= 5.0


def test_parse_retry_after_forms():
    assert parse_retry_after({"retry-after": "3"}) == 3.0
    assert parse_retry_after({"retry-after-ms": "250"}) == 0.25
    assert parse_retry_after({}) is None
    assert parse_retry_after({"retry-after": "soon"}) is None
