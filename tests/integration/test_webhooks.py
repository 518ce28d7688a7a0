"""Webhooks, deadlines and `Prefer: wait` on the real stack: redis-server, the API, rq workers, the dispatcher
(`queue-service webhooks`) and a real receiver process that verifies every signature with `standardwebhooks`.

The receiver listens on loopback, so the services it serves set `webhook.allow_private`; the `public` service
does not, and shows what a put naming a private address gets. Nothing here connects to any address but
127.0.0.1: the refused URLs are refused before any connection.
"""

from __future__ import annotations

import base64
import itertools
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx
import pytest

from queue_service.client import Client, QueueFull, RetryPolicy
from queue_service.testing import ManagedProcess, start_api, wait_until_ready
from tests.conftest import ServicesFileFactory
from tests.integration.conftest import REQUEST_ID, ApiFactory, WorkerFactory
from tests.support.waiting import wait_until

pytestmark = pytest.mark.integration

SECRET = "whsec_" + base64.b64encode(b"receiver-secret-of-32-bytes-long").decode()
FAST_RETRIES = {"secret": SECRET, "allow_private": True, "backoff_seconds": 0.2, "timeout_seconds": 1.5}
SERVICES: list[dict[str, Any]] = [
    # A receiver on loopback: private addresses allowed; retries within a second; an attempt cut at 1.5 s.
    {"name": "hooked", "processor": "workers.examples:Echo", "webhook": {**FAST_RETRIES, "max_attempts": 3}},
    # No worker ever serves it: its requests wait, and expire.
    {"name": "nobody", "processor": "workers.examples:Echo", "webhook": FAST_RETRIES},
    {"name": "public", "processor": "workers.examples:Echo", "webhook": {"secret": SECRET}},
    {"name": "tiny", "processor": "workers.examples:Echo", "metadata": {"rpc": {"max_queue_size": 1}}},
    # Streams like an LLM (body "N D": N chunks D ms apart, progress i/N): its progress and output webhooks.
    {"name": "tokens", "processor": "workers.examples:Tokens", "webhook": {**FAST_RETRIES, "max_attempts": 3}},
]
WAIT = 60.0


class Receiver:
    def __init__(self, process: ManagedProcess, url: str) -> None:
        self.process = process
        self.url = url

    def received(self, path: str | None = None) -> list[dict[str, Any]]:
        got: list[dict[str, Any]] = httpx.get(f"{self.url}/received", timeout=10).json()
        return [r for r in got if path is None or r["path"] == path]

    def wait_for(self, path: str, count: int, timeout: float = WAIT) -> list[dict[str, Any]]:
        return wait_until(
            lambda: (found := self.received(path)) and len(found) >= count and found,
            timeout,
            f"{count} deliveries to {path}",
            interval=0.1,
        )


@pytest.fixture
def services(services_file: ServicesFileFactory) -> Path:
    return services_file(SERVICES)


@pytest.fixture
def receiver(redis_url: str, tmp_path: Path, process_logs: list[ManagedProcess]) -> Receiver:
    process, url = start_api(
        redis_url,
        None,  # type: ignore[arg-type]  # not the API: no services file
        app="tests.support.webhook_receiver:create_app",
        env={"RECEIVER_SECRET": SECRET},
        log_dir=tmp_path / "logs",
    )
    process_logs.append(process)
    return Receiver(process, url)


@pytest.fixture
def dispatcher(
    redis_url: str, services: Path, tmp_path: Path, process_logs: list[ManagedProcess]
) -> Callable[[], ManagedProcess]:
    def start() -> ManagedProcess:
        process = ManagedProcess(
            [sys.executable, "-m", "queue_service.cli", "webhooks"],
            name=f"dispatcher-{len(process_logs)}",
            env={"QS_REDIS_URL": redis_url, "QS_SERVICES": str(services)},
            log_dir=tmp_path / "logs",
        )
        process_logs.append(process)
        wait_until_ready(process, lambda: "serving" in process.log_text(), WAIT, "serving webhooks")
        return process

    return start


@pytest.fixture
def stack(api: ApiFactory, worker: WorkerFactory, services: Path, dispatcher: Callable[[], ManagedProcess]) -> str:
    running = api(services)
    worker("hooked", services_file=services)
    dispatcher()
    return running.url


@pytest.fixture
def http(stack: str) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=stack, timeout=30) as client:
        yield client


def put(http: httpx.Client, service: str, body: bytes = b"hello", **params: str) -> httpx.Response:
    response = http.post(f"/api/predict/{service}", params=params, content=body)
    assert response.status_code == 200, response.text
    return response


def status(http: httpx.Client, service: str, request_id: str) -> dict[str, Any]:
    response = http.get(f"/api/predict/{service}", params={"requestId": request_id, "_status_": "true"})
    assert response.status_code == 200, response.text
    found: dict[str, Any] = response.json()
    return found


# --- deliveries ------------------------------------------------------------------------------


def test_a_completed_request_reaches_its_webhook_signed_with_its_result(http: httpx.Client, receiver: Receiver) -> None:
    request_id = put(
        http, "hooked", _webhook_=f"{receiver.url}/ok", _webhook_events_="start,completed", user="ana"
    ).headers[REQUEST_ID]

    got = receiver.wait_for("/ok", 2)

    assert all(r["verified"] for r in got), got
    by_type = {r["payload"]["type"]: r["payload"]["data"] for r in got}
    assert set(by_type) == {"request.start", "request.completed"}
    completed = by_type["request.completed"]
    assert (completed["requestId"], completed["state"], completed["statusCode"]) == (request_id, "succeeded", 200)
    assert (completed["result"], completed["tags"]["user"]) == ("hello", "ana")
    assert {"acceptedAt", "startedAt", "finishedAt"} <= completed["timings"].keys()
    webhooks = wait_until(
        lambda: (
            (s := status(http, "hooked", request_id).get("webhooks", {}))
            and s.get("completed/1", {}).get("state") == "delivered"
            and s
        ),
        WAIT,
        "the delivery recorded as delivered",
    )
    assert webhooks["completed/1"]["attempts"] == 1


def test_a_receiver_failing_the_first_attempts_gets_the_same_webhook_id_until_it_answers(
    http: httpx.Client, receiver: Receiver
) -> None:
    request_id = put(http, "hooked", _webhook_=f"{receiver.url}/fail/2").headers[REQUEST_ID]

    got = receiver.wait_for("/fail/2", 3)

    assert len({r["webhookId"] for r in got}) == 1 and all(r["verified"] for r in got)
    record = wait_until(
        lambda: (
            (s := status(http, "hooked", request_id).get("webhooks", {}).get("completed/1", {})).get("state")
            == "delivered"
            and s
        ),
        WAIT,
        "delivered at the third attempt",
    )
    assert record["attempts"] == 3
    time.sleep(1.0)
    assert len(receiver.received("/fail/2")) == 3  # delivered: not sent again


def test_a_receiver_that_hangs_is_cut_off_and_its_delivery_dead_lettered_then_retried_by_hand(
    http: httpx.Client, receiver: Receiver, redis_url: str, services: Path
) -> None:
    request_id = put(http, "hooked", _webhook_=f"{receiver.url}/hang").headers[REQUEST_ID]
    started = time.monotonic()

    record = wait_until(
        lambda: (
            (s := status(http, "hooked", request_id).get("webhooks", {}).get("completed/1", {})).get("state") == "dead"
            and s
        ),
        WAIT,
        "dead-lettered after max_attempts",
    )

    attempts = receiver.received("/hang")
    assert len(attempts) == 3 and len({r["webhookId"] for r in attempts}) == 1
    assert record["attempts"] == 3 and "no answer within 1.5 s" in record["lastError"]
    assert time.monotonic() - started >= 3 * 1.5  # each attempt waited for its timeout, no longer than the test
    attrs = http.get("/api/predict/hooked", params={"_attrs_": "true"}).json()
    assert attrs["webhooks.dead"] == "1"
    metrics = http.get("/metrics").text
    assert 'queue_service_webhook_deliveries{service="hooked",state="dead"} 1.0' in metrics
    env = {**os.environ, "QS_REDIS_URL": redis_url, "QS_SERVICES": str(services)}
    cli = [sys.executable, "-m", "queue_service.cli", "webhooks"]
    listed = subprocess.run([*cli, "dead", "-s", "hooked"], env=env, capture_output=True, timeout=60, check=True)
    assert request_id in listed.stdout.decode() and "3 attempts" in listed.stdout.decode()

    retried = subprocess.run([*cli, "retry", "-s", "hooked", "--all"], env=env, capture_output=True, timeout=60)

    assert retried.returncode == 0 and b"1 dead letter sent again" in retried.stdout, retried.stderr
    again = receiver.wait_for("/hang", 4)
    assert again[-1]["webhookId"] == attempts[0]["webhookId"]


def test_a_receiver_answering_410_is_not_tried_again(http: httpx.Client, receiver: Receiver) -> None:
    request_id = put(http, "hooked", _webhook_=f"{receiver.url}/gone").headers[REQUEST_ID]

    receiver.wait_for("/gone", 1)
    wait_until(
        lambda: status(http, "hooked", request_id).get("webhooks", {}).get("completed/1", {}).get("state") == "gone",
        WAIT,
        "recorded as gone",
    )
    time.sleep(1.5)  # retries would come within backoff_seconds (0.2 s) and more
    assert len(receiver.received("/gone")) == 1


def test_a_dispatcher_killed_mid_delivery_delivers_it_exactly_once_more_with_the_same_id(
    api: ApiFactory,
    worker: WorkerFactory,
    services: Path,
    dispatcher: Callable[[], ManagedProcess],
    receiver: Receiver,
) -> None:
    running = api(services)
    worker("hooked", services_file=services)
    first = dispatcher()
    with httpx.Client(base_url=running.url, timeout=30) as http:
        request_id = put(http, "hooked", _webhook_=f"{receiver.url}/slow-first/1").headers[REQUEST_ID]
        receiver.wait_for("/slow-first/1", 1)  # the attempt is in flight: the receiver holds it

        first.kill()
        first.wait()
        dispatcher()

        got = receiver.wait_for("/slow-first/1", 2)
        wait_until(
            lambda: (
                status(http, "hooked", request_id).get("webhooks", {}).get("completed/1", {}).get("state")
                == "delivered"
            ),
            WAIT,
            "delivered by the new dispatcher",
        )
    time.sleep(2.0)
    assert len(receiver.received("/slow-first/1")) == 2
    assert got[0]["webhookId"] == got[1]["webhookId"]


# --- refusals at put (SSRF) ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "reason"),
    [
        ("http://127.0.0.1:9/hook", "loopback"),
        ("http://10.1.2.3/hook", "private"),
        ("http://169.254.169.254/latest/meta-data", "metadata"),
        ("http://localhost:9/hook", "resolves to 127.0.0.1"),
        ("http://[::1]:9/hook", "loopback"),
        ("ftp://example.com/hook", "http:// or https://"),
    ],
)
def test_a_webhook_to_a_private_address_is_refused_at_put(http: httpx.Client, url: str, reason: str) -> None:
    response = http.post("/api/predict/public", params={"_webhook_": url}, content=b"hello")

    assert response.status_code == 400, response.text
    assert reason in response.json()["detail"]
    attrs = http.get("/api/predict/public", params={"_attrs_": "true"}).json()
    assert attrs["stream.length"] == "0"  # nothing was stored


def test_a_webhook_on_a_service_without_webhook_settings_is_refused(http: httpx.Client) -> None:
    response = http.post("/api/predict/tiny", params={"_webhook_": "https://example.com/hook"}, content=b"x")

    assert response.status_code == 400 and "webhook.secret" in response.json()["detail"]


# --- progress and output of a streaming request -----------------------------------------------------


def first_of_each(received: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """What a receiver that dedupes on `webhook-id` (as docs/webhooks.md asks) keeps: each delivery's first arrival."""
    seen: set[str] = set()
    return [r for r in received if not (r["webhookId"] in seen or seen.add(r["webhookId"]))]


def test_a_streaming_request_sends_coalesced_progress_and_output_in_order_then_completed(
    http: httpx.Client, receiver: Receiver, worker: WorkerFactory, services: Path
) -> None:
    worker("tokens", services_file=services)
    count = 60  # 60 chunks 40 ms apart: ~2.4 s of streaming, 120 writes' worth of reports
    request_id = put(
        http, "tokens", f"{count} 40".encode(), _webhook_=f"{receiver.url}/ok-stream",
        _webhook_events_="progress,output,completed",
    ).headers[REQUEST_ID]  # fmt: skip

    running = wait_until(
        lambda: (s := status(http, "tokens", request_id)).get("progress") and s, WAIT, "progress in _status_"
    )
    assert running["state"] == "running" and 0 < running["progress"]["fraction"] <= 1
    got = wait_until(
        lambda: (
            (found := receiver.received("/ok-stream"))
            and any(r["payload"].get("type") == "request.completed" for r in found)
            and found
        ),
        WAIT,
        "the completed delivery",
    )

    assert all(r["verified"] for r in got), got
    got = first_of_each(got)  # at least once: a loaded machine may resend one (same webhook id)
    types = [r["payload"]["type"] for r in got]
    assert types[-1] == "request.completed" and types.count("request.completed") == 1
    progress = [r["payload"]["data"] for r in got if r["payload"]["type"] == "request.progress"]
    output = [r["payload"]["data"] for r in got if r["payload"]["type"] == "request.output"]
    print(f"NUMBERS {count} chunks in ~2.4 s: {len(progress)} progress and {len(output)} output webhooks")
    # Coalesced: at most one of each per second (a few for ~2.4 s), and at least one.
    assert 1 <= len(progress) <= 6 and 1 <= len(output) <= 6
    # In order: timestamps, fractions and the output so far only grow.
    stamps = [datetime.fromisoformat(r["payload"]["timestamp"]) for r in got]
    assert stamps == sorted(stamps)
    fractions = [p["progress"]["fraction"] for p in progress]
    assert fractions == sorted(fractions) and all(0 < f <= 1 for f in fractions)
    assert all(p["state"] == "running" and p["requestId"] == request_id for p in progress + output)
    result = "".join(f"t{i} " for i in range(count))
    so_far = [o["output"] for o in output]
    assert all(result.startswith(text) and text for text in so_far) and so_far == sorted(so_far, key=len)
    completed = got[-1]["payload"]["data"]
    assert (completed["state"], completed["result"]) == ("succeeded", result)
    webhooks = wait_until(
        lambda: (
            (s := status(http, "tokens", request_id).get("webhooks", {}))
            and all(s.get(f"{e}/1", {}).get("state") == "delivered" for e in ("progress", "output", "completed"))
            and s
        ),
        WAIT,
        "every delivery recorded as delivered",
    )
    assert set(webhooks) == {"progress/1", "output/1", "completed/1"}


def test_a_streaming_request_whose_webhook_asks_only_completed_gets_no_progress_or_output(
    http: httpx.Client, receiver: Receiver, worker: WorkerFactory, services: Path
) -> None:
    worker("tokens", services_file=services)
    request_id = put(http, "tokens", b"30 20", _webhook_=f"{receiver.url}/ok-plain").headers[REQUEST_ID]

    [delivery] = receiver.wait_for("/ok-plain", 1)
    time.sleep(1.0)  # anything else would have come with or before it

    assert delivery["payload"]["type"] == "request.completed" and delivery["verified"]
    assert delivery["payload"]["data"]["requestId"] == request_id
    assert len(first_of_each(receiver.received("/ok-plain"))) == 1


# --- deadlines, Prefer: wait, idempotency ----------------------------------------------------


def test_a_request_still_queued_at_its_deadline_expires_with_its_webhook(
    http: httpx.Client, receiver: Receiver
) -> None:
    request_id = put(http, "nobody", _ttl_="1s", _webhook_=f"{receiver.url}/ok").headers[REQUEST_ID]
    assert status(http, "nobody", request_id)["state"] == "queued"

    [delivery] = receiver.wait_for("/ok", 1)

    data = delivery["payload"]["data"]
    assert (data["requestId"], data["state"], data["lastCode"]) == (request_id, "expired", "408")
    found = status(http, "nobody", request_id)
    assert (found["state"], found["statusCode"]) == ("expired", 408)
    result = http.get("/api/predict/nobody/sink", params={"requestId": request_id, "_raw_": "true"})
    assert result.content == b"expired before it started" and result.headers["X-Eas-Queueservice-Last-Code"] == "408"


def test_prefer_wait_answers_the_result_when_it_is_done_in_time(http: httpx.Client) -> None:
    response = http.post("/api/predict/hooked", content=b"hello", headers={"Prefer": "wait=30"})

    assert response.status_code == 200 and response.content == b"hello"
    assert response.headers["Preference-Applied"] == "wait=30" and response.headers[REQUEST_ID]


def test_prefer_wait_answers_202_with_the_index_when_it_is_not_done_in_time(http: httpx.Client) -> None:
    started = time.monotonic()
    response = http.post("/api/predict/nobody", content=b"hello", headers={"Prefer": "wait=1"})

    assert response.status_code == 202, response.text
    assert 0.9 <= time.monotonic() - started < 20
    index, request_id = int(response.text), response.headers[REQUEST_ID]
    assert (status(http, "nobody", request_id)["state"], index) == ("queued", 1)  # the put itself stands


def test_a_put_repeated_with_its_idempotency_key_answers_the_first_put(http: httpx.Client) -> None:
    headers = {"Idempotency-Key": "order-17"}
    first = http.post("/api/predict/nobody", content=b"x", headers=headers)
    again = http.post("/api/predict/nobody", content=b"x", headers=headers)

    assert (again.text, again.headers[REQUEST_ID]) == (first.text, first.headers[REQUEST_ID])
    assert http.get("/api/predict/nobody", params={"_attrs_": "true"}).json()["stream.length"] == "1"


# --- the Python client -----------------------------------------------------------------------


def test_the_client_puts_and_gets_the_result_and_status(stack: str) -> None:
    with Client(stack, "hooked") as client:
        submitted = client.put({"text": "hi"})
        result = client.result(submitted.request_id, wait=30)
        found = client.status(submitted.request_id)

    assert result is not None and result.ok and result.json() == {"text": "hi"}
    assert (found.state, found.status_code, found.result) == ("succeeded", 200, "in_sink")


def test_the_client_retries_a_full_queue_and_gives_up_after_its_attempts(stack: str) -> None:
    sent: list[float] = []
    http = httpx.Client(base_url=stack, event_hooks={"request": [lambda request: sent.append(time.monotonic())]})
    policy = RetryPolicy(max_attempts=4, initial_seconds=0.2, max_wait_seconds=1.0, max_seconds=30)
    with Client(stack, "tiny", retry=policy, http=http) as client:
        client.put(b"fills the queue")

        with pytest.raises(QueueFull):
            client.put(b"one too many")

    attempts = sent[1:]
    assert len(attempts) == 4
    gaps = [later - earlier for earlier, later in itertools.pairwise(attempts)]
    assert all(gap >= 0.1 for gap in gaps), gaps  # backed off between attempts (jitter included)


def test_the_client_retry_succeeds_once_the_queue_has_room(stack: str) -> None:
    with Client(stack, "tiny", retry=RetryPolicy(max_attempts=20, initial_seconds=0.2, max_wait_seconds=0.5)) as c:
        first = c.put(b"fills the queue")
        freed: list[bool] = []

        def free_after_first_refusal(response: httpx.Response) -> None:
            if response.status_code == 450 and not freed:
                freed.append(c.cancel(first.request_id))

        c.http.event_hooks["response"] = [free_after_first_refusal]
        second = c.put(b"gets in on a retry")

    assert freed == [True] and second.index == first.index + 1
    assert json.loads(json.dumps(second.request_id))
