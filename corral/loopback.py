"""Servers on 127.0.0.1: a free port, waiting until a server answers /health, and a server process
that is stopped (its whole process group) however the caller's block ends.

The benchmarks, the GPU check and the tests start real servers (`corral serve`, vLLM) this way.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

# No proxy: the servers are on this machine, whatever the environment routes elsewhere.
_DIRECT = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
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
    """Whether the server at `base` (http://host:port) answers GET /health with 200."""
    try:
        with _DIRECT.open(f"{base}/health", timeout=2) as response:
            return response.status == 200
    except (urllib.error.URLError, OSError):
        return False


@contextlib.contextmanager
def server_process(
    command: Sequence[str],
    port: int,
    *,
    what: str,
    env: dict[str, str] | None = None,
    cwd: str | Path | None = None,
    timeout: float = 180.0,
) -> Iterator[str]:
    """Run `command` (a server listening on `port`); yield its base URL once /health answers.

    Its output goes to a temporary log, whose tail is the error when the server exits early. It
    runs in its own session, so servers that start helper processes (vLLM runs three) stop whole.
    """
    log = tempfile.NamedTemporaryFile("w+", prefix="server-", suffix=".log", delete=False)  # noqa: SIM115
    process = subprocess.Popen(
        list(command),
        cwd=cwd,
        env={**os.environ, **(env or {})},
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    base = f"http://127.0.0.1:{port}"

    def exited() -> str | None:
        if process.poll() is None:
            return None
        log.seek(0)
        return f"exited with {process.returncode}: {log.read()[-3000:]}"

    try:
        wait_until(lambda: is_healthy(base), timeout=timeout, what=what, alive=exited)
        yield base
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
            process.wait()
        log.close()
        os.unlink(log.name)


# vLLM's CPU build, as the tests and benchmarks compare Corral with it: fp32 (vLLM's default casts
# to bf16 on CPU, which moves logprobs by ~0.1), eager (compiling costs a minute of start-up and
# gains nothing here), and an explicit KV-cache size (vLLM otherwise sizes it from NUMA node 0,
# which reports half of a two-node machine's memory, and refuses to start).
VLLM_CPU_FLAGS = (
    "--dtype", "float32", "--max-model-len", "2048", "--enforce-eager",
    "--kv-cache-memory-bytes", "256M",
)  # fmt: skip


def vllm_missing(python: Path) -> str | None:
    """Why vLLM cannot run from the environment of `python`, or None when it is built."""
    if not python.is_file():
        return f"no vLLM environment at {python.parent.parent} (build it: make vllm-env)"
    return None


@contextlib.contextmanager
def vllm_server(
    python: Path, model: str | Path, *args: str, timeout: float = 300.0
) -> Iterator[str]:
    """Serve `model` with vLLM's OpenAI-compatible server (started by `python`, an environment
    with vLLM's CPU build) on 127.0.0.1; yield its base URL. Later `args` override the flags."""
    port = free_port()
    command = [
        str(python), "-m", "vllm.entrypoints.openai.api_server", "--model", str(model),
        "--host", "127.0.0.1", "--port", str(port), *VLLM_CPU_FLAGS, *args,
    ]  # fmt: skip
    env = {"HF_HUB_OFFLINE": "1", "VLLM_NO_USAGE_STATS": "1", "DO_NOT_TRACK": "1"}
    with server_process(command, port, what="vLLM server", env=env, timeout=timeout) as base:
        yield base
