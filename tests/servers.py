"""Real servers on 127.0.0.1 for tests: a free port, waiting for health, and the two ways to run
Corral's server (a `corral serve` process, or the app on a thread in the test process)."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import httpx

REPO = Path(__file__).resolve().parents[1]


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_until(
    ready: Callable[[], bool],
    *,
    timeout: float,
    what: str,
    alive: Callable[[], str | None] = lambda: None,
    interval: float = 0.2,
) -> None:
    """Poll `ready()` until it is true; fail with `what` at the deadline, or at once when
    `alive()` returns a reason the thing being waited for is gone (a process that exited)."""
    deadline = time.monotonic() + timeout
    while True:
        gone = alive()
        if gone is not None:
            raise RuntimeError(f"{what}: {gone}")
        if ready():
            return
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what}: not ready after {timeout:.0f} s")
        time.sleep(interval)


def is_healthy(base: str) -> bool:
    try:
        return httpx.get(f"{base}/health", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


@contextlib.contextmanager
def corral_serve(
    args: Sequence[str], *, env: dict[str, str] | None = None, timeout: float = 180.0
) -> Iterator[str]:
    """Run `corral serve ARGS --port P` as a process; yield its base URL once healthy."""
    port = free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "corral.cli", "serve", *args, "--port", str(port)],
        cwd=REPO,
        env={**os.environ, **(env or {})},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    base = f"http://127.0.0.1:{port}"

    def exited() -> str | None:
        if process.poll() is None:
            return None
        return f"exited with {process.returncode}: {process.stderr.read()}"

    try:
        wait_until(lambda: is_healthy(base), timeout=timeout, what="corral serve", alive=exited)
        yield base
    finally:
        process.terminate()
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@contextlib.contextmanager
def app_on_a_thread(app: Any, *, timeout: float = 60.0) -> Iterator[str]:
    """Serve an ASGI app with uvicorn on a thread of this process; yield its base URL."""
    import uvicorn

    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    base = f"http://127.0.0.1:{port}"

    def stopped() -> str | None:
        return None if thread.is_alive() else "the server thread stopped"

    try:
        wait_until(lambda: is_healthy(base), timeout=timeout, what="server", alive=stopped)
        yield base
    finally:
        server.should_exit = True
        thread.join(timeout=30)


# ---------------------------------------------------------------------------- vLLM (CPU build)

VLLM_PYTHON = REPO / ".venv-vllm" / "bin" / "python"
# fp32 (vLLM's default casts to bf16 on CPU, which moves logprobs by ~0.1), eager (compiling costs
# a minute of start-up and gains nothing here), and an explicit KV-cache size (vLLM otherwise sizes
# it from NUMA node 0, which reports half of this machine's memory, and refuses to start).
VLLM_FLAGS = (
    "--dtype", "float32", "--max-model-len", "2048", "--enforce-eager",
    "--kv-cache-memory-bytes", "256M",
)  # fmt: skip


def vllm_missing() -> str | None:
    """Why vLLM tests cannot run here, or None when its environment is built."""
    if not VLLM_PYTHON.is_file():
        return f"no vLLM environment at {VLLM_PYTHON.parent.parent} (build it: make vllm-env)"
    return None


@contextlib.contextmanager
def vllm_server(model: str | Path, *args: str, timeout: float = 300.0) -> Iterator[str]:
    """Serve `model` with vLLM's OpenAI-compatible server on 127.0.0.1; yield its base URL."""
    import signal
    import tempfile

    port = free_port()
    log = tempfile.NamedTemporaryFile("w+", prefix="vllm-", suffix=".log", delete=False)  # noqa: SIM115
    process = subprocess.Popen(
        [
            str(VLLM_PYTHON), "-m", "vllm.entrypoints.openai.api_server", "--model", str(model),
            "--host", "127.0.0.1", "--port", str(port), *VLLM_FLAGS, *args,
        ],
        env={**os.environ, "HF_HUB_OFFLINE": "1", "VLLM_NO_USAGE_STATS": "1", "DO_NOT_TRACK": "1"},
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,  # vLLM runs three processes: stop the whole group
    )  # fmt: skip
    base = f"http://127.0.0.1:{port}"

    def exited() -> str | None:
        if process.poll() is None:
            return None
        log.seek(0)
        return f"vLLM exited with {process.returncode}: {log.read()[-3000:]}"

    try:
        wait_until(lambda: is_healthy(base), timeout=timeout, what="vLLM server", alive=exited)
        yield base
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
        log.close()
        os.unlink(log.name)
