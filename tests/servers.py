"""Real servers on 127.0.0.1 for tests: the two ways to run Corral's server (a `corral serve`
process, or the app on a thread in the test process) and vLLM's, over `corral.loopback`."""

from __future__ import annotations

import contextlib
import sys
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from corral import loopback
from corral.loopback import free_port, is_healthy, wait_until

REPO = Path(__file__).resolve().parents[1]


@contextlib.contextmanager
def corral_serve(
    args: Sequence[str], *, env: dict[str, str] | None = None, timeout: float = 180.0
) -> Iterator[str]:
    """Run `corral serve ARGS --port P` as a process; yield its base URL once healthy."""
    port = free_port()
    command = [sys.executable, "-m", "corral.cli", "serve", *args, "--port", str(port)]
    with loopback.server_process(
        command, port, what="corral serve", env=env, cwd=REPO, timeout=timeout
    ) as base:
        yield base


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


def vllm_missing() -> str | None:
    """Why vLLM tests cannot run here, or None when its environment is built."""
    return loopback.vllm_missing(VLLM_PYTHON)


def vllm_server(model: str | Path, *args: str, timeout: float = 300.0):
    """Serve `model` with vLLM's OpenAI-compatible server on 127.0.0.1; yield its base URL."""
    return loopback.vllm_server(VLLM_PYTHON, model, *args, timeout=timeout)
