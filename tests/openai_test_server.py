"""A small, real OpenAI-compatible HTTP server on 127.0.0.1 for tests and benchmarks.

It speaks `POST /v1/chat/completions`, `POST /v1/completions` and `GET /v1/models` over real HTTP
(stdlib `ThreadingHTTPServer`, HTTP/1.1 keep-alive) and answers with canned teacher text that
looks like what a teacher writes for Corral's prompts: Alpaca task lists, Self-Instruct `Task N:`
lines, "Is it classification?" answers and instances. Faults can be injected on a schedule:

    "429"        rate limited, with a Retry-After header (`retry_after` seconds)
    "500", "401", ...  that HTTP status (5xx are retried by clients, 4xx mostly not)
    "slow"       answers only after `slow_seconds` (longer than the client's timeout)
    "malformed"  200 with a truncated JSON body
    "drop"       closes the connection without answering

Use it in-process:

    with OpenAITestServer(faults=["429", "500"], latency=0.01) as server:
        client = openai.OpenAI(base_url=server.base_url, api_key="x")

or as a separate process (benchmarks, manual runs), which prints its base URL on the first line:

    python tests/openai_test_server.py --port 0 --latency 0.1

`responder(prompt, request) -> str` replaces the canned teacher; `stats` counts what happened.
`reasoning="field"` makes it a reasoning teacher that returns its thinking as `reasoning_content`
(chat), `reasoning="think"` one that writes it inline as `<think>…</think>` before the answer.

It also speaks OpenAI's Batch API: `POST /v1/files` (multipart, purpose batch), `GET
/v1/files/{id}/content`, `POST /v1/batches` and `GET /v1/batches/{id}`. A batch completes
`batch_seconds` after it was created; `batch_faults` decides its fate: "expire" (only the first
half of its requests done, the rest reported `batch_expired` in the error file), "partial" (every
third request fails with a 500 in the error file), "failed" (rejected at validation), "garbled"
(the first request's answer is a line cut in half, and lines that are not objects or name no
request of the batch follow the answers).
"""

from __future__ import annotations

import argparse
import json
import random
import re
import threading
import time
from collections import Counter, deque
from collections.abc import Callable, Iterable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

# ---------------------------------------------------------------- canned teacher text

_VERBS = [
    "Explain",
    "Describe",
    "Summarize",
    "List",
    "Compare",
    "Suggest",
    "Outline",
    "Propose",
    "Evaluate",
    "Recommend",
    "Identify",
    "Contrast",
    "Plan",
    "Draft",
    "Design",
    "Rank",
    "Estimate",
    "Critique",
    "Predict",
    "Translate",
    "Rewrite",
    "Classify",
    "Name",
    "Define",
]
_OBJECTS = [
    "three habits",
    "the main causes",
    "a weekly routine",
    "two arguments",
    "the key risks",
    "five questions",
    "a short checklist",
    "the trade-offs",
    "four common mistakes",
    "a budget",
    "the first steps",
    "several metaphors",
    "a polite reply",
    "the best tools",
    "a simple experiment",
    "a packing list",
    "the history",
    "a lesson outline",
]
_TOPICS = [
    "composting",
    "volcanoes",
    "remote teamwork",
    "sourdough baking",
    "bird migration",
    "solar panels",
    "public libraries",
    "marathon training",
    "tide pools",
    "medieval castles",
    "electric scooters",
    "coral reefs",
    "houseplants",
    "job interviews",
    "chess openings",
    "rainwater harvesting",
    "urban gardening",
    "glaciers",
    "beekeeping",
    "typography",
    "negotiation",
    "carpooling",
    "lighthouses",
    "fermentation",
    "first aid",
    "recycling plastics",
    "budget travel",
    "language learning",
    "time zones",
    "cloud formation",
    "board games",
    "desert ecosystems",
    "origami",
    "coffee roasting",
    "night skies",
    "bicycle repair",
]
_AUDIENCES = [
    "for a curious teenager",
    "for a busy parent",
    "for a new employee",
    "for retirees",
    "in plain language",
    "in under fifty words",
    "for a science class",
    "for a small town",
    "with concrete examples",
    "for someone on a tight budget",
    "step by step",
    "as a table",
]
_LABEL_SETS = [("Positive", "Negative"), ("Yes", "No"), ("Formal", "Informal"), ("True", "False")]
_CLASSIFY_WORDS = re.compile(r"\b(classify|label|whether|categor\w*|decide|rank)\b", re.I)


def canned_instruction(rng: random.Random) -> str:
    """A plausible, varied instruction; now and then one the filters must drop."""
    roll = rng.random()
    if roll < 0.05:
        return f"Draw a diagram of {rng.choice(_TOPICS)}."  # blocklisted
    if roll < 0.08:
        return "Tell a joke."  # too short
    return (
        f"{rng.choice(_VERBS)} {rng.choice(_OBJECTS)} of {rng.choice(_TOPICS)} "
        f"and {rng.choice(_TOPICS)} {rng.choice(_AUDIENCES)}."
    )


def canned_answer(rng: random.Random, instruction: str) -> str:
    topic = rng.choice(_TOPICS)
    return f"Here is a careful answer about {topic}: start small, check your progress, and adjust."


def _alpaca_items(rng: random.Random, first: int, last: int, chat: bool) -> str:
    parts = []
    for n in range(first, last + 1):
        instruction = canned_instruction(rng)
        has_input = rng.random() < 0.4
        inp = f"A note about {rng.choice(_TOPICS)}." if has_input else "<noinput>"
        mark = (lambda s: f"**{s}**") if chat and rng.random() < 0.5 else (lambda s: s)
        parts.append(
            f"{mark(f'{n}. Instruction:')} {instruction}\n{mark(f'{n}. Input:')}\n{inp}\n"
            f"{mark(f'{n}. Output:')}\n{canned_answer(rng, instruction)}\n###\n"
        )
    return "".join(parts)


# Chat templates' headers: a raw prompt ending in one asks for that role's turn (Magpie).
_USER_HEADERS = ("<|im_start|>user", "<|start_header_id|>user<|end_header_id|>", "[INST]")
_ASSISTANT_HEADERS = (
    "<|im_start|>assistant",
    "<|start_header_id|>assistant<|end_header_id|>",
    "[/INST]",
)
_CONSTRAINTS = [
    "Answer in exactly {n} bullet points.",
    "Keep the answer under {n}0 words and give one example.",
    "Explain your reasoning in {n} numbered steps.",
    "Use the table below: | item | cost | with {n} rows about {topic}.",
    "Compare it with {topic} and justify each of {n} claims.",
]


def canned_magpie_question(rng: random.Random) -> str:
    """A user's question as a chat model writes one after its user header; now and then one that
    Magpie's filters must drop."""
    roll = rng.random()
    if roll < 0.06:
        return "Sure! Here is a short summary of the topic you asked about."  # not a request
    if roll < 0.10:
        return "¿Cuáles son las principales causas de la erosión en las costas del norte?"
    if roll < 0.14:
        return "Tell me more more more more more more more more more more more more about it"
    instruction = canned_instruction(rng)
    return (
        instruction
        if rng.random() < 0.5
        else f"Could you {instruction[0].lower()}{instruction[1:-1]}?"
    )


def canned_evolution(prompt: str, rng: random.Random) -> str:
    """What a teacher writes when asked to evolve an instruction (see data_gen/evol.py)."""
    original = (
        prompt.rsplit("Original instruction:", 1)[-1].rsplit("New instruction:", 1)[0].strip()
    )
    if "brand-new instruction" in prompt:
        return canned_instruction(rng)
    roll = rng.random()
    if roll < 0.08:
        return original  # no information gain
    if roll < 0.14:
        return f"New instruction: {original} Be thorough."  # copies the prompt's words
    constraint = rng.choice(_CONSTRAINTS).format(n=rng.randint(2, 9), topic=rng.choice(_TOPICS))
    return f"{original} {constraint}"


def canned_teacher_reply(prompt: str, rng: random.Random, *, chat: bool) -> str:
    """What a cooperative teacher would write for each of Corral's prompt kinds."""
    tail = prompt.rstrip()
    if tail.endswith(_USER_HEADERS):
        return canned_magpie_question(rng) + "<|im_end|>"
    if tail.endswith(_ASSISTANT_HEADERS):
        if rng.random() < 0.05:
            return "yes yes yes yes yes yes yes yes yes yes yes yes yes yes yes<|im_end|>"
        return canned_answer(rng, "") + "<|im_end|>\n<|im_start|>user\nThanks!"
    if tail.endswith("New instruction:"):
        return canned_evolution(prompt, rng)
    if any(c.split("{")[0] in prompt for c in _CONSTRAINTS) or re.fullmatch(
        rf"(?:{'|'.join(_VERBS)}) .* of .*\.", tail
    ):
        # An evolved instruction sent to be answered.
        if rng.random() < 0.08:
            return "Sorry, I can't help with that request."
        return canned_answer(rng, prompt)
    if tail.endswith("Is it classification?"):
        task = tail.rsplit("Task:", 1)[-1].rsplit("Is it classification?", 1)[0]
        return " Yes" if _CLASSIFY_WORDS.search(task) else " No"
    if tail.endswith("Class label:"):
        labels = rng.choice(_LABEL_SETS)
        return "".join(
            f"{'' if i == 0 else 'Class label:'} {label}\nInput: A sample about {rng.choice(_TOPICS)} "
            f"that is clearly {label.lower()}.\n"
            for i, label in enumerate(labels)
        )
    if tail.endswith("Example 1\nInput:"):
        return "".join(
            f"{'' if i == 1 else f'Example {i}' + chr(10) + 'Input:'} A question about "
            f"{rng.choice(_TOPICS)}.\nOutput: {canned_answer(rng, '')}\n\n"
            for i in range(1, rng.randint(2, 3) + 1)
        )
    match = re.search(r"Task (\d+):$", tail)
    if match:
        first = int(match.group(1))
        lines = [canned_instruction(rng)]
        lines += [f"Task {n}: {canned_instruction(rng)}" for n in range(first + 1, first + 8)]
        text = " " + "\n".join(lines) + "\n"
        return ("Here are some more tasks:\n\nTask " + str(first) + ":" + text) if chat else text
    match = re.search(r"(\d+)\. Instruction:$", tail)
    if match:
        first = int(match.group(1))
        wanted = re.search(r"write (\d+) varied", prompt)
        last = int(wanted.group(1)) if wanted else first + 5
        if chat:
            return "Sure! Here are the new tasks:\n\n" + _alpaca_items(rng, first, last, chat=True)
        body = _alpaca_items(rng, first, last, chat=False)
        return " " + body[len(f"{first}. Instruction: ") :]
    return "I am not sure what you are asking for."


# ---------------------------------------------------------------- the HTTP server


class _LoopbackHTTPServer(ThreadingHTTPServer):
    daemon_threads = True
    # Many clients connect at once (concurrency 32+); the default backlog of 5 would reset some.
    request_queue_size = 256


class OpenAITestServer:
    """A real HTTP server speaking the OpenAI chat/completions API, with injectable faults."""

    def __init__(
        self,
        responder: Callable[[str, dict[str, Any]], str] | None = None,
        *,
        faults: Iterable[str | None] = (),
        latency: float = 0.0,
        retry_after: float = 0.2,
        slow_seconds: float = 3.0,
        seed: int = 0,
        host: str = "127.0.0.1",
        port: int = 0,
        model: str = "canned-teacher",
        batch_seconds: float = 0.0,
        batch_faults: Iterable[str | None] = (),
        reasoning: str = "",
    ) -> None:
        self.responder = responder
        self.reasoning = reasoning
        self.latency = latency
        self.retry_after = retry_after
        self.slow_seconds = slow_seconds
        self.model = model
        self.stats: Counter = Counter()
        self.prompts: list[str] = []
        self._faults: deque = deque(faults)
        self._lock = threading.Lock()
        self._rng_seed = seed
        self._request_no = 0
        self.batch_seconds = batch_seconds
        self._batch_faults: deque = deque(batch_faults)
        self.files: dict[str, bytes] = {}
        self.batches: dict[str, dict[str, Any]] = {}
        self._server = _LoopbackHTTPServer((host, port), self._handler_class())
        self._thread: threading.Thread | None = None

    @property
    def base_url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}/v1"

    def add_faults(self, faults: Iterable[str | None]) -> None:
        with self._lock:
            self._faults.extend(faults)

    def start(self) -> OpenAITestServer:
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    def __enter__(self) -> OpenAITestServer:
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    def serve_forever(self) -> None:
        self._server.serve_forever()

    # -- request handling

    def _next(self) -> tuple[str | None, random.Random]:
        with self._lock:
            fault = self._faults.popleft() if self._faults else None
            self._request_no += 1
            rng = random.Random(f"{self._rng_seed}:{self._request_no}")
        return fault, rng

    def _reply(self, path: str, request: dict[str, Any], rng: random.Random) -> dict[str, Any]:
        chat = path.endswith("/chat/completions")
        if chat:
            messages = request.get("messages") or []
            prompt = "\n".join(str(m.get("content", "")) for m in messages if isinstance(m, dict))
        else:
            prompt = str(request.get("prompt", ""))
        with self._lock:
            self.prompts.append(prompt)
        if self.responder is not None:
            text = self.responder(prompt, request)
        else:
            text = canned_teacher_reply(prompt, rng, chat=chat)
        thought = ""
        if self.reasoning and (chat or prompt.rstrip().endswith(_ASSISTANT_HEADERS)):
            thought = f"The user asks: {len(prompt.split())} words. Think it through, then answer."
            if self.reasoning == "think" or not chat:
                text, thought = f"<think>\n{thought}\n</think>\n\n{text}", ""
        finish = "stop"
        stops = request.get("stop") or []
        if isinstance(stops, str):
            stops = [stops]
        cuts = [i for i in (text.find(s) for s in stops if s) if i >= 0]
        if cuts:
            text = text[: min(cuts)]
        max_tokens = request.get("max_tokens")
        words = text.split(" ")
        if isinstance(max_tokens, int) and len(words) > max_tokens:
            text = " ".join(words[:max_tokens])
            finish = "length"
        usage = {
            "prompt_tokens": len(prompt.split()),
            "completion_tokens": len(text.split()),
        }
        usage["total_tokens"] = usage["prompt_tokens"] + usage["completion_tokens"]
        base = {
            "id": f"cmpl-{self._request_no}",
            "created": int(time.time()),
            "model": request.get("model", self.model),
            "usage": usage,
        }
        if chat:
            message = {"role": "assistant", "content": text}
            if thought:
                message["reasoning_content"] = thought  # as vLLM's reasoning parsers return it
            choice = {"index": 0, "message": message, "finish_reason": finish}
            return {**base, "object": "chat.completion", "choices": [choice]}
        choice = {"index": 0, "text": text, "finish_reason": finish, "logprobs": None}
        return {**base, "object": "text_completion", "choices": [choice]}

    # -- the Batch API

    def _new_id(self, prefix: str) -> str:
        with self._lock:
            self._request_no += 1
            return f"{prefix}-{self._request_no}"

    def _create_file(self, content: bytes) -> dict[str, Any]:
        file_id = self._new_id("file")
        with self._lock:
            self.files[file_id] = content
        return {"id": file_id, "object": "file", "bytes": len(content), "purpose": "batch",
                "filename": "input.jsonl", "created_at": int(time.time()), "status": "processed"}  # fmt: skip

    def _create_batch(self, request: dict[str, Any]) -> dict[str, Any]:
        batch_id = self._new_id("batch")
        with self._lock:
            fault = self._batch_faults.popleft() if self._batch_faults else None
            self.stats["batches_created"] += 1
        batch = {
            "id": batch_id, "object": "batch", "endpoint": request.get("endpoint"),
            "input_file_id": request.get("input_file_id"),
            "completion_window": request.get("completion_window", "24h"),
            "status": "validating", "created_at": int(time.time()), "errors": None,
            "output_file_id": None, "error_file_id": None,
            "request_counts": {"total": 0, "completed": 0, "failed": 0},
            "_fault": fault, "_ready_at": time.monotonic() + self.batch_seconds,
        }  # fmt: skip
        with self._lock:
            self.batches[batch_id] = batch
        return self._public(batch)

    @staticmethod
    def _public(batch: dict[str, Any]) -> dict[str, Any]:
        return {k: v for k, v in batch.items() if not k.startswith("_")}

    def _retrieve_batch(self, batch_id: str) -> dict[str, Any] | None:
        with self._lock:
            batch = self.batches.get(batch_id)
            self.stats["batch_polls"] += 1
        if batch is None:
            return None
        if batch["status"] in ("validating", "in_progress"):
            if time.monotonic() >= batch["_ready_at"]:
                self._run_batch(batch)
            else:
                batch["status"] = "in_progress"
        return self._public(batch)

    def _run_batch(self, batch: dict[str, Any]) -> None:
        fault = batch["_fault"]
        if fault == "failed":
            batch["status"] = "failed"
            batch["errors"] = {"object": "list", "data": [
                {"code": "invalid_request", "message": "injected validation failure", "line": 1}
            ]}  # fmt: skip
            return
        lines = [json.loads(line) for line in self.files[batch["input_file_id"]].splitlines()]
        done, errors = [], []
        for number, line in enumerate(lines):
            custom = line["custom_id"]
            if fault == "expire" and number >= len(lines) // 2:
                errors.append({"id": f"req-{number}", "custom_id": custom, "response": None,
                               "error": {"code": "batch_expired",
                                         "message": "This request could not be executed"}})  # fmt: skip
                continue
            if fault == "partial" and number % 3 == 2:
                errors.append({"id": f"req-{number}", "custom_id": custom,
                               "response": {"status_code": 500, "body": {"error": {
                                   "message": "injected server error"}}}, "error": None})  # fmt: skip
                continue
            _, rng = self._next()
            body = self._reply(line["url"], line["body"], rng)
            done.append({"id": f"req-{number}", "custom_id": custom,
                         "response": {"status_code": 200, "body": body}, "error": None})  # fmt: skip
        output = [json.dumps(x) + "\n" for x in done]
        if fault == "garbled" and output:
            output[0] = output[0][: len(output[0]) // 2] + "\n"
            output += ["[1, 2]\n", '"an answer"\n']
            output += [
                json.dumps({**done[-1], "custom_id": custom}) + "\n"
                for custom in ("request-x", "request-999", None, "request--1")
            ]
        batch["output_file_id"] = self._create_file("".join(output).encode())["id"]
        if errors:
            batch["error_file_id"] = self._create_file(
                "".join(json.dumps(x) + "\n" for x in errors).encode()
            )["id"]
        batch["status"] = "expired" if fault == "expire" else "completed"
        batch["request_counts"] = {"total": len(lines), "completed": len(done),
                                   "failed": len(errors)}  # fmt: skip

    def _handler_class(self) -> type[BaseHTTPRequestHandler]:
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"
            # Headers and body go out as separate writes; with Nagle's algorithm on, the body
            # waits for the client's delayed ACK (~40 ms per reply).
            disable_nagle_algorithm = True

            def log_message(self, *args: Any) -> None:  # keep test output clean
                pass

            def handle(self) -> None:
                try:
                    super().handle()
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client went away (gave up waiting, or was killed)

            def _send_json(
                self, status: int, payload: Any, headers: dict[str, str] | None = None
            ) -> None:
                body = json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                for key, value in (headers or {}).items():
                    self.send_header(key, value)
                self.end_headers()
                self.wfile.write(body)

            def do_GET(self) -> None:
                path = self.path.rstrip("/")
                if "/files/" in path and path.endswith("/content"):
                    file_id = path.split("/files/")[1].rsplit("/content", 1)[0]
                    content = server.files.get(file_id)
                    if content is None:
                        self._send_json(404, {"error": {"message": f"no file {file_id}"}})
                        return
                    self.send_response(200)
                    self.send_header("Content-Type", "application/octet-stream")
                    self.send_header("Content-Length", str(len(content)))
                    self.end_headers()
                    self.wfile.write(content)
                    return
                if "/batches/" in path:
                    batch = server._retrieve_batch(path.split("/batches/")[1])
                    if batch is None:
                        self._send_json(404, {"error": {"message": "no such batch"}})
                    else:
                        self._send_json(200, batch)
                    return
                if self.path.rstrip("/").endswith("/models"):
                    self._send_json(
                        200, {"object": "list", "data": [{"id": server.model, "object": "model"}]}
                    )
                else:
                    self._send_json(404, {"error": {"message": "not found"}})

            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                raw = self.rfile.read(length)
                path = self.path.rstrip("/")
                if path.endswith("/files"):
                    content = _multipart_file(self.headers.get("Content-Type", ""), raw)
                    if content is None:
                        self._send_json(400, {"error": {"message": "expected a multipart file"}})
                    else:
                        self._send_json(200, server._create_file(content))
                    return
                if path.endswith("/batches"):
                    self._send_json(200, server._create_batch(json.loads(raw or b"{}")))
                    return
                if not (path.endswith("/chat/completions") or path.endswith("/completions")):
                    self._send_json(404, {"error": {"message": f"no route {self.path}"}})
                    return
                try:
                    request = json.loads(raw or b"{}")
                except json.JSONDecodeError:
                    self._send_json(400, {"error": {"message": "invalid JSON body"}})
                    return
                fault, rng = server._next()
                with server._lock:
                    server.stats["requests"] += 1
                    server.stats[fault or "ok"] += 1
                if server.latency:
                    time.sleep(server.latency)
                if fault == "429":
                    self._send_json(
                        429,
                        {"error": {"message": "rate limited", "type": "rate_limit_exceeded"}},
                        {"Retry-After": f"{server.retry_after:g}"},
                    )
                    return
                if fault and fault.isdigit():
                    self._send_json(int(fault), {"error": {"message": f"injected HTTP {fault}"}})
                    return
                if fault == "drop":
                    self.close_connection = True
                    self.connection.close()
                    return
                if fault == "slow":
                    time.sleep(server.slow_seconds)
                reply = server._reply(path, request, rng)
                if fault == "malformed":
                    body = json.dumps(reply).encode()[:25]
                    self.send_response(200)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(body)))
                    self.end_headers()
                    self.wfile.write(body)
                    return
                self._send_json(200, reply)

        return Handler


def _multipart_file(content_type: str, body: bytes) -> bytes | None:
    """The `file` part of a multipart/form-data body."""
    import email.parser
    import email.policy

    message = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(
        f"Content-Type: {content_type}\r\n\r\n".encode() + body
    )
    for part in message.iter_parts():
        if part.get_param("name", header="content-disposition") == "file":
            return part.get_payload(decode=True)
    return None


def main() -> None:
    parser = argparse.ArgumentParser(
        description="OpenAI-compatible test server with canned replies"
    )
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--latency", type=float, default=0.0, help="seconds before each reply")
    args = parser.parse_args()
    server = OpenAITestServer(latency=args.latency, host=args.host, port=args.port)
    print(server.base_url, flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
