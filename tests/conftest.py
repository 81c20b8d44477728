"""Shared fixtures: the real embedded model (loaded once per session), the tiny random LLaMA for
fast mechanics tests, and the Self-Instruct reference data in ../shared (skipped when absent)."""

from __future__ import annotations

import contextlib
import inspect
import os
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO_ROOT.parent / "shared" / "data" / "self-instruct"

# Keep two-core machines responsive and tests deterministic.
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
# Spinning OpenMP threads starve every other process on a two-core machine (servers and launched
# training processes that tests start); waiting passively costs nothing measurable here.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


# Tests with these markers take minutes or other environments: they are slow too, so that
# `pytest -m "not slow"` (the fast tests) leaves them out without naming each marker.
SLOW_KINDS = ("long", "vllm", "lm_eval")
_SESSION_STARTED = time.monotonic()


def pytest_collection_modifyitems(config, items) -> None:
    for item in items:
        if any(item.get_closest_marker(kind) for kind in SLOW_KINDS):
            item.add_marker(pytest.mark.slow)
        # Asking for the embedded model (directly or through another fixture) is what makes a
        # test slow: its first use on a machine converts the GGUF.
        elif "embedded_model_path" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.slow)


@contextlib.contextmanager
def _embedded_model_guard(item: pytest.Item) -> Iterator[None]:
    """Make a fast test fail where it would load the embedded model (in this process)."""
    import corral.models

    original = corral.models.prepare_embedded
    if item.get_closest_marker("slow"):
        yield
        return

    def refuse() -> Path:
        # Building tiny-random the first time on a machine reads the embedded tokenizer: allowed.
        if any(frame.function == "_build_tiny_random" for frame in inspect.stack()):
            return original()
        raise AssertionError(f"{item.nodeid} loads the embedded model: mark it slow")

    corral.models.prepare_embedded = refuse
    try:
        yield
    finally:
        corral.models.prepare_embedded = original


@pytest.hookimpl(wrapper=True)
def pytest_runtest_setup(item):
    with _embedded_model_guard(item):
        return (yield)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_call(item):
    with _embedded_model_guard(item):
        return (yield)


def pytest_terminal_summary(terminalreporter) -> None:
    """One line with the session's wall time, selection included (`-m "not slow"` for the fast)."""
    markexpr = terminalreporter.config.option.markexpr
    terminalreporter.write_line(
        f"corral tests ({markexpr or 'all'}): {time.monotonic() - _SESSION_STARTED:.1f} s"
    )


def shared_file(name: str) -> Path:
    """A file of the shared reference data, or skip the test with the reason."""
    path = SHARED_DATA / name
    if not path.is_file():
        pytest.skip(f"reference data {path} is absent (it lives in ../shared beside the repo)")
    return path


@pytest.fixture(scope="session")
def seed_tasks_path() -> Path:
    """The 175 human-written Self-Instruct seed tasks (for generation and filter tests)."""
    return shared_file("seed_tasks.jsonl")


@pytest.fixture(scope="session")
def user_oriented_path() -> Path:
    """The user-oriented evaluation set: evaluation only, never training data or seeds."""
    return shared_file("user_oriented_instructions.jsonl")


@pytest.fixture(scope="session")
def embedded_model_path() -> Path:
    from corral.models import prepare_embedded

    return prepare_embedded()


@pytest.fixture(scope="session")
def tiny_model_path() -> Path:
    from corral.models import prepare_tiny_random

    return prepare_tiny_random()


@pytest.fixture(scope="session")
def embedded_tokenizer(tiny_model_path):
    """The embedded model's tokenizer, read from the tiny random model's folder, which holds the
    same tokenizer files: tokenization tests need the real vocabulary, not the 135M weights."""
    from corral.models import load_tokenizer

    return load_tokenizer("tiny-random")


@pytest.fixture(scope="session")
def embedded_model(embedded_model_path, embedded_tokenizer):
    """The real embedded model in fp32, loaded once for the whole test session. Do not mutate it."""
    import torch

    from corral.models import load_model

    model = load_model("embedded", dtype=torch.float32, tokenizer=embedded_tokenizer)
    model.eval()
    return model


@pytest.fixture(scope="module")
def one_torch_thread():
    """Generate on one intra-op thread in the module that asks for it, restoring the setting afterwards.

    Decoding runs many tiny parallel regions; when other processes share the two cores, OpenMP's
    spinning worker threads starve each other (measured: ~1 token/s on two threads against ~12 on
    one). Processes started through `corral` avoid it with OMP_WAIT_POLICY=PASSIVE; this test
    process has already loaded torch, so it takes the other remedy.
    """
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def write_run_info_for(run: Path, base_path: Path, template: str, method: str = "lora") -> None:
    """The record training writes for a run on tiny-random, through the run-directory contract."""
    from corral.models import load_tokenizer
    from corral.rundir import run_info_for_training, write_run_info
    from corral.templates import get_template

    info = run_info_for_training(
        base_model="tiny-random",
        base_model_path=str(base_path),
        method=method,
        template=get_template(template, load_tokenizer("tiny-random")),
        max_length=128,
        corral_version="0.1.0",
    )
    write_run_info(run, info)


@pytest.fixture(scope="session")
def lora_run(tmp_path_factory, tiny_model_path) -> Path:
    """A Dolly-template LoRA run directory on tiny-random, built with peft directly: its adapter
    weights are random, not zero, so it answers differently from its base."""
    from model_runs import random_lora_run

    run = tmp_path_factory.mktemp("runs") / "dolly-lora"
    random_lora_run(run, "tiny-random", tiny_model_path, template="dolly", max_length=128)
    (run / "corral_config.yaml").write_text("model: tiny-random\n")
    return run
