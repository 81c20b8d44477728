"""An OpenAI-compatible HTTP server over the batching engine (FastAPI + uvicorn).

Endpoints: `GET /v1/models`, `POST /v1/chat/completions`, `POST /v1/completions` (both with
`stream`, as server-sent events ending in `data: [DONE]`), `GET /health`, and a chat page at `/`.
Both take vLLM's `return_token_ids` (not streamed): the reply carries the prompt's token ids as
the model received them (`prompt_token_ids`) and the generated ids (`token_ids`). Errors use
OpenAI's shape, `{"error": {"message", "type", "param", "code"}}`, with 4xx for bad
requests. Requests in flight share forward passes through the engine; a client that disconnects
has its generation cancelled at the next step.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import time
import uuid
from collections.abc import AsyncIterator, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any, Literal

import torch
from corral.inference.engine import GenerationEngine, GenerationEvent, GenerationResult
from corral.inference.loading import LoadedModel
from corral.inference.params import MAX_LOGPROBS, SamplingParams
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, field_validator
from starlette.exceptions import HTTPException as StarletteHTTPException

from corral.served_tokens import served_prompt_ids

WEB_PAGE = Path(__file__).parent / "web" / "index.html"
MAX_STOP_SEQUENCES = 16
DISCONNECT_POLL_SECONDS = 0.25


class APIError(Exception):
    """An error to send in OpenAI's shape."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = (
            status,
            message,
            type,
            param,
            code,
        )

    def response(self) -> JSONResponse:
        return error_response(
            self.status, self.message, type=self.type, param=self.param, code=self.code
        )


def error_response(
    status: int,
    message: str,
    *,
    type: str = "invalid_request_error",
    param: str | None = None,
    code: str | None = None,
) -> JSONResponse:
    body = {"error": {"message": message, "type": type, "param": param, "code": code}}
    return JSONResponse(body, status_code=status)


# ---------------------------------------------------------------------------- request schemas


def _lone_surrogate(value: Any) -> bool:
    """Whether `value` holds a string with a lone UTF-16 surrogate anywhere inside it.

    JSON may spell one ("\\ud800"), Python's json module accepts it, but it is not text: the
    tokenizer and the UTF-8 response writer both fail on it, so it is refused up front.
    """
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            return True
        return False
    if isinstance(value, BaseModel):
        return _lone_surrogate(value.__dict__) or _lone_surrogate(value.__pydantic_extra__ or {})
    if isinstance(value, dict):
        return any(_lone_surrogate(k) or _lone_surrogate(v) for k, v in value.items())
    if isinstance(value, list | tuple):
        return any(_lone_surrogate(item) for item in value)
    return False


# Fields of OpenAI's API this server does not honour, each with its values that change nothing.
UNHONOURED_FIELDS: dict[str, Any] = {
    "tools": lambda v: v == [],
    "tool_choice": lambda v: v == "none",
    "functions": lambda v: v == [],
    "function_call": lambda v: v == "none",
    "response_format": lambda v: v == {"type": "text"},
    "best_of": lambda v: v == 1,
    "suffix": lambda v: v == "",
}


class _Request(BaseModel):
    # Clients send fields this server does not use (user, logprobs=None, ...); accept and ignore.
    model_config = ConfigDict(extra="allow")

    @field_validator("*")
    @classmethod
    def _check_text(cls, value: Any) -> Any:
        if _lone_surrogate(value):
            raise ValueError("contains a lone surrogate (\\ud800-\\udfff), which is not valid text")
        return value

    model: str
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0.0, le=2.0)
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    top_k: int | None = Field(default=None, ge=0)
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: dict[str, Any] | None = None
    # torch's generators take seeds in this range; larger ones are a client error, not a 500.
    seed: int | None = Field(default=None, ge=-(2**63), lt=2**64)
    n: int = Field(default=1, ge=1, le=1)
    logit_bias: dict[str, float] | None = None
    presence_penalty: float | None = Field(default=None, ge=-2.0, le=2.0)
    frequency_penalty: float | None = Field(default=None, ge=-2.0, le=2.0)
    # vLLM's extension: the prompt's token ids as the model received them, and the generated ids
    # (so a client can check that a served prompt is the one a run was trained on).
    return_token_ids: bool = False

    def check_token_ids(self) -> None:
        if self.return_token_ids and self.stream:
            raise APIError(
                400, "return_token_ids is available without streaming", param="return_token_ids"
            )

    @field_validator("stop")
    @classmethod
    def _check_stop(cls, value: str | list[str] | None) -> str | list[str] | None:
        if isinstance(value, list) and len(value) > MAX_STOP_SEQUENCES:
            raise ValueError(f"at most {MAX_STOP_SEQUENCES} stop sequences")
        return value

    def stop_list(self) -> tuple[str, ...]:
        if self.stop is None:
            return ()
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)

    def refuse_unhonoured(self) -> None:
        """Answer 400 naming a field that would change the answer but that this server does not
        honour (rather than answering as if it had); their neutral values pass."""
        extra = self.__pydantic_extra__ or {}
        for name, neutral in UNHONOURED_FIELDS.items():
            value = extra.get(name)
            if value is not None and not neutral(value):
                raise APIError(400, f"'{name}' is not supported by this server", param=name)


class ContentPart(BaseModel):
    model_config = ConfigDict(extra="allow")
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[ContentPart]

    def text(self) -> str:
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)


class ChatCompletionRequest(_Request):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(default=None, ge=0, le=MAX_LOGPROBS)


# One prompt of /v1/completions: text, or token ids (what lm-evaluation-harness sends).
PromptItem = str | list[int]


class CompletionRequest(_Request):
    prompt: str | list[str] | list[int] | list[list[int]]
    # OpenAI's legacy shape: up to this many alternatives per token (0: the chosen token only).
    logprobs: int | None = Field(default=None, ge=0, le=MAX_LOGPROBS)
    echo: bool = False
    max_tokens: int | None = Field(default=None, ge=0)  # 0 only with echo: score the prompt

    @field_validator("prompt")
    @classmethod
    def _check_prompt(cls, value: Any) -> Any:
        if isinstance(value, list) and not value:
            raise ValueError("prompt must not be an empty list")
        if isinstance(value, list) and any(isinstance(item, list) and not item for item in value):
            raise ValueError("a token-id prompt must not be empty")
        return value

    def prompts(self) -> list[PromptItem]:
        """The prompts as a list: strings, or token-id lists."""
        if isinstance(self.prompt, str):
            return [self.prompt]
        if all(isinstance(item, int) for item in self.prompt):
            return [list(self.prompt)]  # one prompt given as token ids
        return list(self.prompt)


# ---------------------------------------------------------------------------- the app


class BodySizeLimit:
    """Reject request bodies over `limit` bytes with 413 before they reach the app.

    A declared Content-Length is checked up front; a chunked body is read here up to the limit and
    then replayed to the app, so an endless upload cannot fill the server's memory.
    """

    def __init__(self, app: Any, limit: int) -> None:
        self.app, self.limit = app, limit

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None:
            if declared.isdigit() and int(declared) > self.limit:
                await self._reject(scope, receive, send)
                return
            await self.app(scope, receive, send)
            return
        buffered: list[dict] = []
        size = 0
        while True:
            message = await receive()
            buffered.append(message)
            if message["type"] != "http.request":
                break
            size += len(message.get("body", b""))
            if size > self.limit:
                await self._reject(scope, receive, send)
                return
            if not message.get("more_body"):
                break

        async def replay() -> dict:
            return buffered.pop(0) if buffered else await receive()

        await self.app(scope, replay, send)

    async def _reject(self, scope: dict, receive: Any, send: Any) -> None:
        response = error_response(
            413, f"request body is larger than {self.limit} bytes", code="request_too_large"
        )
        await response(scope, receive, send)


class OpenAIServer:
    """The state behind the routes: the loaded model, its engine and the serving settings."""

    def __init__(
        self,
        loaded: LoadedModel,
        engine: GenerationEngine,
        *,
        model_name: str,
        api_key: str | None = None,
        default_max_tokens: int = 256,
        max_prompts_per_request: int = 2048,
    ) -> None:
        self.loaded = loaded
        self.engine = engine
        self.model_name = model_name
        self.api_key = api_key or None
        self.default_max_tokens = default_max_tokens
        self.max_prompts_per_request = max_prompts_per_request
        self.created = int(time.time())

    # -- checks shared by the endpoints

    def check_api_key(self, request: Request) -> None:
        if self.api_key is None:
            return
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        # Compared as bytes: compare_digest refuses non-ASCII str, and a header may hold any byte
        # (the server decodes headers as latin-1, so this gives back the bytes that were sent).
        sent = token.strip().encode("latin-1", "replace")
        if scheme.lower() != "bearer" or not hmac.compare_digest(sent, self.api_key.encode()):
            raise APIError(
                401,
                "invalid or missing API key (send Authorization: Bearer KEY)",
                code="invalid_api_key",
            )

    def check_model(self, name: str) -> None:
        if name != self.model_name:
            raise APIError(
                404,
                f"the model '{name}' does not exist; this server serves '{self.model_name}'",
                param="model",
                code="model_not_found",
            )

    def sampling_params(
        self,
        body: _Request,
        prompt_tokens: int,
        *,
        max_tokens: int | None,
        default_max_tokens: int,
        templated: bool,
        logprobs: int | None = None,
        prompt_logprobs: int | None = None,
    ) -> SamplingParams:
        room = self.engine.context_length - prompt_tokens
        if room < 1:
            raise APIError(
                400,
                f"the prompt is {prompt_tokens} tokens; the context length is {self.engine.context_length}",
                param="messages",
                code="context_length_exceeded",
            )
        if max_tokens is None:
            max_tokens = min(default_max_tokens, room)
        elif max_tokens > room:
            raise APIError(
                400,
                f"max_tokens is {max_tokens} but the prompt is {prompt_tokens} tokens and the context "
                f"length is {self.engine.context_length}: at most {room} tokens can be generated",
                param="max_tokens",
                code="context_length_exceeded",
            )
        logit_bias: dict[int, float] = {}
        for key, bias in (body.logit_bias or {}).items():
            if not key.lstrip("-").isdigit():
                raise APIError(
                    400, f"logit_bias keys must be token ids, got {key!r}", param="logit_bias"
                )
            logit_bias[int(key)] = max(-100.0, min(100.0, float(bias)))
        stop_ids = {self.loaded.tokenizer.eos_token_id}
        stop = body.stop_list()
        if templated:
            stop_ids.update(self.loaded.stop_token_ids())
            stop = stop + self.loaded.stop_strings()
        return SamplingParams(
            max_new_tokens=max_tokens,
            temperature=1.0 if body.temperature is None else body.temperature,
            top_p=1.0 if body.top_p is None else body.top_p,
            top_k=body.top_k or 0,
            stop=stop,
            stop_token_ids=tuple(sorted(i for i in stop_ids if i is not None)),
            seed=body.seed,
            logit_bias=logit_bias,
            presence_penalty=body.presence_penalty or 0.0,
            frequency_penalty=body.frequency_penalty or 0.0,
            logprobs=logprobs,
            prompt_logprobs=prompt_logprobs,
        )

    @property
    def stop_ids(self) -> set[int]:
        """Tokens that end an answer: EOS and the template's own end-of-turn tokens."""
        ids = set(self.loaded.stop_token_ids())
        if self.loaded.tokenizer.eos_token_id is not None:
            ids.add(self.loaded.tokenizer.eos_token_id)
        return ids

    # -- running requests on the engine

    async def run(
        self, request: Request, prompts: Sequence[list[int]], params: Sequence[SamplingParams]
    ) -> AsyncIterator[tuple[int, GenerationEvent]]:
        """Submit prompts (each with its own settings) and yield (prompt index, event) until each
        has its result.

        Polls for a client disconnect while waiting, and cancels whatever is still generating when
        the consumer stops early (disconnect, error, or a cancelled streaming response).
        """
        loop = asyncio.get_running_loop()
        events: asyncio.Queue[tuple[int, GenerationEvent]] = asyncio.Queue()
        handles = []
        try:
            for index, (prompt, prompt_params) in enumerate(zip(prompts, params, strict=True)):

                def sink(event: GenerationEvent, index: int = index) -> None:
                    loop.call_soon_threadsafe(events.put_nowait, (index, event))

                handles.append(self.engine.submit(prompt, prompt_params, sink))
            remaining = len(prompts)
            next_check = loop.time() + DISCONNECT_POLL_SECONDS
            while remaining:
                # Check for a vanished client on a clock, not only when no token arrives: tokens
                # of a busy batch can arrive faster than any poll timeout.
                if loop.time() >= next_check:
                    if await request.is_disconnected():
                        return
                    next_check = loop.time() + DISCONNECT_POLL_SECONDS
                try:
                    index, event = await asyncio.wait_for(events.get(), DISCONNECT_POLL_SECONDS)
                except TimeoutError:
                    continue
                if event.result is not None:
                    remaining -= 1
                yield index, event
        finally:
            for handle in handles:
                handle.cancel()

    def encode_messages(self, messages: list[ChatMessage]) -> list[int]:
        conversation = [
            {"role": "system" if m.role == "developer" else m.role, "content": m.text()}
            for m in messages
        ]
        try:
            # The one encoding of a conversation that training builds its examples from.
            return served_prompt_ids(self.loaded.tokenizer, self.loaded.template, conversation)
        except ValueError as exc:
            raise APIError(400, str(exc), param="messages") from None

    def encode_raw(self, prompt: PromptItem, index: int) -> list[int]:
        """A completions prompt as token ids: text is tokenized, ids are checked."""
        if isinstance(prompt, list):
            vocabulary = self.loaded.model.get_input_embeddings().num_embeddings
            bad = next((t for t in prompt if not 0 <= t < vocabulary), None)
            if bad is not None:
                raise APIError(
                    400,
                    f"prompt {index}: token id {bad} is outside the vocabulary (0..{vocabulary - 1})",
                    param="prompt",
                )
            return list(prompt)
        ids = self.loaded.tokenizer(prompt)["input_ids"]
        if not ids:
            raise APIError(400, f"prompt {index} is empty", param="prompt")
        return ids

    def token_text(self, token: int) -> str:
        return self.loaded.decode_keeping_special([token])


def _legacy_logprobs(
    server: OpenAIServer, prompt: list[int], result: GenerationResult, echo: bool, keep: int
) -> dict[str, Any]:
    """OpenAI's legacy completions `logprobs`: tokens, token_logprobs, top_logprobs, text_offset.

    With echo the prompt's tokens come first, the first one with null (nothing precedes it).
    Every generated token is listed, a final stop token (EOS) included: clients that score a
    continuation read the prompt's entries and drop exactly one generated entry after them.
    """
    ids: list[int] = []
    entries: list[tuple[float, dict[int, float]] | None] = []
    if echo:
        ids += prompt
        entries += result.prompt_logprobs or [None] * len(prompt)
    ids += result.token_ids[:keep]
    entries += (result.logprobs or [])[:keep]
    tokens = [server.token_text(t) for t in ids]
    offsets, position = [], 0
    for text in tokens:
        offsets.append(position)
        position += len(text)
    return {
        "tokens": tokens,
        "token_logprobs": [None if e is None else e[0] for e in entries],
        "top_logprobs": [
            None if e is None else {server.token_text(t): v for t, v in e[1].items()}
            for e in entries
        ],
        "text_offset": offsets,
    }


def _chat_logprobs(server: OpenAIServer, result: GenerationResult) -> dict[str, Any]:
    """OpenAI's chat `logprobs.content`: each answer token with its likeliest alternatives."""
    content = []
    tokens = result.token_ids
    if result.finish_reason == "stop" and tokens and tokens[-1] in server.stop_ids:
        tokens = tokens[:-1]  # the stop token is not part of the answer
    for token, (logprob, top) in zip(tokens, result.logprobs or [], strict=False):
        text = server.token_text(token)
        content.append(
            {
                "token": text,
                "logprob": logprob,
                "bytes": list(text.encode("utf-8")),
                "top_logprobs": [
                    {
                        "token": server.token_text(t),
                        "logprob": v,
                        "bytes": list(server.token_text(t).encode("utf-8")),
                    }
                    for t, v in sorted(top.items(), key=lambda kv: -kv[1])
                ],
            }
        )
    return {"content": content}


def _usage(results: Sequence[GenerationResult]) -> dict[str, int]:
    prompt = sum(r.prompt_tokens for r in results)
    completion = sum(r.completion_tokens for r in results)
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
    }


def _finish_reason(result: GenerationResult) -> str:
    if result.finish_reason == "error":
        raise APIError(500, f"generation failed: {result.error}", type="server_error")
    return "length" if result.finish_reason == "length" else "stop"


def _sse(payload: dict[str, Any] | str) -> str:
    data = payload if isinstance(payload, str) else json.dumps(payload, ensure_ascii=False)
    return f"data: {data}\n\n"


def create_app(server: OpenAIServer, *, max_request_bytes: int = 1_000_000) -> FastAPI:
    """The FastAPI app; the engine thread starts and stops with the app's lifespan."""
    import contextlib

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        server.engine.start()
        try:
            yield
        finally:
            server.engine.shutdown()

    app = FastAPI(title="Corral", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.server = server

    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError) -> JSONResponse:
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        errors = exc.errors()
        first = errors[0] if errors else {}
        location = [str(p) for p in first.get("loc", ()) if p != "body"]
        param = ".".join(location) or None
        if first.get("type") == "json_invalid":
            message = f"the request body is not valid JSON: {first.get('ctx', {}).get('error', '')}".rstrip(
                ": "
            )
        else:
            message = f"{param or 'body'}: {first.get('msg', 'invalid request')}"
        return error_response(400, message, param=param)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        return error_response(exc.status_code, str(exc.detail), code=None)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        return error_response(
            500, f"internal error: {type(exc).__name__}: {exc}", type="server_error"
        )

    app.add_middleware(BodySizeLimit, limit=max_request_bytes)

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {
            "status": "ok",
            "model": server.model_name,
            "pending": server.engine.pending,
            "context_length": server.engine.context_length,
            "engine": asdict(server.engine.stats),
        }

    @app.get("/", include_in_schema=False)
    async def web_page() -> FileResponse:
        return FileResponse(WEB_PAGE, media_type="text/html")

    @app.get("/v1/models")
    async def models(request: Request) -> dict[str, Any]:
        server.check_api_key(request)
        return {
            "object": "list",
            "data": [
                {
                    "id": server.model_name,
                    "object": "model",
                    "created": server.created,
                    "owned_by": "corral",
                }
            ],
        }

    @app.post("/v1/chat/completions", response_model=None)
    async def chat_completions(body: ChatCompletionRequest, request: Request) -> Any:
        server.check_api_key(request)
        server.check_model(body.model)
        body.refuse_unhonoured()
        prompt = server.encode_messages(body.messages)
        body.check_token_ids()
        if body.top_logprobs is not None and not body.logprobs:
            raise APIError(400, "top_logprobs needs logprobs: true", param="top_logprobs")
        if body.logprobs and body.stream:
            raise APIError(400, "logprobs are not available when streaming", param="logprobs")
        params = server.sampling_params(
            body,
            len(prompt),
            max_tokens=body.max_completion_tokens or body.max_tokens,
            default_max_tokens=server.default_max_tokens,
            templated=True,
            logprobs=(body.top_logprobs or 0) if body.logprobs else None,
        )
        completion_id = f"chatcmpl-{uuid.uuid4().hex}"
        created = int(time.time())
        if body.stream:
            include_usage = bool((body.stream_options or {}).get("include_usage"))
            return _stream_response(
                server, request, [prompt], [params], completion_id, created, "chat", include_usage
            )
        results = await _collect(server, request, [prompt], [params])
        if results is None:
            return error_response(499, "client disconnected")
        result = results[0]
        choice = {
            "index": 0,
            "message": {"role": "assistant", "content": result.text},
            "finish_reason": _finish_reason(result),
            "logprobs": _chat_logprobs(server, result) if body.logprobs else None,
        }
        reply = {
            "id": completion_id,
            "object": "chat.completion",
            "created": created,
            "model": server.model_name,
            "choices": [choice],
            "usage": _usage(results),
        }
        if body.return_token_ids:
            reply["prompt_token_ids"] = list(prompt)
            choice["token_ids"] = list(result.token_ids)
        return reply

    @app.post("/v1/completions", response_model=None)
    async def completions(body: CompletionRequest, request: Request) -> Any:
        server.check_api_key(request)
        server.check_model(body.model)
        body.refuse_unhonoured()
        texts = body.prompts()
        if len(texts) > server.max_prompts_per_request:
            raise APIError(
                400,
                f"at most {server.max_prompts_per_request} prompts per request, got {len(texts)}; "
                "send them in several requests",
                param="prompt",
            )
        prompts = [server.encode_raw(t, i) for i, t in enumerate(texts)]
        scoring = body.echo and body.logprobs is not None
        body.check_token_ids()
        if body.stream and (body.echo or body.logprobs is not None):
            raise APIError(
                400, "echo and logprobs are not available when streaming", param="stream"
            )
        if body.max_tokens == 0 and not body.echo:
            raise APIError(
                400, "max_tokens 0 needs echo: true (scoring a prompt)", param="max_tokens"
            )
        # max_tokens 0 scores the prompt alone: the engine makes one token and it is dropped.
        generated = 1 if body.max_tokens == 0 else body.max_tokens
        # OpenAI's default for completions is 16 tokens; each prompt gets its own budget within
        # the context that is left after it.
        params = [
            server.sampling_params(
                body,
                len(p),
                max_tokens=generated,
                default_max_tokens=16,
                templated=False,
                logprobs=body.logprobs,
                prompt_logprobs=body.logprobs if scoring else None,
            )
            for p in prompts
        ]
        completion_id = f"cmpl-{uuid.uuid4().hex}"
        created = int(time.time())
        if body.stream:
            include_usage = bool((body.stream_options or {}).get("include_usage"))
            return _stream_response(
                server, request, prompts, params, completion_id, created, "text", include_usage
            )
        results = await _collect(server, request, prompts, params)
        if results is None:
            return error_response(499, "client disconnected")
        choices = []
        for i, (text, prompt, result) in enumerate(zip(texts, prompts, results, strict=True)):
            keep = 0 if body.max_tokens == 0 else len(result.token_ids)
            answer = result.text if keep else ""
            if body.echo:
                shown = (
                    text if isinstance(text, str) else server.loaded.decode_keeping_special(text)
                )
                answer = shown + answer
            logprobs = None
            if body.logprobs is not None:
                logprobs = _legacy_logprobs(server, prompt, result, body.echo, keep)
            choices.append(
                {
                    "index": i,
                    "text": answer,
                    "finish_reason": _finish_reason(result) if keep else "length",
                    "logprobs": logprobs,
                }
            )
            if body.return_token_ids:
                choices[-1]["prompt_token_ids"] = list(prompt)
                choices[-1]["token_ids"] = list(result.token_ids[:keep])
        usage = _usage(results)
        if body.max_tokens == 0:  # the dropped token was not given to the client
            usage["completion_tokens"] = 0
            usage["total_tokens"] = usage["prompt_tokens"]
        return {
            "id": completion_id,
            "object": "text_completion",
            "created": created,
            "model": server.model_name,
            "choices": choices,
            "usage": usage,
        }

    return app


async def _collect(
    server: OpenAIServer,
    request: Request,
    prompts: Sequence[list[int]],
    params: Sequence[SamplingParams],
) -> list[GenerationResult] | None:
    results: dict[int, GenerationResult] = {}
    async for index, event in server.run(request, prompts, params):
        if event.result is not None:
            results[index] = event.result
    if len(results) < len(prompts):
        return None  # the client went away
    return [results[i] for i in range(len(prompts))]


def _stream_response(
    server: OpenAIServer,
    request: Request,
    prompts: Sequence[list[int]],
    params: Sequence[SamplingParams],
    completion_id: str,
    created: int,
    kind: Literal["chat", "text"],
    include_usage: bool,
) -> StreamingResponse:
    base = {"id": completion_id, "created": created, "model": server.model_name}
    chunk_object = "chat.completion.chunk" if kind == "chat" else "text_completion"

    def chunk(
        index: int, text: str | None, finish_reason: str | None, first: bool = False
    ) -> dict[str, Any]:
        if kind == "chat":
            delta: dict[str, Any] = {}
            if first:
                delta["role"] = "assistant"
            if text is not None:
                delta["content"] = text
            choice = {
                "index": index,
                "delta": delta,
                "finish_reason": finish_reason,
                "logprobs": None,
            }
        else:
            choice = {
                "index": index,
                "text": text or "",
                "finish_reason": finish_reason,
                "logprobs": None,
            }
        return {**base, "object": chunk_object, "choices": [choice]}

    async def events() -> AsyncIterator[str]:
        results: list[GenerationResult] = []
        if kind == "chat":
            for index in range(len(prompts)):
                yield _sse(chunk(index, "", None, first=True))
        async for index, event in server.run(request, prompts, params):
            if event.result is None:
                yield _sse(chunk(index, event.text, None))
                continue
            results.append(event.result)
            if event.result.finish_reason == "error":
                yield _sse(
                    {
                        "error": {
                            "message": f"generation failed: {event.result.error}",
                            "type": "server_error",
                            "param": None,
                            "code": None,
                        }
                    }
                )
                return
            if event.result.finish_reason == "cancelled":
                return
            yield _sse(chunk(index, None if kind == "chat" else "", _finish_reason(event.result)))
        if len(results) < len(prompts):
            return
        if include_usage:
            yield _sse({**base, "object": chunk_object, "choices": [], "usage": _usage(results)})
        yield _sse("[DONE]")

    return StreamingResponse(
        events(),
        media_type="text/event-stream",
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
    )


def build_server(
    loaded: LoadedModel,
    *,
    model_name: str | None = None,
    api_key: str | None = None,
    max_batch_size: int = 16,
    default_max_tokens: int = 256,
    max_request_bytes: int = 1_000_000,
    max_prompts_per_request: int = 2048,
    threads: int | None = None,
    cores: int | None = None,
) -> FastAPI:
    """An app serving `loaded`; start it with uvicorn (the engine starts with the app).

    On a CPU, decode steps run on `threads` threads (default: one fewer than `cores`, torch's
    thread count unless given, leaving a core to the event loop) and prefills on `cores`; see
    `GenerationEngine`.
    """
    engine_options: dict[str, Any] = {}
    if next(loaded.model.parameters()).device.type == "cpu":
        cores = cores or torch.get_num_threads()
        engine_options["decode_threads"] = threads or max(1, cores - 1)
        engine_options["prefill_threads"] = max(cores, engine_options["decode_threads"])
    engine = loaded.make_engine(max_batch_size, **engine_options)
    server = OpenAIServer(
        loaded,
        engine,
        model_name=model_name or loaded.name,
        api_key=api_key,
        default_max_tokens=default_max_tokens,
        max_prompts_per_request=max_prompts_per_request,
    )
    return create_app(server, max_request_bytes=max_request_bytes)
