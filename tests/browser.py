"""A real headless Chromium for page tests (Debian's chromium, driven by playwright).

Tests skip with the reason when Chromium is missing: it is a system package, not a Python one.
playwright is a dev dependency and is imported normally, so a broken install fails the page tests
instead of skipping them. The flags keep Chromium from reaching for the network at start-up, which
this machine's closed network would refuse.
"""

from __future__ import annotations

import contextlib
import shutil
from collections.abc import Iterator

import pytest
from playwright.sync_api import sync_playwright

CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


def chromium_path() -> str:
    path = shutil.which("chromium") or shutil.which("chromium-browser")
    if path is None:
        pytest.skip(
            "Chromium is not installed (apt-get install chromium; `make test` does it as root)"
        )
    return path


@contextlib.contextmanager
def chromium_page(width: int = 1000, height: int = 800) -> Iterator:
    """A playwright page in headless Chromium; console errors are collected in `page.errors`."""
    executable = chromium_path()
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=executable, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": width, "height": height})
            page.errors = []
            page.on("pageerror", lambda exc: page.errors.append(str(exc)))
            page.on(
                "console", lambda msg: page.errors.append(msg.text) if msg.type == "error" else None
            )
            yield page
        finally:
            browser.close()
