"""The dashboard in a real browser: Debian's Chromium, driven by Playwright, against a live stack with traffic.

A person opens /dashboard of an API that has an admin token, gives the token, and reads the numbers: they must be
the queue attributes' (waiting, in flight, sink, live workers), the rejections must be the 450s that were
answered, the failure must be listed with its message, a request looked up by id must show how it ended, and a
worker busy on a long request must show it. Playwright drives the system's Chromium (`executable_path`): no
browser is downloaded. `QS_DASHBOARD_SCREENSHOT=docs/dashboard.png` also saves the screenshot the README shows.
"""

from __future__ import annotations

import os
import shutil
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from playwright.sync_api import Page, expect, sync_playwright

from queue_service.testing import ManagedProcess, start_api
from tests.conftest import ServicesFileFactory
from tests.integration.conftest import ECHO, REQUEST_ID, SLEEP, WorkerFactory

pytestmark = pytest.mark.integration

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-dev-shm-usage",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-default-apps",
    "--disable-sync",
    "--no-first-run",
    "--metrics-recording-only",
]
ADMIN_TOKEN = "dashboard-admin-token-for-the-test"
TOKEN = "token-of-the-test"
AUTH = {"Authorization": TOKEN}
MAX_WAITING = 3
# The page refreshes every 2 s and the API adds its answer counts to Redis every 5 s: generous for a loaded box.
PAGE_SECONDS = 45
# Samples in a chart before the screenshot (one per refresh, every 2 s).
CHART_POINTS = 6

if not os.path.exists(CHROMIUM):
    pytest.skip(
        "Debian's chromium is not installed (apt-get install chromium; .ci/run installs it): "
        "the dashboard's browser test needs a real browser",
        allow_module_level=True,
    )


def field(page: Page, service: str, name: str) -> str:
    return page.locator(f'[data-service="{service}"] [data-field="{name}"]').inner_text()


def attributes(http: httpx.Client, service: str, queue: str = "") -> dict[str, str]:
    path = f"/api/predict/{service}{queue}"
    answer = http.get(path, params={"_attrs_": "true"})
    assert answer.status_code == 200, answer.text
    return answer.json()


def wait_for(check: object, what: str, timeout: float = PAGE_SECONDS) -> None:
    deadline = time.monotonic() + timeout
    last: object = None
    while time.monotonic() < deadline:
        try:
            last = check()  # type: ignore[operator]
        except AssertionError as exc:
            last = exc
        else:
            if last is True:
                return
        time.sleep(0.25)
    raise AssertionError(f"gave up waiting for {what}: {last}")


class Traffic:
    """Puts and sync calls to `echo` from a thread, at a modest rate, until stopped."""

    def __init__(self, base_url: str) -> None:
        self.http = httpx.Client(base_url=base_url, headers=AUTH, timeout=30)
        self.stopping = threading.Event()
        self.sent = 0
        self.refused: list[int] = []
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while not self.stopping.is_set():
            path = "/api/predict/echo/sync" if self.sent % 4 == 0 else "/api/predict/echo"
            status = self.http.post(path, content=b"hello dashboard").status_code
            if status != 200:
                self.refused.append(status)
            self.sent += 1
            self.stopping.wait(0.05)

    def stop(self) -> None:
        self.stopping.set()
        self.thread.join(timeout=30)
        self.http.close()


@pytest.fixture
def stack(
    redis_url: str,
    services_file: ServicesFileFactory,
    worker: WorkerFactory,
    tmp_path: Path,
    process_logs: list[ManagedProcess],
) -> Iterator[str]:
    path = services_file(
        [
            {"name": "echo", "processor": ECHO, "token": TOKEN},
            {
                "name": "sleep",
                "processor": SLEEP,
                "token": TOKEN,
                "metadata": {"rpc": {"max_queue_size": MAX_WAITING}},
            },
        ]
    )
    api, base_url = start_api(redis_url, path, env={"QS_ADMIN_TOKEN": ADMIN_TOKEN}, log_dir=tmp_path / "logs")
    process_logs.append(api)
    worker("echo", services_file=path)
    worker("sleep", services_file=path)
    yield base_url


def test_a_person_reads_the_queues_workers_and_failures_in_chromium(stack: str, tmp_path: Path) -> None:
    http = httpx.Client(base_url=stack, headers=AUTH, timeout=30)
    # A failure: Sleep refuses a body that is no number of seconds (status 400, with its message).
    failed_id = http.post("/api/predict/sleep", content=b"soon").headers[REQUEST_ID]
    failed = http.get("/api/predict/sleep/sink", params={"requestId": failed_id, "_timeout_": "20s"})
    assert failed.status_code == 200 and failed.json()[0]["tags"]["lastCode"] == "400"
    # The sleep worker busy for the whole test, three more waiting (the bound), two turned away with 450.
    long_id = http.post("/api/predict/sleep", content=b"120").headers[REQUEST_ID]
    wait_for(lambda: attributes(http, "sleep")["stream.inFlight"] == "1", "the long request to start", 30)
    assert [http.post("/api/predict/sleep", content=b"0.1").status_code for _ in range(MAX_WAITING + 2)] == [
        200,
        200,
        200,
        450,
        450,
    ]
    traffic = Traffic(stack)
    try:
        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
            page = browser.new_page(viewport={"width": 1360, "height": 900})
            page.goto(f"{stack}/dashboard")
            # An API with an admin token: the page asks for it before it shows anything.
            expect(page.locator("#login")).to_be_visible()
            page.fill("#login-token", ADMIN_TOKEN)
            page.click("#login button")
            expect(page.locator('[data-service="sleep"]')).to_be_visible(timeout=PAGE_SECONDS * 1000)

            # The rejections reach the page once the API has added its counts to Redis (every 5 s).
            wait_for(lambda: field(page, "sleep", "rejected") == "2", "2 rejections of sleep on the page")
            wait_for(lambda: field(page, "echo", "throughput") not in ("\u2013", "0.00"), "echo's throughput")
            sleep_attrs = attributes(http, "sleep")
            assert field(page, "sleep", "waiting") == sleep_attrs["stream.waiting"] == str(MAX_WAITING)
            assert field(page, "sleep", "in-flight") == sleep_attrs["stream.inFlight"] == "1"
            assert field(page, "sleep", "live-workers") == sleep_attrs["workers.live"] == "1"
            assert field(page, "sleep", "backlog-per-worker") == sleep_attrs["workers.backlogPerWorker"]
            assert field(page, "sleep", "sink") == attributes(http, "sleep", "/sink")["stream.length"] == "1"

            # The worker on the long request, with that request's id.
            busy = page.locator("#workers tbody tr", has_text=long_id)
            expect(busy).to_have_count(1, timeout=PAGE_SECONDS * 1000)
            expect(busy.locator('[data-field="on"]')).to_have_text("sleep #2")
            expect(busy.locator(".state")).to_have_text("live")

            # The failure, with its message; looking it up by clicking its id shows how it ended.
            failure = page.locator("#failures tbody tr", has_text=failed_id)
            expect(failure).to_have_count(1, timeout=PAGE_SECONDS * 1000)
            expect(failure.locator('[data-field="code"]')).to_have_text("400")
            expect(failure.locator('[data-field="message"]')).to_contain_text("seconds")
            failure.locator("button.rid").click()
            expect(page.locator('#request [data-field="state"]')).to_have_text("failed")
            expect(page.locator('#request [data-field="status-code"]')).to_have_text("400")
            expect(page.locator('#request [data-field="timeline"]')).to_contain_text("finished")

            # The charts draw what the page saw: echo's throughput line once it has a few samples.
            points = "document.querySelector('[data-service=\"echo\"] .chart polyline')?.points.length || 0"
            page.wait_for_function(f"() => ({points}) >= {CHART_POINTS}", timeout=PAGE_SECONDS * 1000)
            page.screenshot(path=str(tmp_path / "dashboard.png"), full_page=True)
            if os.environ.get("QS_DASHBOARD_SCREENSHOT"):
                page.screenshot(path=os.environ["QS_DASHBOARD_SCREENSHOT"], full_page=True)

            # With the traffic stopped, echo's numbers settle: the page shows what the attributes say.
            traffic.stop()

            def echo_agrees() -> bool:
                attrs, sink = attributes(http, "echo"), attributes(http, "echo", "/sink")
                shown = (field(page, "echo", "waiting"), field(page, "echo", "sink"))
                assert shown == (attrs["stream.waiting"], sink["stream.length"]), (shown, attrs, sink)
                return True

            wait_for(echo_agrees, "echo's numbers to match its attributes")
            assert traffic.refused == [] and int(field(page, "echo", "sink")) > 0
            browser.close()
    finally:
        traffic.stop()
        http.close()
