"""Continuous batching over one shared KV cache: every active request advances one token per step.

Requests join and leave between steps. A step either prefills the requests that arrived since the
last one (left-padded into a single forward pass, each getting its first token) and merges their
KV cache into the running batch, or decodes one token for every running request in one forward
pass. Rows are left-padded, so the attention mask hides padding and each row carries its own
position ids; finished or cancelled rows are dropped from the cache at once, and columns that only
padding still uses are trimmed away.

The engine runs on one background thread (`start`) for the server and chat, or synchronously
(`generate`) for batch inference. Text is produced on the engine side (incremental detokenization
and stop-string matching from `inference.extraction`), so a stop string ends generation at the
step it appears.

Caches with sliding-window layers (Mistral-style) are not merged correctly by left padding beyond
the window; the LLaMA family Corral targets uses full attention.
"""

from __future__ import annotations

import collections
import itertools
import queue
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from corral.inference.decode_step import (
    DecodeStep,
    pack_linear_weights,
    packing_unavailable_reason,
    unsupported_reason,
)
from corral.inference.extraction import IncrementalDetokenizer, StopStringMatcher
from corral.inference.kv_cache import (
    KeysAndValues,
    KVCache,
    cache_keyword,
    layers_of,
    uses_sliding_window,
)
from corral.inference.params import SamplingParams
from corral.inference.sampling import TokenLogprob, sample_next_tokens, token_logprobs
from transformers import DynamicCache


@dataclass
class GenerationResult:
    """The outcome of one request."""

    text: str  # generated text, cut before any stop string or stop token
    token_ids: list[int]  # every generated token, including a final stop token
    finish_reason: str  # "stop" | "length" | "cancelled" | "error"
    prompt_tokens: int
    completion_tokens: int
    time_to_first_token: float | None = None
    error: str | None = None
    # With params.logprobs: (logprob, {token id: logprob} of the likeliest) per generated token.
    logprobs: list[TokenLogprob] | None = None
    # With params.prompt_logprobs: the same per prompt token; None for the first (no context).
    prompt_logprobs: list[TokenLogprob | None] | None = None


@dataclass
class GenerationEvent:
    """A text delta while generating (`result` None), then one final event carrying the result."""

    text: str = ""
    result: GenerationResult | None = None


Sink = Callable[[GenerationEvent], None]


@dataclass
class EngineStats:
    """Counters that show what the scheduler did (served at /health)."""

    forward_passes: int = 0
    decode_steps: int = 0
    prefills: int = 0
    max_batch_size_seen: int = 0
    requests_finished: int = 0
    requests_cancelled: int = 0
    generated_tokens: int = 0


class GenerationHandle:
    """A submitted request: cancel it, or (for synchronous callers) iterate its events."""

    def __init__(self, engine: GenerationEngine, request_id: int) -> None:
        self._engine = engine
        self.request_id = request_id
        self.cancelled = threading.Event()

    def cancel(self) -> None:
        """Stop generating for this request at the next step (a client went away)."""
        self.cancelled.set()
        self._engine._wake()


@dataclass(eq=False)  # identity: two requests are never the same request
class _Sequence:
    handle: GenerationHandle
    prompt_ids: list[int]
    params: SamplingParams
    sink: Sink
    generator: torch.Generator | None
    detokenizer: IncrementalDetokenizer
    stop_matcher: StopStringMatcher
    submitted_at: float
    generated: list[int] = field(default_factory=list)
    text_parts: list[str] = field(default_factory=list)
    first_token_at: float | None = None
    logprobs: list[TokenLogprob] = field(default_factory=list)
    prompt_logprobs: list[TokenLogprob | None] | None = None

    @property
    def length(self) -> int:
        """Tokens in the sequence so far: the prompt and every generated token."""
        return len(self.prompt_ids) + len(self.generated)


class GenerationEngine:
    """Batched generation for one model; see the module docstring."""

    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        *,
        max_batch_size: int = 16,
        context_length: int | None = None,
        max_prefill_tokens: int = 4096,
        fast_path: bool = True,
        pack_weights: bool = False,
        decode_threads: int | None = None,
        prefill_threads: int | None = None,
    ) -> None:
        self.model = model
        # Bounds one prefill pass (padded prompt tokens), so a burst of long prompts is admitted
        # over several steps instead of in one pass that could exhaust memory.
        self.max_prefill_tokens = max_prefill_tokens
        # CPU threads for each kind of step (None: leave torch's setting). A server decodes on one
        # core fewer than it has, so its event loop never pre-empts a thread of a decode step's
        # matrix multiplies (they wait for their slowest thread); prefills, during which the
        # clients mostly wait, take every core.
        self.decode_threads, self.prefill_threads = decode_threads, prefill_threads
        self.tokenizer = tokenizer
        self.max_batch_size = max_batch_size
        self.context_length = context_length or context_length_of(model, tokenizer)
        self.device = next(model.parameters()).device
        self.pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        if uses_sliding_window(model.config):
            raise ValueError(
                "this model uses sliding-window attention, which the batching engine does not support"
            )
        # LLaMA-family models get Corral's own decode step (decode_step.py); others run
        # transformers' forward. `pack_weights` (for a model the engine owns: it changes the
        # model in place) also puts their linear weights in oneDNN's packed layout on a CPU.
        self.fast_path_unavailable = unsupported_reason(model) if fast_path else "turned off"
        self._decode_fast = DecodeStep(model) if self.fast_path_unavailable is None else None
        self.packing_unavailable = (
            packing_unavailable_reason(model) if pack_weights else "not asked for"
        )
        if self.packing_unavailable is None:
            pack_linear_weights(model, rows_hint=max_batch_size)
        self.stats = EngineStats()
        self._ids = itertools.count()
        self._waiting: collections.deque[_Sequence] = collections.deque()
        self._active: list[_Sequence] = []
        self._cache: KVCache | None = None
        self._cache_keyword = cache_keyword(model)
        self._mask: torch.Tensor | None = None  # [batch, cached length]: 1 = real token
        self._condition = threading.Condition()
        self._thread: threading.Thread | None = None
        self._stopping = False
        self._random = torch.Generator(device="cpu")
        self._random.seed()

    # ------------------------------------------------------------------ public API

    def decode(self, ids: Sequence[int]) -> str:
        """Token ids to text with special tokens dropped (what users see)."""
        return self.tokenizer.decode(list(ids), skip_special_tokens=True)

    def submit(
        self, prompt_ids: Sequence[int], params: SamplingParams, sink: Sink
    ) -> GenerationHandle:
        """Queue a request; `sink` receives its events (from the engine thread)."""
        prompt_ids = list(prompt_ids)
        if not prompt_ids:
            raise ValueError("the prompt is empty")
        if len(prompt_ids) + params.max_new_tokens > self.context_length:
            raise ValueError(
                f"prompt ({len(prompt_ids)} tokens) + max_new_tokens ({params.max_new_tokens}) "
                f"exceeds the context length ({self.context_length})"
            )
        handle = GenerationHandle(self, next(self._ids))
        generator = None
        if params.seed is not None:
            generator = torch.Generator(device="cpu")
            generator.manual_seed(params.seed)
        sequence = _Sequence(
            handle=handle,
            prompt_ids=prompt_ids,
            params=params,
            sink=sink,
            generator=generator,
            detokenizer=IncrementalDetokenizer(self.decode),
            stop_matcher=StopStringMatcher(params.stop),
            submitted_at=time.monotonic(),
        )
        with self._condition:
            self._waiting.append(sequence)
            self._condition.notify_all()
        return handle

    def stream(
        self, prompt_ids: Sequence[int], params: SamplingParams
    ) -> Iterator[GenerationEvent]:
        """Submit and iterate events in this thread (needs the background thread running)."""
        events: queue.Queue[GenerationEvent] = queue.Queue()
        handle = self.submit(prompt_ids, params, events.put)
        try:
            while True:
                event = events.get()
                yield event
                if event.result is not None:
                    return
        finally:
            handle.cancel()

    def generate(
        self, prompts: Sequence[Sequence[int]], params: SamplingParams | Sequence[SamplingParams]
    ) -> list[GenerationResult]:
        """Generate for many prompts at once, synchronously (not while the thread runs)."""
        if self._thread is not None:
            raise RuntimeError("generate() is for synchronous use; the engine thread is running")
        per_prompt = [params] * len(prompts) if isinstance(params, SamplingParams) else list(params)
        results: dict[int, GenerationResult] = {}
        for index, (prompt, prompt_params) in enumerate(zip(prompts, per_prompt, strict=True)):

            def sink(event: GenerationEvent, index: int = index) -> None:
                if event.result is not None:
                    results[index] = event.result

            self.submit(prompt, prompt_params, sink)
        while self.step():
            pass
        return [results[i] for i in range(len(prompts))]

    def start(self) -> None:
        """Run the scheduler on a background thread."""
        if self._thread is None:
            self._stopping = False
            self._thread = threading.Thread(target=self._run, name="corral-engine", daemon=True)
            self._thread.start()

    def shutdown(self) -> None:
        with self._condition:
            self._stopping = True
            self._condition.notify_all()
        if self._thread is not None:
            self._thread.join(timeout=30)
            self._thread = None

    @property
    def pending(self) -> int:
        """Requests waiting or generating."""
        return len(self._waiting) + len(self._active)

    # ------------------------------------------------------------------ scheduler

    def _wake(self) -> None:
        with self._condition:
            self._condition.notify_all()

    def _run(self) -> None:
        while True:
            with self._condition:
                while not self._stopping and not self._waiting and not self._active:
                    self._condition.wait()
                if self._stopping:
                    break
            try:
                self.step()
            except Exception as exc:  # keep serving: fail the requests in flight, not the server
                self._fail_all(f"{type(exc).__name__}: {exc}")
        self._fail_all("the engine shut down")

    def step(self) -> bool:
        """One scheduling step; returns whether work remains."""
        with self._condition:
            self._drop_cancelled_waiting()
            admitted: list[_Sequence] = []
            room = self.max_batch_size - len(self._active)
            while self._waiting and len(admitted) < room:
                longest = max(
                    [len(self._waiting[0].prompt_ids), *(len(s.prompt_ids) for s in admitted)]
                )
                if admitted and longest * (len(admitted) + 1) > self.max_prefill_tokens:
                    break
                admitted.append(self._waiting.popleft())
        self._drop_cancelled_active()
        with torch.inference_mode():
            if admitted:
                _use_threads(self.prefill_threads)
                try:
                    self._prefill(admitted)
                except Exception as exc:
                    # These requests are in neither queue yet: answer them here, then re-raise.
                    for sequence in admitted:
                        if sequence not in self._active:
                            self._finish(sequence, "error", error=f"{type(exc).__name__}: {exc}")
                    raise
            elif self._active:
                _use_threads(self.decode_threads)
                self._decode_step()
        with self._condition:
            return bool(self._waiting or self._active)

    def _drop_cancelled_waiting(self) -> None:
        kept = collections.deque()
        for sequence in self._waiting:
            if sequence.handle.cancelled.is_set():
                self._finish(sequence, "cancelled")
            else:
                kept.append(sequence)
        self._waiting = kept

    def _drop_cancelled_active(self) -> None:
        keep = [i for i, s in enumerate(self._active) if not s.handle.cancelled.is_set()]
        if len(keep) == len(self._active):
            return
        for sequence in self._active:
            if sequence.handle.cancelled.is_set():
                self._finish(sequence, "cancelled")
        self._keep_rows(keep)

    def _prefill(self, sequences: list[_Sequence]) -> None:
        longest = max(len(s.prompt_ids) for s in sequences)
        input_ids = torch.full((len(sequences), longest), self.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(sequences), longest), dtype=torch.long)
        for row, sequence in enumerate(sequences):
            n = len(sequence.prompt_ids)
            input_ids[row, longest - n :] = torch.tensor(sequence.prompt_ids)
            mask[row, longest - n :] = 1
        position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
        cache = DynamicCache(config=self.model.config)
        # Logits at every prompt position only when some request scores its prompt (echo).
        scoring = any(s.params.prompt_logprobs is not None for s in sequences)
        output = self.model(
            input_ids=input_ids.to(self.device),
            attention_mask=mask.to(self.device),
            position_ids=position_ids.to(self.device),
            use_cache=True,
            logits_to_keep=0 if scoring else 1,
            **{self._cache_keyword: cache},
        )
        self.stats.forward_passes += 1
        self.stats.prefills += 1
        if scoring:
            for row, sequence in enumerate(sequences):
                if sequence.params.prompt_logprobs is not None:
                    n = len(sequence.prompt_ids)
                    # Position p predicts the token at p + 1: the prompt's own tokens from 1 on.
                    sequence.prompt_logprobs = [None] + token_logprobs(
                        output.logits[row, longest - n : longest - 1],
                        sequence.prompt_ids[1:],
                        sequence.params.prompt_logprobs,
                    )
        self._merge(sequences, layers_of(cache), mask.to(self.device))
        self._advance(output.logits[:, -1, :], first_row=len(self._active) - len(sequences))

    def _decode_step(self) -> None:
        last = torch.tensor([[s.generated[-1]] for s in self._active], device=self.device)
        # The last generated token sits right after the prompt and the tokens before it.
        positions = torch.tensor([[s.length - 1] for s in self._active], device=self.device)
        ones = torch.ones((len(self._active), 1), dtype=self._mask.dtype, device=self.device)
        self._mask = torch.cat([self._mask, ones], dim=1)
        if self._decode_fast is not None:
            logits = self._decode_fast.step(last, positions, self._mask, self._cache)
        else:
            # transformers' forward appends to a copy in its own cache; the new position is then
            # written into the engine's (a model off the fast path is several times slower anyway).
            cache = self._cache.to_transformers(self.model.config)
            output = self.model(
                input_ids=last,
                attention_mask=self._mask,
                position_ids=positions,
                use_cache=True,
                logits_to_keep=1,
                **{self._cache_keyword: cache},
            )
            self._cache.append_last_position(cache)
            logits = output.logits[:, -1, :]
        self.stats.forward_passes += 1
        self.stats.decode_steps += 1
        self.stats.max_batch_size_seen = max(self.stats.max_batch_size_seen, len(self._active))
        self._advance(logits, first_row=0)

    def _merge(
        self, sequences: list[_Sequence], layers: list[KeysAndValues], mask: torch.Tensor
    ) -> None:
        """Append freshly prefilled rows to the running batch, left-padding whichever is shorter."""
        if self._cache is None or not self._active:
            self._cache = KVCache(layers)
            self._mask = mask
            self._active = list(sequences)
            return
        length = max(self._mask.shape[1], mask.shape[1])
        merged = []
        for old, (new_keys, new_values) in zip(self._cache.layers, layers, strict=True):
            keys = torch.cat([_left_pad(old.keys, length), _left_pad(new_keys, length)])
            values = torch.cat([_left_pad(old.values, length), _left_pad(new_values, length)])
            merged.append((keys, values))
        self._cache = KVCache(merged)
        self._mask = torch.cat(
            [_left_pad(self._mask, length, dim=1), _left_pad(mask, length, dim=1)]
        )
        self._active.extend(sequences)

    def _keep_rows(self, rows: list[int]) -> None:
        """Keep only `rows` of the batch, and trim cache columns no remaining row uses."""
        self._active = [self._active[i] for i in rows]
        if not self._active:
            self._cache, self._mask = None, None
            return
        index = torch.tensor(rows, device=self.device)
        mask = self._mask[index]
        first_used = int(mask.any(dim=0).nonzero()[0])
        self._mask = mask[:, first_used:]
        self._cache.keep(index, first_used)

    def _advance(self, logits: torch.Tensor, first_row: int) -> None:
        """Pick the next token of rows `first_row`.. and handle the ones that finish."""
        rows = self._active[first_row:]
        tokens = sample_next_tokens(
            logits.float(),
            [s.params for s in rows],
            [s.generator or self._random for s in rows],
            [s.generated for s in rows],
            [s.prompt_ids for s in rows],
        )
        finished: set[int] = set()
        now = time.monotonic()
        for offset, (sequence, token) in enumerate(zip(rows, tokens, strict=True)):
            if sequence.first_token_at is None:
                sequence.first_token_at = now
            if sequence.params.logprobs is not None:
                sequence.logprobs += token_logprobs(
                    logits[offset : offset + 1], [token], sequence.params.logprobs
                )
            sequence.generated.append(token)
            self.stats.generated_tokens += 1
            reason = self._consume(sequence, token)
            if reason is not None:
                self._finish(sequence, reason)
                finished.add(first_row + offset)
        if finished:
            self._keep_rows([i for i in range(len(self._active)) if i not in finished])

    def _consume(self, sequence: _Sequence, token: int) -> str | None:
        """Turn a new token into text for the client; return a finish reason when done."""
        params = sequence.params
        matcher = sequence.stop_matcher
        if token in params.stop_token_ids:
            self._emit(sequence, self._drain(sequence))
            return "stop"
        self._emit(sequence, matcher.push(sequence.detokenizer.push(token)))
        if matcher.stopped:
            return "stop"
        if (
            len(sequence.generated) >= params.max_new_tokens
            or sequence.length >= self.context_length
        ):
            self._emit(sequence, self._drain(sequence))
            return "stop" if matcher.stopped else "length"
        return None

    @staticmethod
    def _drain(sequence: _Sequence) -> str:
        """At the end of a generation: text still held back by the detokenizer or stop matcher."""
        matcher = sequence.stop_matcher
        text = matcher.push(sequence.detokenizer.flush())
        return text if matcher.stopped else text + matcher.flush()

    def _emit(self, sequence: _Sequence, text: str) -> None:
        if text:
            sequence.text_parts.append(text)
            try:
                sequence.sink(GenerationEvent(text=text))
            except Exception:  # its consumer is gone (e.g. the event loop closed): stop it
                sequence.handle.cancelled.set()

    def _finish(self, sequence: _Sequence, reason: str, error: str | None = None) -> None:
        if reason == "cancelled":
            self.stats.requests_cancelled += 1
        else:
            self.stats.requests_finished += 1
        ttft = None
        if sequence.first_token_at is not None:
            ttft = sequence.first_token_at - sequence.submitted_at
        result = GenerationResult(
            text="".join(sequence.text_parts),
            token_ids=list(sequence.generated),
            finish_reason=reason,
            prompt_tokens=len(sequence.prompt_ids),
            completion_tokens=len(sequence.generated),
            time_to_first_token=ttft,
            error=error,
            logprobs=list(sequence.logprobs) if sequence.params.logprobs is not None else None,
            prompt_logprobs=sequence.prompt_logprobs,
        )
        try:
            sequence.sink(GenerationEvent(result=result))
        except Exception:  # a consumer that went away must not stop the others
            pass

    def _fail_all(self, message: str) -> None:
        with self._condition:
            failed = list(self._waiting) + list(self._active)
            self._waiting.clear()
        self._active, self._cache, self._mask = [], None, None
        for sequence in failed:
            self._finish(sequence, "error", error=message)


def _use_threads(count: int | None) -> None:
    if count is not None and torch.get_num_threads() != count:
        torch.set_num_threads(count)


def _left_pad(tensor: torch.Tensor, length: int, dim: int = 2) -> torch.Tensor:
    missing = length - tensor.shape[dim]
    if missing == 0:
        return tensor
    shape = list(tensor.shape)
    shape[dim] = missing
    return torch.cat([tensor.new_zeros(shape), tensor], dim=dim)


def context_length_of(model: Any, tokenizer: Any) -> int:
    """Tokens a request may span: the model's positions, or the tokenizer's limit if smaller."""
    length = getattr(model.config, "max_position_embeddings", None) or 2048
    tokenizer_limit = getattr(tokenizer, "model_max_length", None)
    if isinstance(tokenizer_limit, int) and 0 < tokenizer_limit < length:
        length = tokenizer_limit
    return int(length)
