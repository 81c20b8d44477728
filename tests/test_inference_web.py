"""The chat page at `/`, in a real headless Chromium, against the real server and embedded model."""

from __future__ import annotations

import httpx
import pytest
from browser import chromium_page, chromium_path
from servers import app_on_a_thread

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_torch_thread")]


@pytest.fixture(scope="module")
def page_server(embedded_model, embedded_tokenizer):
    """The app on a free port in this process (reusing the session's model), run by uvicorn."""
    from corral.inference.loading import LoadedModel
    from corral.inference.server import build_server

    from corral.templates import get_template

    chromium_path()  # skip before starting anything when there is no browser
    loaded = LoadedModel(
        model=embedded_model,
        tokenizer=embedded_tokenizer,
        template=get_template("chat", embedded_tokenizer),
        name="embedded",
        source="model",
        context_length=8192,
        owns_model=False,  # the session's model: its weights stay as they are
    )
    app = build_server(loaded, api_key="page-key", default_max_tokens=16)
    with app_on_a_thread(app) as base:
        yield base


def test_page_sends_a_message_and_shows_the_streamed_answer(page_server):
    with chromium_page() as page:
        page.goto(page_server + "/")
        # The key is required: without it the page shows the server's 401 message.
        page.wait_for_selector(".message.error", timeout=30_000)
        assert "API key" in page.inner_text(".message.error")
        page.fill("#api-key", "page-key")
        page.dispatch_event("#api-key", "change")
        page.wait_for_function(
            "document.getElementById('model-name').textContent === 'embedded'", timeout=30_000
        )

        page.fill("#max-tokens", "12")
        page.fill("#temperature", "0")
        page.fill("#prompt", "Name a fruit that is yellow.")
        page.press("#prompt", "Enter")
        page.wait_for_selector(".message.assistant[data-state='done']", timeout=120_000)
        answer = page.eval_on_selector(".message.assistant", "element => element.textContent")
        assert page.inner_text(".message.user") == "Name a fruit that is yellow."
        assert answer.strip()

        # The same question over the API gives the same greedy answer the page showed.
        reply = httpx.post(
            page_server + "/v1/chat/completions",
            json={
                "model": "embedded",
                "messages": [{"role": "user", "content": "Name a fruit that is yellow."}],
                "max_tokens": 12,
                "temperature": 0,
            },
            headers={"Authorization": "Bearer page-key"},
            timeout=120,
        ).json()
        assert reply["choices"][0]["message"]["content"] == answer
        assert [e for e in page.errors if "401" not in e] == []
