"""The status-code contract end to end: one test per (code, path) against real processes.

A real redis-server, the API under uvicorn and `rq worker` processes, driven through HTTP only
(plus the official `eas-prediction` client in its own venv). Each test checks the code, the body
and the side effects the contract promises: withdrawn items never run, every request is logged
once with its final status, 500 is only for real internal faults.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import time
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from email.utils import formatdate
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import pytest
import redis
from websockets.exceptions import InvalidStatus
from websockets.sync.client import connect as ws_connect

from queue_service.api.auth import sign
from queue_service.embedded_redis import RedisServer
from queue_service.protocol import REQUEST_ID_HEADER
from queue_service.store import keys
from queue_service.testing import ManagedProcess, start_api, start_worker, write_services
from tests.support.eas import run_eas
from tests.support.waiting import wait_until

# One stack for the module, whose tests take turns on the busy worker and whose last test reads the
# whole access log: on one xdist worker, in file order.
pytestmark = [pytest.mark.integration, pytest.mark.xdist_group("status_codes")]

ECHO_TOKEN = "echo-token-3f9a"
OTHER_TOKEN = "other-token-81c2"
ECHO = "workers.examples:Echo"
SLEEP = "workers.examples:Sleep"
RATE = 5  # requests per second of the rate-limited services
BURST_ATTEMPTS = 8  # a loaded box may be too slow for a one-second burst a few times in a row
REFILL_SECONDS = 1.5  # a GCRA limit with a one-second burst is full again after one second without requests
SLOW_KEEPALIVE_MS = 1000
IDLE_KEEPALIVE_SECONDS = 5  # metadata.rpc.keepalive's default
BOUND = 6
LOAD_CLIENTS = 200
# Sized so that all three answers come even on a starved machine (two workers finish some items within
# keepalive, the rest of the queue cannot drain, the clients outnumber the queue), and so that a queue
# ignoring keepalive would keep its last client far longer: LOAD_QUEUE items x LOAD_ITEM_SECONDS / 2 = 12.8 s.
LOAD_KEEPALIVE_MS = 3000
LOAD_QUEUE = 128
LOAD_ITEM_SECONDS = 0.2
# How late after keepalive the slowest answer may be, by the server's clock (~0.1 s on a quiet machine).
# The clients' clock adds connecting and reading with 200 clients in one process: printed, not asserted.
SERVER_LATE_SECONDS = 2
# Fillers of the busy worker: a 408 or a 450 must come well before the filler ends.
SLOW_FILLER_SECONDS = 2.5
BOUNDED_FILLER_SECONDS = 5
# A line is logged (or a result written) just after the answer went out: wait for it, never assume it.
SEEN_WITHIN_SECONDS = 15

SERVICES: list[dict[str, Any]] = [
    {"name": "echo", "processor": ECHO, "token": ECHO_TOKEN},
    {"name": "other", "processor": ECHO, "token": OTHER_TOKEN},
    {"name": "sleep", "processor": SLEEP},
    {"name": "small", "processor": ECHO, "queue": {"max_payload_size_kb": 1}},
    {"name": "limited", "processor": ECHO, "metadata": {"rpc": {"rate_limit": RATE}}},
    {"name": "limited-sync", "processor": ECHO, "metadata": {"rpc": {"rate_limit": RATE}}},
    {"name": "idle", "processor": ECHO},  # never has a worker
    {"name": "broken", "processor": ECHO},  # its Redis keys get corrupted: the one real 500
    {"name": "mortal", "processor": ECHO},  # its only worker is killed
    {"name": "slow", "processor": SLEEP, "metadata": {"rpc": {"keepalive": SLOW_KEEPALIVE_MS}}},
    {"name": "hold", "processor": SLEEP, "metadata": {"rpc": {"keepalive": 5000}}},
    {"name": "bounded", "processor": SLEEP, "metadata": {"rpc": {"keepalive": 10_000, "max_queue_size": BOUND}}},
    {
        "name": "load",
        "processor": SLEEP,
        "metadata": {"rpc": {"keepalive": LOAD_KEEPALIVE_MS, "max_queue_size": LOAD_QUEUE}},
    },
]
# Which services each worker process serves. The "busy" worker is filled with long sleeps by one
# test at a time (408, 450, 499), and each of those tests lets it drain before it ends.
WORKERS: dict[str, list[str]] = {
    "quick": ["echo", "other", "sleep", "small", "limited", "limited-sync"],
    "busy": ["slow", "hold", "bounded"],
    "load-1": ["load"],
    "load-2": ["load"],
}


def has_request_id(response: httpx.Response) -> None:
    assert response.headers.get(REQUEST_ID_HEADER), f"{response.request.url}: no request id header"


def post_until(http: httpx.Client, path: str, status: int, timeout: float, what: str) -> httpx.Response:
    """POST b"x" to `path` until it answers `status`; return that answer."""

    def answer() -> httpx.Response | None:
        got = http.post(path, content=b"x")
        return got if got.status_code == status else None

    return wait_until(answer, timeout, what, interval=0.2)


def access_log(*apis: ManagedProcess) -> list[dict[str, Any]]:
    """The JSON access-log lines the API processes wrote so far."""
    records = []
    for api in apis:
        for line in api.log_text().splitlines():
            if line.startswith('{"request_id"'):
                records.append(json.loads(line))
    return records


@dataclass
class Stack:
    redis_server: RedisServer
    store: redis.Redis  # a client of the test's own Redis, to look at what the API left there
    services_file: Path
    log_dir: Path
    url: str
    apis: list[ManagedProcess]
    workers: dict[str, ManagedProcess]
    expected_500: set[str] = field(default_factory=set)

    @property
    def api(self) -> ManagedProcess:
        return self.apis[0]

    def client(self, url: str | None = None, **kwargs: Any) -> httpx.Client:
        """An HTTP client that also checks that every answer carries a request id."""
        return httpx.Client(base_url=url or self.url, timeout=20, event_hooks={"response": [has_request_id]}, **kwargs)

    def attrs(self, service: str) -> dict[str, str]:
        token = {"echo": ECHO_TOKEN, "other": OTHER_TOKEN}.get(service, "")
        answer = httpx.get(
            f"{self.url}/api/predict/{service}?_attrs_=true", headers={"Authorization": token}, timeout=5
        )
        assert answer.status_code == 200, answer.text
        return answer.json()

    def log_lines(self, request_id: str) -> list[dict[str, Any]]:
        return [r for r in access_log(*self.apis) if r["request_id"] == request_id]

    def logged(self, request_id: str) -> list[dict[str, Any]]:
        """The log lines of `request_id`, once there is one: the API writes it after sending the answer."""
        return wait_until(lambda: self.log_lines(request_id), SEEN_WITHIN_SECONDS, f"{request_id} logged")

    def worker_ran(self, request_id: str) -> bool:
        return any(f"request_id={request_id} " in w.log_text() for w in self.workers.values())

    def wait_ran(self, request_id: str) -> None:
        """A worker logs an item after its result went out: wait for the line."""
        wait_until(lambda: self.worker_ran(request_id), SEEN_WITHIN_SECONDS, f"a worker logged {request_id}")

    def occupy_busy_worker(self, service: str, seconds: float) -> str:
        """Put one long sleep and return its request id once the busy worker holds it."""
        put = httpx.post(f"{self.url}/api/predict/{service}", content=str(seconds).encode(), timeout=5)
        assert put.status_code == 200, put.text
        wait_until(
            lambda: self.attrs(service)["stream.inFlight"] == "1", SEEN_WITHIN_SECONDS, f"{service} filler taken"
        )
        return put.headers[REQUEST_ID_HEADER]

    def wait_for_result(self, service: str, request_id: str, timeout: float = 10) -> httpx.Response:
        got = httpx.get(
            f"{self.url}/api/predict/{service}/sink",
            params={"requestId": request_id, "_timeout_": f"{timeout:g}s", "_raw_": "true"},
            timeout=timeout + 5,
        )
        assert got.status_code == 200, f"no result for {request_id}: {got.status_code} {got.text}"
        return got


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    log_dir = tmp_path_factory.mktemp("status-codes")
    services_file = write_services(log_dir / "services.yaml", SERVICES)
    with RedisServer(data_dir=log_dir / "redis") as server:
        store = redis.Redis.from_url(server.url)
        api, url = start_api(server.url, services_file, log_dir=log_dir)
        with ThreadPoolExecutor(len(WORKERS)) as pool:
            started = {
                role: pool.submit(
                    start_worker, server.url, services_file, names, name=f"{role}-worker", log_dir=log_dir
                )
                for role, names in WORKERS.items()
            }
            workers = {role: future.result() for role, future in started.items()}
        stack = Stack(server, store, services_file, log_dir, url, [api], workers)
        # Sync requests need a heartbeat first (503 without one).
        wait_until(lambda: all(stack.attrs(s)["workers.live"] != "0" for s in ("echo", "slow", "load")), 10, "live")
        try:
            yield stack
        finally:
            for process in [*workers.values(), *stack.apis]:
                process.stop()
            store.close()


@pytest.fixture(scope="module")
def second_api(stack: Stack) -> str:
    """Another API process on the same Redis and services file (as a second replica would be)."""
    process, url = start_api(stack.redis_server.url, stack.services_file, log_dir=stack.log_dir)
    stack.apis.append(process)
    return url


# --- 200 ----------------------------------------------------------------------------------


def test_200_async_put_answers_the_index_and_the_worker_result_reaches_the_sink(stack: Stack) -> None:
    with stack.client(headers={"Authorization": ECHO_TOKEN}) as http:
        put = http.post("/api/predict/echo", content=b"hello async")
        assert put.status_code == 200
        assert put.text.isdigit()
        request_id = put.headers[REQUEST_ID_HEADER]
        got = http.get("/api/predict/echo/sink", params={"requestId": request_id, "_timeout_": "10s", "_raw_": "true"})
    assert got.status_code == 200
    assert got.content == b"hello async"
    assert [r["status"] for r in stack.logged(request_id)] == [200]


def test_200_sync_answers_with_the_processor_output(stack: Stack) -> None:
    with stack.client() as http:
        echoed = http.post("/api/predict/echo/sync", content=b"\x00\xffbytes", headers={"Authorization": ECHO_TOKEN})
        slept = http.post("/api/predict/sleep/sync", content=b"0.01")
    assert echoed.status_code == 200
    assert echoed.content == b"\x00\xffbytes"
    assert slept.status_code == 200
    assert slept.json() == {"slept": 0.01}
    request_id = echoed.headers[REQUEST_ID_HEADER]
    stack.wait_ran(request_id)
    assert [r["status"] for r in stack.logged(request_id)] == [200]
    # The request's one log line splits its time: waiting in the queue, then in the processor.
    [slept_line] = stack.logged(slept.headers[REQUEST_ID_HEADER])
    assert slept_line["processing_ms"] >= 10
    assert 0 <= slept_line["queue_wait_ms"] < slept_line["duration_ms"]


# --- 400 ----------------------------------------------------------------------------------


def test_400_sync_processor_exception_answers_its_message(stack: Stack) -> None:
    with stack.client() as http:
        failed = http.post("/api/predict/sleep/sync", content=b"abc")
    assert failed.status_code == 400
    assert "ValueError" in failed.text
    assert "Sleep expects" in failed.text
    assert "b'abc'" in failed.text


def test_400_async_processor_exception_lands_in_the_sink_with_last_code(stack: Stack) -> None:
    with stack.client() as http:
        put = http.post("/api/predict/sleep", content=b"abc")
    assert put.status_code == 200
    result = stack.wait_for_result("sleep", put.headers[REQUEST_ID_HEADER])
    assert result.headers["X-Eas-Queueservice-Last-Code"] == "400"
    assert b"Sleep expects" in result.content


@pytest.mark.parametrize(
    ("method", "path", "named"),
    [
        ("GET", "/api/predict/echo?_index_=abc", "_index_"),
        ("GET", "/api/predict/echo/sink?_index_=-1&_search_=true", "_index_"),
        ("POST", "/api/predict/echo?_foo_=1", "_foo_"),
        ("POST", "/api/predict/echo/sync?_foo_=1", "_foo_"),
    ],
)
def test_400_malformed_request_names_the_bad_parameter(stack: Stack, method: str, path: str, named: str) -> None:
    with stack.client(headers={"Authorization": ECHO_TOKEN}) as http:
        answer = http.request(method, path, content=b"x" if method == "POST" else None)
    assert answer.status_code == 400
    assert named in answer.json()["detail"]


# --- 401 ----------------------------------------------------------------------------------

PATHS = ["/api/predict/echo", "/api/predict/echo/sync"]


def signed_headers(token: str, path: str, body: bytes, date: str) -> dict[str, str]:
    content_type = "application/octet-stream"
    signature = sign(token, method="POST", path=path, body=body, content_type=content_type, date=date)
    return {"Authorization": f"EAS {signature}", "Date": date, "Content-Type": content_type}


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize(
    ("authorization", "problem"),
    [(None, "missing"), ("not-the-token", "wrong"), (f"Bearer {OTHER_TOKEN}", "wrong"), (OTHER_TOKEN, "wrong")],
)
def test_401_missing_or_wrong_token(stack: Stack, path: str, authorization: str | None, problem: str) -> None:
    headers = {"Authorization": authorization} if authorization else {}
    with stack.client() as http:
        refused = http.post(path, content=b"x", headers=headers)
    assert refused.status_code == 401
    assert problem in refused.json()["detail"]
    assert refused.headers[REQUEST_ID_HEADER]


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("form", ["raw", "bearer", "signed"])
def test_200_with_each_accepted_token_form(stack: Stack, path: str, form: str) -> None:
    body = f"{form} form".encode()
    headers = {
        "raw": {"Authorization": ECHO_TOKEN},
        "bearer": {"Authorization": f"Bearer {ECHO_TOKEN}"},
        "signed": signed_headers(ECHO_TOKEN, path, body, formatdate(usegmt=True)),
    }[form]
    with stack.client() as http:
        accepted = http.post(path, content=body, headers=headers)
    assert accepted.status_code == 200, accepted.text
    if path.endswith("/sync"):
        assert accepted.content == body
    else:
        assert accepted.text.isdigit()


@pytest.mark.parametrize("path", PATHS)
def test_401_signed_request_with_a_stale_date_or_another_path_is_refused(stack: Stack, path: str) -> None:
    body = b"replayed"
    stale = signed_headers(ECHO_TOKEN, path, body, formatdate(time.time() - 3600, usegmt=True))
    # A signature captured on the other service's path opens nothing here.
    elsewhere = signed_headers(ECHO_TOKEN, path.replace("echo", "other"), body, formatdate(usegmt=True))
    with stack.client() as http:
        too_old = http.post(path, content=body, headers=stale)
        misplaced = http.post(path, content=body, headers=elsewhere)
        tampered = http.post(path, content=b"changed", headers=signed_headers(ECHO_TOKEN, path, body, formatdate()))
    assert too_old.status_code == 401
    assert "away from server time" in too_old.json()["detail"]
    assert misplaced.status_code == 401
    assert tampered.status_code == 401
    assert "wrong signature" in tampered.json()["detail"]


def test_401_one_services_token_never_opens_another_services_queues(stack: Stack) -> None:
    with stack.client(headers={"Authorization": ECHO_TOKEN}) as http:
        answers = [
            http.post("/api/predict/other", content=b"x"),
            http.post("/api/predict/other/sync", content=b"x"),
            http.get("/api/predict/other/sink"),
            http.get("/api/predict/other?_attrs_=true"),
            http.delete("/api/predict/other?_indexes_=1"),
        ]
        own = http.post("/api/predict/other/sync", content=b"x", headers={"Authorization": OTHER_TOKEN})
    assert [a.status_code for a in answers] == [401] * len(answers)
    assert own.status_code == 200


# --- the official client ------------------------------------------------------------------

PREDICT_CLIENT = r"""
import json, sys
from eas_prediction import PredictClient, StringRequest
from eas_prediction.exception import PredictException

url, cases = sys.argv[1], json.loads(sys.argv[2])
answers = []
for case in cases:
    if case["form"] == "raw":  # a custom URL makes the client send the bare token
        client = PredictClient(custom_url=url + "/api/predict/" + case["service"])
    else:  # the default: Authorization: EAS <hmac-sha1 signature>
        client = PredictClient(url, case["service"])
    client.set_token(case["token"])
    client.set_retry_count(1)
    client.init()
    try:
        answer = client.predict(StringRequest(case["body"]))
        answers.append({"status": 200, "body": answer.response_data.decode()})
    except PredictException as exc:
        answers.append({"status": exc.code, "body": str(exc.message)})
    client.destroy()
print(json.dumps(answers))
"""


def test_predict_client_end_to_end_with_raw_and_signed_tokens(stack: Stack) -> None:
    cases = [
        {"form": "raw", "service": "echo/sync", "token": ECHO_TOKEN, "body": "raw token"},
        {"form": "signed", "service": "echo/sync", "token": ECHO_TOKEN, "body": "signed token"},
        {"form": "signed", "service": "echo", "token": ECHO_TOKEN, "body": "signed put"},
        {"form": "signed", "service": "echo/sync", "token": OTHER_TOKEN, "body": "other token"},
        {"form": "raw", "service": "echo/sync", "token": "wrong", "body": "wrong token"},
    ]
    ran = run_eas(PREDICT_CLIENT, stack.url, json.dumps(cases), timeout=60)
    assert ran.returncode == 0, ran.stderr
    raw, signed, signed_put, other, wrong = json.loads(ran.stdout.strip().splitlines()[-1])
    assert raw == {"status": 200, "body": "raw token"}
    assert signed == {"status": 200, "body": "signed token"}
    assert signed_put["status"] == 200
    assert signed_put["body"].isdigit()
    assert other["status"] == 401
    assert "signature" in other["body"]
    assert wrong["status"] == 401


def test_401_on_a_watch_refuses_the_handshake_and_both_answers_are_logged(stack: Stack) -> None:
    url = stack.url.replace("http://", "ws://") + "/api/predict/echo/sink?_watch_=true"
    with pytest.raises(InvalidStatus) as refused:
        ws_connect(url, additional_headers={"Authorization": OTHER_TOKEN}, open_timeout=5).close()
    answer = refused.value.response
    assert answer.status_code == 401
    assert json.loads(answer.body) == {"detail": "wrong token"}
    refused_id = answer.headers[REQUEST_ID_HEADER]
    with ws_connect(url, additional_headers={"Authorization": ECHO_TOKEN}, open_timeout=5) as accepted:
        accepted_id = accepted.response.headers[REQUEST_ID_HEADER]
    lines = stack.logged(accepted_id)  # when the watch ended
    assert [r["status"] for r in lines] == [101]
    assert [r["status"] for r in stack.logged(refused_id)] == [401]


# --- 404, 405, 413 ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("method", "path", "named"),
    [
        ("POST", "/api/predict/nope", "service 'nope' not found"),
        ("POST", "/api/predict/nope/sync", "service 'nope' not found"),
        ("GET", "/api/predict/nope/sink", "service 'nope' not found"),
        ("GET", "/api/nothing", "no such path: /api/nothing"),
        # `/sync/<path>` and `/<path>` are sub-paths the processor gets; none is under the sink.
        ("POST", "/api/predict/echo/sink/extra", "no such path: /api/predict/echo/sink/extra"),
    ],
)
def test_404_names_what_was_not_found(stack: Stack, method: str, path: str, named: str) -> None:
    with stack.client(headers={"Authorization": ECHO_TOKEN}) as http:
        missing = http.request(method, path)
    assert missing.status_code == 404
    assert missing.json() == {"detail": named}


@pytest.mark.parametrize(
    ("method", "path", "allow"),
    [
        ("GET", "/api/predict/echo/sync", {"POST"}),
        ("PATCH", "/api/predict/echo", {"GET", "HEAD", "POST", "DELETE", "PUT"}),
        ("PATCH", "/api/predict/echo/sink", {"GET", "HEAD", "POST", "DELETE", "PUT"}),
        ("POST", "/healthz", {"GET"}),
    ],
)
def test_405_lists_the_allowed_methods(stack: Stack, method: str, path: str, allow: set[str]) -> None:
    with stack.client(headers={"Authorization": ECHO_TOKEN}) as http:
        refused = http.request(method, path)
    assert refused.status_code == 405
    assert {m.strip() for m in refused.headers["Allow"].split(",")} == allow
    assert method in refused.json()["detail"]


@pytest.mark.parametrize("path", ["/api/predict/small", "/api/predict/small/sync"])
@pytest.mark.parametrize("declared", [True, False], ids=["content-length", "chunked"])
def test_413_body_over_the_payload_limit(stack: Stack, path: str, declared: bool) -> None:
    body = b"x" * 1500

    def chunks() -> Iterator[bytes]:
        yield body[:700]
        yield body[700:]

    with stack.client() as http:
        refused = http.post(path, content=body if declared else chunks())
        fits = http.post(path, content=body[:1024])
    assert refused.status_code == 413
    assert "1024 bytes" in refused.json()["detail"]
    assert fits.status_code == 200


# --- 408 ----------------------------------------------------------------------------------


def test_408_sync_request_still_waiting_at_keepalive_is_withdrawn_and_never_runs(stack: Stack) -> None:
    filler = stack.occupy_busy_worker("slow", SLOW_FILLER_SECONDS)
    started = time.monotonic()
    with stack.client() as http:
        late = http.post("/api/predict/slow/sync", content=b"0")
    elapsed = time.monotonic() - started
    assert late.status_code == 408
    # Answered at keepalive, not once the worker was free again (the filler's end).
    assert SLOW_KEEPALIVE_MS / 1000 <= elapsed < SLOW_FILLER_SECONDS, f"408 after {elapsed:.2f} s"
    assert late.headers["Connection"] == "close"
    assert "withdrawn" in late.json()["detail"]
    request_id = late.headers[REQUEST_ID_HEADER]
    [line] = stack.logged(request_id)
    assert line["status"] == 408
    assert line["withdrawn"] is True
    # Once the worker is free again, nothing of the withdrawn request is left for it to run.
    stack.wait_for_result("slow", filler)
    time.sleep(0.5)
    assert not stack.worker_ran(request_id)
    assert stack.attrs("slow")["stream.length"] == "0"


def test_408_started_request_finishes_but_its_late_result_never_reaches_the_sink(stack: Stack) -> None:
    with stack.client() as http:
        late = http.post("/api/predict/slow/sync", content=b"1.5")
    assert late.status_code == 408
    assert "withdrawn" not in late.json()["detail"]
    request_id = late.headers[REQUEST_ID_HEADER]
    [line] = stack.logged(request_id)
    assert line["withdrawn"] is False
    stack.wait_ran(request_id)  # the started request finished
    assert stack.attrs("slow")["stream.length"] == "0"
    with stack.client() as http:
        orphan = http.get("/api/predict/slow/sink", params={"requestId": request_id})
    assert orphan.status_code == 204
    # The answer went to the API process's reply stream, where nobody waits for it any more, and it expires.
    [stream] = stack.store.keys(keys.replies("slow", "*"))
    answers = [fields for _, fields in stack.store.xrange(stream)]
    assert [a[b"rid"] for a in answers if a[b"rid"] == request_id.encode()] == [request_id.encode()]
    assert stack.store.pttl(stream) > 0


# --- 429 ----------------------------------------------------------------------------------


@pytest.mark.parametrize(("service", "suffix"), [("limited", ""), ("limited-sync", "/sync")])
@pytest.mark.quiet  # needs a burst within one second
async def test_429_rate_limit_is_shared_by_two_api_processes(
    stack: Stack, second_api: str, service: str, suffix: str
) -> None:
    per_api = 2 * RATE
    bases = (stack.url, second_api)
    admitted = 0
    limits = httpx.Limits(max_connections=2 * per_api, max_keepalive_connections=2 * per_api)
    async with httpx.AsyncClient(timeout=20, limits=limits) as http:
        # Connections opened beforehand: the burst itself is then quick even on a loaded machine.
        await asyncio.gather(*(http.get(f"{base}/healthz") for _ in range(per_api) for base in bases))
        for _ in range(BURST_ATTEMPTS):
            started = time.monotonic()
            answers = await asyncio.gather(
                *(
                    http.post(f"{base}/api/predict/{service}{suffix}", content=b"x")
                    for _ in range(per_api)
                    for base in bases
                )
            )
            elapsed = time.monotonic() - started
            statuses = Counter(a.status_code for a in answers)
            admitted += statuses[200]
            assert set(statuses) == {200, 429}
            # One second's burst, plus what refills while the burst lasts, for both API processes together.
            assert RATE <= statuses[200] <= RATE + int(elapsed * RATE) + 1
            if RATE + int(elapsed * RATE) + 1 < 2 * RATE:
                break  # quick enough that two separate limits would have shown (they admit 2 * RATE)
            await asyncio.sleep(REFILL_SECONDS)  # too slow to tell: let the limit refill, burst again
        else:
            pytest.fail(f"no burst of {2 * per_api} requests within {(RATE - 1) / RATE:g} s: cannot tell the limits")
    print(f"\nTIMING burst of {2 * per_api} requests on two API processes: {elapsed:.3f} s")
    for base in bases:
        assert any(a.status_code == 429 for a in answers if str(a.url).startswith(base))
    for refused in (a for a in answers if a.status_code == 429):
        assert int(refused.headers["Retry-After"]) >= 1
        assert "rate limit" in refused.json()["detail"]
    if not suffix:  # refused at once, never queued
        assert stack.attrs(service)["stream.lastIndex"] == str(admitted)


# --- 450 ----------------------------------------------------------------------------------


async def test_450_sync_and_async_compete_for_the_same_bound(stack: Stack) -> None:
    filler = stack.occupy_busy_worker("bounded", BOUNDED_FILLER_SECONDS)
    per_path = 2 * BOUND

    async def timed(http: httpx.AsyncClient, path: str) -> tuple[str, int, float]:
        started = time.monotonic()
        answer = await http.post(path, content=b"0")
        return path, answer.status_code, time.monotonic() - started

    async with httpx.AsyncClient(base_url=stack.url, timeout=20) as http:
        answers = await asyncio.gather(
            *(
                timed(http, path)
                for _ in range(per_path)
                for path in ("/api/predict/bounded/sync", "/api/predict/bounded")
            )
        )
    statuses = Counter(status for _, status, _ in answers)
    assert statuses == {200: BOUND, 450: 2 * per_path - BOUND}
    # Neither path can take every slot, so both met the full queue; and a full queue refuses at once.
    assert {path for path, status, _ in answers if status == 450} == {
        "/api/predict/bounded/sync",
        "/api/predict/bounded",
    }
    # Refused at once: not held until the filler ends and makes room.
    slowest_450 = max(seconds for _, status, seconds in answers if status == 450)
    print(f"\nTIMING slowest 450 with a full queue: {slowest_450:.3f} s")
    assert slowest_450 < BOUNDED_FILLER_SECONDS / 2
    stack.wait_for_result("bounded", filler, timeout=BOUNDED_FILLER_SECONDS + 10)
    wait_until(lambda: stack.attrs("bounded")["stream.length"] == "0", SEEN_WITHIN_SECONDS, "bounded drained")


# --- 499 ----------------------------------------------------------------------------------


def test_499_client_gone_during_sync_wait_is_logged_and_withdrawn(stack: Stack) -> None:
    filler = stack.occupy_busy_worker("hold", 2.5)
    address = urlsplit(stack.url)
    with socket.create_connection((address.hostname, address.port)) as conn:
        conn.sendall(b"POST /api/predict/hold/sync HTTP/1.1\r\nHost: test\r\nContent-Length: 1\r\n\r\n0")
        # Leave only once the request waits in the queue behind the filler.
        wait_until(lambda: stack.attrs("hold")["stream.waiting"] == "1", SEEN_WITHIN_SECONDS, "the sync request queued")

    def gone_line() -> dict[str, Any] | None:
        return next((r for r in access_log(stack.api) if r["path"] == "/api/predict/hold/sync"), None)

    line = wait_until(gone_line, SEEN_WITHIN_SECONDS, "the gone client's request logged")
    assert line["status"] == 499
    assert line["withdrawn"] is True
    assert len(stack.log_lines(line["request_id"])) == 1
    stack.wait_for_result("hold", filler)
    time.sleep(0.5)
    assert not stack.worker_ran(line["request_id"])
    assert stack.attrs("hold")["stream.length"] == "0"


# --- 503 ----------------------------------------------------------------------------------


def test_503_sync_without_a_live_worker_at_once_while_async_puts_are_accepted(stack: Stack) -> None:
    with stack.client() as http:
        started = time.monotonic()
        refused = http.post("/api/predict/idle/sync", content=b"x")
        elapsed = time.monotonic() - started
        put = http.post("/api/predict/idle", content=b"x")
    assert refused.status_code == 503
    assert "no healthy upstream" in refused.json()["detail"]
    assert elapsed < IDLE_KEEPALIVE_SECONDS / 2, f"503 after {elapsed:.2f} s: it waited for a worker"
    assert put.status_code == 200
    attrs = stack.attrs("idle")
    assert attrs["workers.live"] == "0"
    assert attrs["meta.state"] == "NoWorker"
    assert attrs["stream.waiting"] == "1"


def test_503_sync_soon_after_the_only_worker_dies(stack: Stack) -> None:
    worker = start_worker(stack.redis_server.url, stack.services_file, ["mortal"], log_dir=stack.log_dir)
    try:
        with stack.client() as http:
            served = post_until(http, "/api/predict/mortal/sync", 200, SEEN_WITHIN_SECONDS, "served by the new worker")
            assert served.content == b"x"
            os.kill(worker.pid, signal.SIGKILL)  # no goodbye: only the missing heartbeats tell
            killed = time.monotonic()
            refused = post_until(http, "/api/predict/mortal/sync", 503, 20, "refused after the worker died")
    finally:
        worker.stop()
    # Soon: once its liveness (5 s) lapses, not after rq's worker TTL (minutes).
    assert time.monotonic() - killed < 15
    assert "no healthy upstream" in refused.json()["detail"]


def test_503_while_redis_is_down_then_recovery_without_restarting_the_api(tmp_path: Path) -> None:
    services_file = write_services(tmp_path / "services.yaml", [{"name": "echo", "processor": ECHO}])
    with RedisServer(data_dir=tmp_path / "redis") as server:
        api, url = start_api(server.url, services_file, log_dir=tmp_path)
        try:
            with httpx.Client(base_url=url, timeout=20) as http:
                assert http.post("/api/predict/echo", content=b"before").status_code == 200
                server.kill()
                down = [
                    http.post("/api/predict/echo", content=b"during"),
                    http.post("/api/predict/echo/sync", content=b"during"),
                    http.get("/api/predict/echo?_attrs_=true"),
                ]
                server.restart()
                back = post_until(http, "/api/predict/echo", 200, 20, "accepted again after Redis came back")
            assert api.is_running()
        finally:
            api.stop()
    for answer in down:
        assert answer.status_code == 503
        assert "Redis" in answer.json()["detail"]
        assert answer.headers[REQUEST_ID_HEADER]
    assert back.text.isdigit()
    assert 500 not in {r["status"] for r in access_log(api)}


# --- 500 ----------------------------------------------------------------------------------


def test_500_only_for_an_internal_fault_with_the_request_id_to_find_its_log(stack: Stack) -> None:
    # Corrupted storage is a fault of ours, not of the request.
    stack.store.set(keys.input_queue("broken").seq, "not a number")
    with stack.client() as http:
        failed = http.post("/api/predict/broken", content=b"x")
    assert failed.status_code == 500
    request_id = failed.headers[REQUEST_ID_HEADER]
    stack.expected_500.add(request_id)
    assert request_id in failed.json()["detail"]
    assert "Traceback" not in failed.text
    assert [r["status"] for r in stack.logged(request_id)] == [500]


# --- acceptance: 200 concurrent sync clients ----------------------------------------------


@pytest.mark.quiet  # 200 clients against a 3 s keepalive: a busy box answers them all 408
async def test_200_concurrent_sync_clients_get_200_408_or_450_within_keepalive(stack: Stack) -> None:
    keepalive = LOAD_KEEPALIVE_MS / 1000

    unexpected: list[str] = []

    async def one(http: httpx.AsyncClient) -> tuple[int, float, str]:
        started = time.monotonic()
        answer = await http.post("/api/predict/load/sync", content=str(LOAD_ITEM_SECONDS).encode())
        if answer.status_code not in (200, 408, 450):
            unexpected.append(f"{answer.status_code} {answer.text[:200]}")
        return answer.status_code, time.monotonic() - started, answer.headers[REQUEST_ID_HEADER]

    limits = httpx.Limits(max_connections=LOAD_CLIENTS, max_keepalive_connections=LOAD_CLIENTS)
    async with httpx.AsyncClient(base_url=stack.url, timeout=30, limits=limits) as http:
        answers = await asyncio.gather(*(one(http) for _ in range(LOAD_CLIENTS)))
    counts = Counter(status for status, _, _ in answers)
    slowest = max(seconds for _, seconds, _ in answers)

    def logged() -> dict[str, dict[str, Any]]:
        return {r["request_id"]: r for r in access_log(stack.api) if r["path"] == "/api/predict/load/sync"}

    # Each request was logged once (the line follows its answer), with the status its client got.
    lines = wait_until(lambda: len(found := logged()) >= LOAD_CLIENTS and found, SEEN_WITHIN_SECONDS, "all logged")
    slowest_logged = max(r["duration_ms"] for r in lines.values()) / 1000
    print(
        f"\nTIMING {LOAD_CLIENTS} sync clients: {dict(counts)}; slowest answer {slowest:.3f} s at the client, "
        f"{slowest_logged:.3f} s in the server log (keepalive {keepalive:g} s)"
    )
    assert set(counts) <= {200, 408, 450}, Counter(unexpected)
    assert sum(counts.values()) == LOAD_CLIENTS
    assert counts[200] and counts[408] and counts[450], counts
    # Nobody waited for the queue past keepalive (ignoring it, the last one queued would wait 12.8 s).
    assert slowest_logged < keepalive + SERVER_LATE_SECONDS
    assert len(lines) == LOAD_CLIENTS
    assert Counter(r["status"] for r in lines.values()) == counts
    # Withdrawn 408s never ran; the others did, exactly once.
    ran = [rid for _, _, rid in answers if lines[rid]["status"] == 200 or lines[rid].get("withdrawn") is False]
    wait_until(lambda: stack.attrs("load")["stream.length"] == "0", SEEN_WITHIN_SECONDS, "load drained")

    def worker_logs() -> str:
        return "".join(stack.workers[role].log_text() for role in ("load-1", "load-2"))

    wait_until(lambda: worker_logs().count(" load #") >= len(ran), SEEN_WITHIN_SECONDS, "every started one finished")
    time.sleep(0.3)
    assert worker_logs().count(" load #") == len(ran)
    assert all(f"request_id={rid} " in worker_logs() for rid in ran)


# --- last: no request of this module was answered 500 but the deliberate one ---------------


def test_500_never_for_bad_input_or_any_other_row_of_the_table(stack: Stack) -> None:
    records = access_log(*stack.apis)
    assert len(records) > 100
    assert {r["request_id"] for r in records if r["status"] == 500} == stack.expected_500
    assert "Traceback" not in "".join(w.log_text() for w in stack.workers.values())
