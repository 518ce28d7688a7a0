"""A request's stream in a real browser: EventSource in Debian's Chromium (Playwright, `executable_path`: no
browser is downloaded) against a live stack, as a web page of the API's own origin would use it."""

from __future__ import annotations

import os
from pathlib import Path

import httpx
import pytest
from playwright.sync_api import sync_playwright

from tests.conftest import ServicesFileFactory
from tests.integration.conftest import REQUEST_ID, ApiFactory, WorkerFactory
from tests.integration.test_dashboard_browser import CHROMIUM, CHROMIUM_ARGS

pytestmark = pytest.mark.integration

if not os.path.exists(CHROMIUM):
    pytest.skip("Debian's chromium is not installed (apt-get install chromium)", allow_module_level=True)

# Resolves with what the EventSource saw up to `done`; with `keep_open`, also waits for the browser's reconnect
# after the server closed the stream (204: EventSource gives up, readyState CLOSED).
READ_STREAM = """async ([url, keepOpen]) => new Promise((resolve, reject) => {
  const seen = [];
  const source = new EventSource(url);
  source.addEventListener("chunk", (e) => seen.push(["chunk", JSON.parse(e.data).text, e.lastEventId]));
  source.addEventListener("progress", (e) => seen.push(["progress", JSON.parse(e.data).fraction]));
  source.addEventListener("done", (e) => {
    seen.push(["done", JSON.parse(e.data).statusCode, e.lastEventId]);
    if (!keepOpen) { source.close(); resolve(seen); }
  });
  source.onerror = () => {
    if (keepOpen && source.readyState === EventSource.CLOSED) { seen.push(["closed"]); resolve(seen); }
  };
  setTimeout(() => reject(new Error("no end within 40 s: " + JSON.stringify(seen))), 40000);
})"""


@pytest.fixture
def services(services_file: ServicesFileFactory) -> Path:
    return services_file([{"name": "llm", "processor": "workers.examples:Tokens"}])


def test_eventsource_in_chromium_gets_every_chunk_then_done_and_stops_reconnecting(
    api: ApiFactory, worker: WorkerFactory, services: Path
) -> None:
    stack = api(services)
    worker("llm", services_file=services)
    request_id = httpx.post(f"{stack.url}/api/predict/llm", content=b"12 50", timeout=10).headers[REQUEST_ID]
    url = f"/api/predict/llm/sink?requestId={request_id}&_stream_=true"
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        page = browser.new_page()
        page.goto(f"{stack.url}/healthz")  # a page of the API's origin
        seen = page.evaluate(READ_STREAM, [url, False])
        chunks = [event[1] for event in seen if event[0] == "chunk"]
        assert chunks == [f"t{i} " for i in range(12)]
        progress = [event[1] for event in seen if event[0] == "progress"]
        assert progress and progress[-1] == 1
        assert seen[-1][:2] == ["done", 200]
        # The stream replayed after the end, left open: EventSource reconnects once with Last-Event-ID, gets
        # 204, and stops (no reconnect loop).
        again = page.evaluate(READ_STREAM, [url, True])
        assert [event[1] for event in again if event[0] == "chunk"] == chunks
        assert again[-1] == ["closed"]
        browser.close()
