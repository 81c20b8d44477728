"""Teachers: the models that write the data. The only network client code in Corral.

- `OpenAICompatibleTeacher`: any OpenAI-compatible endpoint (OpenAI, vLLM, llama.cpp, Ollama,
  Corral's own server) through the official `openai` client, chat or completions API, with many
  requests in flight and its own retry policy: exponential backoff with jitter on 429, 5xx,
  timeouts, dropped connections and malformed replies, waiting at least what Retry-After says.
- `LocalTeacher`: a transformers causal LM (`embedded` by default) on the continuous-batching
  engine the server uses. Here stage 1 uses stage 3 (`inference.engine`), so that a local
  teacher generates as fast as `corral serve` would: a request that finishes early frees its
  row for the next prompt instead of waiting for its whole batch.

Both take a list of prompts and return one `Completion` (or a failure) per prompt, in order, and
keep running totals of requests, retries, tokens and cost in `TeacherStats`.
"""

from __future__ import annotations

import asyncio
import os
import random
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from corral.inference.params import SamplingParams as EngineParams

from corral.models import bf16_is_native, load_model, load_tokenizer, quiet_transformers


class TeacherError(RuntimeError):
    """The teacher cannot be used at all (bad key, unknown model, endpoint down): stop the run."""


_RESUME_HINT = (
    "What was kept is journaled: re-run the same command once the teacher works to resume"
)


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 1.0
    top_p: float = 1.0
    max_tokens: int = 1024
    stop: tuple[str, ...] = ()
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0


@dataclass
class Completion:
    text: str
    finish_reason: str  # "stop" or "length"
    prompt_tokens: int = 0
    completion_tokens: int = 0
    reasoning: str = ""  # what a reasoning server returned apart (`reasoning_content`)


@dataclass
class FailedRequest:
    """A request that still failed after every retry; the run goes on without it."""

    error: str


@dataclass
class TeacherStats:
    requests: int = 0  # HTTP requests or prompts generated, retries included
    completions: int = 0
    retries: int = 0
    failed_requests: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cost_usd: float = 0.0
    errors: dict[str, int] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, saved: dict[str, Any]) -> TeacherStats:
        known = {k: v for k, v in saved.items() if k in cls.__dataclass_fields__}
        return cls(**{k: dict(v) if isinstance(v, dict) else v for k, v in known.items()})


class _CountsUsage:
    """Running totals of a teacher's requests, tokens and cost."""

    stats: TeacherStats

    def reset_stats(self, saved: dict[str, Any] | None = None) -> None:
        """Start counting from `saved` (a resumed run's totals so far), or from zero."""
        self.stats = TeacherStats.from_dict(saved or {})


def backoff_delay(
    attempt: int,
    retry_after: float | None,
    *,
    base: float = 0.5,
    cap: float = 30.0,
    rng: random.Random | None = None,
) -> float:
    """Seconds to wait before retry number `attempt` (0-based).

    Exponential (base * 2^attempt, capped) with "equal jitter" (half fixed, half random) so that
    many clients throttled at once do not retry in lockstep; never less than the server's
    Retry-After.
    """
    rng = rng or random
    exponential = min(cap, base * (2**attempt))
    delay = exponential / 2 + rng.uniform(0, exponential / 2)
    if retry_after is not None and retry_after > 0:
        # The server said when; add a little jitter on top so throttled clients spread out.
        delay = max(delay, retry_after + rng.uniform(0, min(1.0, retry_after / 4)))
    return delay


def parse_retry_after(headers: Any) -> float | None:
    """Seconds from `retry-after-ms` or `retry-after` (seconds or an HTTP date)."""
    if headers is None:
        return None
    value = headers.get("retry-after-ms")
    if value is not None:
        try:
            return float(value) / 1000
        except ValueError:
            pass
    value = headers.get("retry-after")
    if value is None:
        return None
    try:
        return float(value)
    except ValueError:
        import email.utils

        parsed = email.utils.parsedate_tz(value)
        if parsed is None:
            return None
        return max(0.0, email.utils.mktime_tz(parsed) - time.time())


class OpenAICompatibleTeacher(_CountsUsage):
    """Any OpenAI-compatible endpoint, chat or completions API, `concurrency` requests at once."""

    def __init__(
        self,
        model: str,
        *,
        base_url: str | None = None,
        api: str = "chat",
        api_key_env: str = "OPENAI_API_KEY",
        concurrency: int = 8,
        max_retries: int = 6,
        timeout: float = 120.0,
        backoff_base: float = 0.5,
        backoff_cap: float = 30.0,
        price_per_1k_prompt_tokens: float = 0.0,
        price_per_1k_completion_tokens: float = 0.0,
        patience: float = 60.0,
        max_failures_in_a_row: int = 0,
    ) -> None:
        if api not in ("chat", "completions"):
            raise ValueError(f"api must be 'chat' or 'completions', got {api!r}")
        if concurrency < 1:
            raise ValueError("concurrency must be at least 1")
        api_key = os.environ.get(api_key_env)
        if not api_key:
            if base_url is None:
                raise TeacherError(
                    f"no API key: set ${api_key_env}, or give --base-url for a local server"
                )
            # Local servers (vLLM, llama.cpp, Ollama, Corral) accept any key; the client needs one.
            api_key = "not-needed"
        self.model = model
        self.base_url = base_url
        self.api = api
        self.api_key_env = api_key_env
        self.concurrency = concurrency
        self.max_retries = max_retries
        self.timeout = timeout
        self.backoff_base = backoff_base
        self.backoff_cap = backoff_cap
        self.price_per_1k_prompt_tokens = price_per_1k_prompt_tokens
        self.price_per_1k_completion_tokens = price_per_1k_completion_tokens
        self.patience = patience
        # Many requests in flight all meet a short outage at once: the count scales with them.
        self.max_failures_in_a_row = max_failures_in_a_row or max(16, 4 * concurrency)
        # Called with the error's name each time an attempt fails (a progress bar shows it).
        self.on_error: Any = None
        self.reset_stats()
        self._api_key = api_key
        self._rng = random.Random()
        # One event loop for the teacher's lifetime, so the client's connection pool is reused
        # from one batch to the next.
        self._loop = asyncio.new_event_loop()
        self._client = None
        # Requests that gave up on connection errors since the last success: a teacher that went
        # away stops the run instead of failing every remaining request one by one.
        self._unreachable_in_a_row = 0
        # A teacher that hangs or fails everything stops the run (`_check_alive`): attempts that
        # failed since the last answer (429s aside), and seconds spent waiting on requests since
        # the last answer, summed over calls (time between calls is the run's own work).
        self._failures_in_a_row = 0
        self._last_failure = ""
        self._stalled_before = 0.0
        self._stall_mark = 0.0

    def describe(self) -> dict[str, Any]:
        return {
            "kind": "openai-compatible",
            "model": self.model,
            "base_url": self.endpoint(),
            "api": self.api,
            "concurrency": self.concurrency,
        }

    def endpoint(self) -> str:
        return self.base_url or "https://api.openai.com/v1"

    def check_reachable(self) -> None:
        """One cheap request (the model list) before any paid work: fail fast with the URL."""
        self._loop.run_until_complete(self._check_reachable())

    async def _check_reachable(self) -> None:
        import openai

        client = self._get_client()
        try:
            await client.models.list(timeout=min(self.timeout, 15.0))
        except (openai.AuthenticationError, openai.PermissionDeniedError) as exc:
            raise TeacherError(f"the teacher endpoint refused the key: {_short(exc)}") from None
        except (openai.APIConnectionError, openai.APITimeoutError) as exc:
            raise TeacherError(
                f"cannot reach the teacher at {self.endpoint()}: {_short(exc)}; is the server "
                "running, and is --base-url right (it usually ends in /v1)?"
            ) from None
        except openai.APIStatusError:
            pass  # it answered: some servers have no model list, which is fine

    def _get_client(self):
        if self._client is None:
            import httpx2
            from openai import AsyncOpenAI

            limits = httpx2.Limits(
                max_connections=self.concurrency, max_keepalive_connections=self.concurrency
            )
            self._client = AsyncOpenAI(
                api_key=self._api_key,
                base_url=self.base_url,
                max_retries=0,  # retries are ours: counted, jittered, Retry-After honoured
                timeout=self.timeout,
                http_client=httpx2.AsyncClient(limits=limits, timeout=self.timeout),
            )
        return self._client

    def complete(
        self, prompts: Sequence[str], params: SamplingParams
    ) -> list[Completion | FailedRequest]:
        """One completion per prompt, in order, with up to `concurrency` requests in flight."""
        return self._loop.run_until_complete(self._complete_all(list(prompts), params))

    async def _complete_all(
        self, prompts: list[str], params: SamplingParams
    ) -> list[Completion | FailedRequest]:
        client = self._get_client()
        semaphore = asyncio.Semaphore(self.concurrency)

        async def one(prompt: str) -> Completion | FailedRequest:
            async with semaphore:
                return await self._request_with_retries(client, prompt, params)

        tasks = [asyncio.ensure_future(one(p)) for p in prompts]
        self._stall_mark = time.monotonic()
        watchdog = asyncio.ensure_future(
            self._watch() if self.patience > 0 else asyncio.Event().wait()
        )
        answers = asyncio.gather(*tasks)
        try:
            await asyncio.wait({answers, watchdog}, return_when=asyncio.FIRST_COMPLETED)
            if watchdog.done():
                watchdog.result()  # raises: the teacher stalled
            return list(await answers)
        except BaseException:
            # The run stops (a refused key, a teacher gone): the requests still out stop too.
            for task in tasks:
                task.cancel()
            answers.cancel()
            await asyncio.gather(answers, *tasks, return_exceptions=True)
            raise
        finally:
            watchdog.cancel()
            self._stalled_before += time.monotonic() - self._stall_mark

    async def _watch(self) -> None:
        """Raise once requests have been waited on for `patience` seconds without an answer."""
        while True:
            await asyncio.sleep(min(1.0, self.patience / 20))
            stalled = self._stalled_before + time.monotonic() - self._stall_mark
            if stalled >= self.patience:
                last = f" (last: {self._last_failure})" if self._last_failure else (
                    " (no request has come back)"
                )  # fmt: skip
                raise TeacherError(
                    f"the teacher at {self.endpoint()} gave no usable answer for {stalled:.0f} s"
                    f"{last}; stopping. {_RESUME_HINT}"
                )

    def _note_failure(self, error: str, detail: str) -> None:
        """Count a failed attempt; stop once the last `max_failures_in_a_row` all failed."""
        self.stats.errors[error] = self.stats.errors.get(error, 0) + 1
        self._last_failure = detail
        if self.on_error is not None:
            self.on_error(error)
        if error == "http_429":
            return  # told to slow down, not broken; a teacher that only says so stalls instead
        self._failures_in_a_row += 1
        if self._failures_in_a_row >= self.max_failures_in_a_row:
            raise TeacherError(
                f"the teacher at {self.endpoint()} failed the last {self._failures_in_a_row} "
                f"requests in a row (last: {detail}); stopping. {_RESUME_HINT}"
            )

    async def _request_with_retries(
        self, client: Any, prompt: str, params: SamplingParams
    ) -> Completion | FailedRequest:
        import openai

        attempt = 0
        while True:
            self.stats.requests += 1
            retry_after: float | None = None
            try:
                completion = await self._request(client, prompt, params)
            except (openai.AuthenticationError, openai.PermissionDeniedError) as exc:
                raise TeacherError(f"the teacher endpoint refused the key: {_short(exc)}") from None
            except openai.NotFoundError as exc:
                raise TeacherError(
                    f"the teacher endpoint has no model {self.model!r} or no {self.api} API: "
                    f"{_short(exc)}"
                ) from None
            except openai.APIStatusError as exc:
                status = exc.status_code
                if status != 429 and status < 500 and status != 408:
                    raise TeacherError(
                        f"the teacher endpoint rejected a request: {_short(exc)}"
                    ) from None
                retry_after = parse_retry_after(exc.response.headers)
                error, detail = f"http_{status}", f"HTTP {status}: {_short(exc)}"
            except openai.APITimeoutError:
                error, detail = "timeout", f"no answer within {self.timeout:g} s"
            except openai.APIConnectionError as exc:
                error, detail = "connection", f"connection failed: {_short(exc)}"
            except (
                openai.APIResponseValidationError,
                ValueError,
                TypeError,
                AttributeError,
                KeyError,
                IndexError,
            ):
                error, detail = "malformed_reply", "a reply that is not a completion"
            else:
                self._unreachable_in_a_row = 0
                self._failures_in_a_row = 0
                self._stalled_before = 0.0
                self._stall_mark = time.monotonic()
                self.stats.completions += 1
                self.stats.prompt_tokens += completion.prompt_tokens
                self.stats.completion_tokens += completion.completion_tokens
                self.stats.cost_usd += (
                    completion.prompt_tokens * self.price_per_1k_prompt_tokens
                    + completion.completion_tokens * self.price_per_1k_completion_tokens
                ) / 1000
                return completion
            self._note_failure(error, detail)
            if attempt >= self.max_retries:
                self.stats.failed_requests += 1
                self._give_up_if_gone(error)
                return FailedRequest(f"{error} after {attempt + 1} attempts")
            self.stats.retries += 1
            await asyncio.sleep(
                backoff_delay(
                    attempt,
                    retry_after,
                    base=self.backoff_base,
                    cap=self.backoff_cap,
                    rng=self._rng,
                )
            )
            attempt += 1

    def _give_up_if_gone(self, error: str) -> None:
        if error not in ("connection", "timeout"):
            return
        self._unreachable_in_a_row += 1
        if self._unreachable_in_a_row >= max(3, self.concurrency):
            raise TeacherError(
                f"lost the teacher at {self.endpoint()}: {self._unreachable_in_a_row} requests in a "
                f"row failed ({error}) after {self.max_retries} retries each. {_RESUME_HINT}"
            )

    async def _request(self, client: Any, prompt: str, params: SamplingParams) -> Completion:
        import httpx2

        # The client's generic `post` (its documented way to send a plain JSON body) keeps its auth,
        # timeouts and typed status errors but skips building typed request and response models,
        # which costs more CPU than the HTTP round trip itself at hundreds of requests per second.
        response = await client.post(
            "/chat/completions" if self.api == "chat" else "/completions",
            cast_to=httpx2.Response,
            body=self._request_body(prompt, params),
        )
        return self._completion_from(response.json())

    def _request_body(self, prompt: str, params: SamplingParams) -> dict[str, Any]:
        body: dict[str, Any] = {
            "model": self.model,
            "temperature": params.temperature,
            "top_p": params.top_p,
            "max_tokens": params.max_tokens,
        }
        # OpenAI accepts at most 4 stop sequences.
        if params.stop:
            body["stop"] = list(params.stop)[:4]
        if params.presence_penalty:
            body["presence_penalty"] = params.presence_penalty
        if params.frequency_penalty:
            body["frequency_penalty"] = params.frequency_penalty
        if self.api == "completions":
            body["prompt"] = prompt
        else:
            body["messages"] = [{"role": "user", "content": prompt}]
        return body

    def _completion_from(self, data: dict[str, Any]) -> Completion:
        """A reply's text, finish reason and usage; malformed replies raise ValueError & co."""
        choice = data["choices"][0]
        text = choice["text"] if self.api == "completions" else choice["message"]["content"]
        if not isinstance(text, str):
            raise ValueError("reply holds no text")
        usage = data.get("usage") or {}
        return Completion(
            text=text,
            finish_reason="length" if choice.get("finish_reason") == "length" else "stop",
            prompt_tokens=int(usage.get("prompt_tokens") or 0),
            completion_tokens=int(usage.get("completion_tokens") or 0),
            reasoning=_reasoning_content(choice),
        )

    def close(self) -> None:
        if self._client is not None:
            self._loop.run_until_complete(self._client.close())
            self._client = None
        self._loop.close()


class OpenAIBatchTeacher(OpenAICompatibleTeacher):
    """The same chat requests through OpenAI's Batch API: half the price, answers within the
    completion window instead of at once.

    Each `complete` call is one batch: its requests go up as a JSONL file (`/v1/files`), the batch
    is created (`/v1/batches`), and its id is handed to `on_submit` to be journaled *before* the
    wait starts, keyed by a hash of the requests. A run killed while waiting is resumed with
    `submitted` holding those ids: the same round's requests hash to the same key, and the batch
    already paid for is polled instead of sent again. Requests a batch did not finish (an expired
    batch, failed lines) come back as failures, like requests that failed every retry.
    """

    def __init__(self, model: str, *, poll_seconds: float = 30.0, **kwargs: Any) -> None:
        super().__init__(model, api="chat", **kwargs)
        self.poll_seconds = poll_seconds
        self.submitted: dict[str, str] = {}
        self.on_submit: Any = lambda key, batch_id: None
        self.log: Any = lambda text: None
        self._sync_client = None

    def resume_batches(self, submitted: dict[str, str], on_submit: Any, log: Any) -> None:
        """Continue a run: the batches its journal holds, and where to journal new ones."""
        self.submitted = dict(submitted)
        self.on_submit = on_submit
        self.log = log

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "api": "batch"}

    def check_reachable(self) -> None:
        import openai

        try:
            self._client_sync().models.list(timeout=min(self.timeout, 15.0))
        except (openai.AuthenticationError, openai.PermissionDeniedError) as exc:
            raise TeacherError(f"the teacher endpoint refused the key: {_short(exc)}") from None
        except (openai.APIConnectionError, openai.APITimeoutError) as exc:
            raise TeacherError(
                f"cannot reach the teacher at {self.endpoint()}: {_short(exc)}"
            ) from None
        except openai.APIStatusError:
            pass

    def _client_sync(self) -> Any:
        if self._sync_client is None:
            from openai import OpenAI

            # The SDK's own retries for the few control calls (upload, create, poll, download).
            self._sync_client = OpenAI(
                api_key=self._api_key,
                base_url=self.base_url,
                timeout=self.timeout,
                max_retries=self.max_retries,
            )
        return self._sync_client

    def complete(
        self, prompts: Sequence[str], params: SamplingParams
    ) -> list[Completion | FailedRequest]:
        import hashlib
        import json

        bodies = [self._request_body(p, params) for p in prompts]
        lines = [
            {"custom_id": f"request-{i}", "method": "POST", "url": "/v1/chat/completions",
             "body": body}
            for i, body in enumerate(bodies)
        ]  # fmt: skip
        payload = "".join(json.dumps(line, ensure_ascii=False) + "\n" for line in lines).encode()
        key = hashlib.sha256(payload).hexdigest()[:32]
        client = self._client_sync()
        batch_id = self.submitted.get(key)
        if batch_id is None:
            uploaded = client.files.create(file=("requests.jsonl", payload), purpose="batch")
            batch = client.batches.create(
                input_file_id=uploaded.id,
                endpoint="/v1/chat/completions",
                completion_window="24h",
            )
            batch_id = batch.id
            self.submitted[key] = batch_id
            self.on_submit(key, batch_id)
            self.log(f"batch {batch_id}: {len(prompts)} requests submitted")
        else:
            self.log(f"batch {batch_id}: resuming the wait for its {len(prompts)} requests")
        batch = self._wait(batch_id)
        self.stats.requests += len(prompts)
        return self._results(batch, len(prompts))

    def _wait(self, batch_id: str) -> Any:
        client = self._client_sync()
        while True:
            batch = client.batches.retrieve(batch_id)
            if batch.status in ("completed", "expired", "cancelled"):
                return batch
            if batch.status == "failed":
                errors = getattr(batch.errors, "data", None) or []
                detail = "; ".join(f"{e.code}: {e.message}" for e in errors[:3]) or "no detail"
                raise TeacherError(f"batch {batch_id} failed validation: {detail}")
            time.sleep(self.poll_seconds)

    def _results(self, batch: Any, count: int) -> list[Completion | FailedRequest]:
        results: list[Completion | FailedRequest] = [
            FailedRequest(f"batch {batch.status}: no answer") for _ in range(count)
        ]
        for file_id in (batch.output_file_id, batch.error_file_id):
            if not file_id:
                continue
            for index, line in self._batch_lines(batch.id, file_id, count):
                response = line.get("response")
                response = response if isinstance(response, dict) else {}
                if response.get("status_code") == 200:
                    try:
                        results[index] = self._completion_from(response["body"])
                    except (KeyError, TypeError, ValueError, IndexError, AttributeError):
                        results[index] = FailedRequest("malformed_reply")
                    continue
                body = response.get("body")
                error = line.get("error") or (body.get("error") if isinstance(body, dict) else None)
                error = error if isinstance(error, dict) else {}
                results[index] = FailedRequest(
                    f"{error.get('code') or response.get('status_code')}: "
                    f"{error.get('message', '')}"
                )
        for result in results:
            if isinstance(result, Completion):
                self.stats.completions += 1
                self.stats.prompt_tokens += result.prompt_tokens
                self.stats.completion_tokens += result.completion_tokens
                self.stats.cost_usd += (
                    result.prompt_tokens * self.price_per_1k_prompt_tokens
                    + result.completion_tokens * self.price_per_1k_completion_tokens
                ) / 1000
            else:
                self.stats.failed_requests += 1
                kind = result.error.split(":", 1)[0]
                self.stats.errors[kind] = self.stats.errors.get(kind, 0) + 1
        return results

    def _batch_lines(self, batch_id: str, file_id: str, count: int) -> Iterator[tuple[int, dict]]:
        """(request index, line) for each readable line of a batch's result file. A line that is
        not a JSON object or names no request of this batch is reported in one line and skipped
        (its request counts as failed); every other answer, already paid for, is kept."""
        import json

        text = self._client_sync().files.content(file_id).text
        for number, raw in enumerate(text.splitlines(), start=1):
            if not raw.strip():
                continue
            problem = None
            try:
                line = json.loads(raw)
            except json.JSONDecodeError as exc:
                problem = f"not valid JSON ({exc.msg})"
            else:
                if not isinstance(line, dict):
                    problem = f"expected a JSON object, got {type(line).__name__}"
                else:
                    custom_id = line.get("custom_id")
                    index = _request_index(custom_id, count)
                    if index is None:
                        problem = (
                            f"custom_id {custom_id!r} names no request of this batch "
                            f"(request-0 .. request-{count - 1})"
                        )
            if problem is not None:
                self.log(
                    f"batch {batch_id}: result file {file_id} line {number}: {problem}; "
                    "skipped (its request counts as failed)"
                )
                continue
            yield index, line

    def close(self) -> None:
        if self._sync_client is not None:
            self._sync_client.close()
            self._sync_client = None
        super().close()


def _request_index(custom_id: Any, count: int) -> int | None:
    """The request a batch result line answers (`request-<i>`, 0 <= i < count), or None."""
    if not isinstance(custom_id, str) or not custom_id.startswith("request-"):
        return None
    digits = custom_id.removeprefix("request-")
    if not digits.isascii() or not digits.isdigit():
        return None
    index = int(digits)
    return index if index < count else None


def _short(exc: Exception) -> str:
    text = " ".join(str(exc).split())
    return text if len(text) <= 200 else text[:197] + "..."


def _reasoning_content(choice: dict[str, Any]) -> str:
    """A chat reply's separate reasoning (vLLM and DeepSeek: `reasoning_content`; some servers
    call it `reasoning`), or ""."""
    message = choice.get("message") or {}
    value = message.get("reasoning_content") or message.get("reasoning") or ""
    return value if isinstance(value, str) else ""


def local_dtype(name: str) -> Any:
    """The weights' dtype for a local model: `auto` is bf16 where the hardware multiplies bf16
    natively (a capable GPU, or a CPU with AVX512-BF16/AMX), float32 elsewhere."""
    import torch

    if name == "auto":
        return torch.bfloat16 if bf16_is_native() else torch.float32
    if name not in ("float32", "bfloat16"):
        raise ValueError(f"dtype must be auto, float32 or bfloat16, got {name!r}")
    return getattr(torch, name)


class LocalTeacher(_CountsUsage):
    """A transformers causal LM on this machine; up to `batch_size` prompts generate together."""

    def __init__(
        self,
        model: str = "embedded",
        *,
        api: str = "chat",
        batch_size: int = 4,
        repetition_penalty: float = 1.0,
        seed: int = 0,
        dtype: str = "float32",
    ) -> None:
        from corral.inference.engine import GenerationEngine

        if api not in ("chat", "completions"):
            raise ValueError(f"api must be 'chat' or 'completions', got {api!r}")
        with quiet_transformers():
            self.tokenizer = load_tokenizer(model)
            self.model = load_model(model, dtype=local_dtype(dtype), tokenizer=self.tokenizer)
        self.model.eval()
        # The teacher owns its model, so the engine may pack its weights (faster on a CPU).
        self.engine = GenerationEngine(
            self.model, self.tokenizer, max_batch_size=max(1, batch_size), pack_weights=True
        )
        if api == "chat" and not getattr(self.tokenizer, "chat_template", None):
            api = "completions"  # a base model: give it the raw prompt to continue
        self.model_name = model
        self.api = api
        self.batch_size = max(1, batch_size)
        self.repetition_penalty = repetition_penalty
        self.seed = seed
        self.reset_stats()

    def describe(self) -> dict[str, Any]:
        return {
            "kind": "local",
            "model": self.model_name,
            "api": self.api,
            "batch_size": self.batch_size,
        }

    def _render(self, prompt: str) -> str:
        if self.api == "chat":
            return self.tokenizer.apply_chat_template(
                [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
            )
        return prompt

    def complete(
        self, prompts: Sequence[str], params: SamplingParams
    ) -> list[Completion | FailedRequest]:
        encoded = [
            self.tokenizer(self._render(p), add_special_tokens=False)["input_ids"] for p in prompts
        ]
        eos = self.tokenizer.eos_token_id
        room = self.engine.context_length
        # A seed per request keeps runs reproducible without correlating successive prompts.
        first_seed = self.seed + self.stats.requests
        per_prompt = [
            EngineParams(
                # Within the model's context, as an endpoint would cut the answer short.
                max_new_tokens=max(1, min(params.max_tokens, room - len(ids))),
                temperature=params.temperature,
                top_p=params.top_p if params.temperature > 0 else 1.0,
                stop=tuple(params.stop),
                stop_token_ids=() if eos is None else (eos,),
                seed=first_seed + i,
                repetition_penalty=self.repetition_penalty,
            )
            for i, ids in enumerate(encoded)
        ]
        generated = self.engine.generate(encoded, per_prompt)
        completions: list[Completion | FailedRequest] = []
        for ids, result in zip(encoded, generated, strict=True):
            # The engine cuts at the first stop string and drops special tokens, as an endpoint.
            finish = "length" if result.finish_reason == "length" else "stop"
            completions.append(Completion(result.text, finish, len(ids), result.completion_tokens))
            self.stats.prompt_tokens += len(ids)
            self.stats.completion_tokens += result.completion_tokens
        self.stats.requests += len(prompts)
        self.stats.completions += len(prompts)
        return completions

    def close(self) -> None:
        pass
