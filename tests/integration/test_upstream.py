"""An HTTP model server behind the queue (a service's `upstream`): what reaches it, what comes back, and what
happens when it is down, hangs or fails. The upstream is a real uvicorn process (bench/echo_upstream.py)."""

from __future__ import annotations

import asyncio
import base64
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis
import redis.asyncio

from queue_service.embedded_redis import free_port
from queue_service.store import keys
from queue_service.store.queues import QueueStore
from queue_service.testing import ManagedProcess, spawn_api, start_worker, wait_answering
from tests.conftest import ServicesFileFactory
from tests.integration.conftest import REQUEST_ID, Api, ApiFactory, WorkerFactory
from tests.support.counts import assert_counts_true
from tests.support.waiting import wait_until

pytestmark = pytest.mark.integration

TOKEN = "client-token"
THREADS = 8


def start_upstream(tmp_path: Path, port: int) -> ManagedProcess:
    process, url = spawn_api("", None, port=port, app="bench.echo_upstream:create_app", log_dir=tmp_path / "logs")
    wait_answering(process, f"{url}/health")
    return process


@pytest.fixture
def upstream_port() -> int:
    return free_port()


@pytest.fixture
def upstream(tmp_path: Path, upstream_port: int, process_logs: list[ManagedProcess]) -> Callable[[], ManagedProcess]:
    def start() -> ManagedProcess:
        process = start_upstream(tmp_path, upstream_port)
        process_logs.append(process)
        return process

    return start


@pytest.fixture
def services(services_file: ServicesFileFactory, upstream_port: int) -> Path:
    root = f"http://127.0.0.1:{upstream_port}"
    quick = {"timeout": 1, "retries": 1, "backoff_seconds": 0.1, "health_interval_seconds": 0.2}
    return services_file(
        [
            {
                "name": "llm",
                "upstream": {"url": root, **quick},
                "token": TOKEN,
                "metadata": {"rpc": {"worker_threads": THREADS, "keepalive": 20_000}},
            },
            {"name": "inspect", "upstream": {"url": f"{root}/inspect/plain", **quick}, "token": TOKEN},
            {"name": "fails", "upstream": {"url": f"{root}/status/500", **quick}},
            {
                "name": "slow",
                "upstream": {"url": f"{root}/slow/1500", "timeout": 30},
                "metadata": {"rpc": {"worker_threads": THREADS}},
            },
            {
                "name": "lonely",  # one request at a time: a hung upstream must not keep it
                "upstream": {"url": root, "timeout": 1, "retries": 0},
                "metadata": {"rpc": {"worker_threads": 1}},
            },
            {
                "name": "nowhere",
                "upstream": {"url": f"http://127.0.0.1:{free_port()}", "health": None, "retries": 2,
                             "backoff_seconds": 0.1, "connect_timeout": 1},
            },
        ]
    )  # fmt: skip


@pytest.fixture
def stack(api: ApiFactory, services: Path) -> Api:
    return api(services)


def put_with_path(redis_url: str, service: str, body: bytes, path: str, content_type: str = "") -> str:
    """A put as the API stores `POST /api/predict/<service>/<path>`: the item keeps its sub-path."""

    async def run() -> str:
        client = redis.asyncio.Redis.from_url(redis_url)
        try:
            store = QueueStore(client)
            stored = await store.put(
                keys.input_queue(service), body, {}, max_items=10, path=path, content_type=content_type
            )
            return stored.request_id
        finally:
            await client.aclose()

    return asyncio.run(run())


def put(api: Api, service: str, body: bytes, content_type: str = "application/octet-stream") -> str:
    answer = httpx.post(
        f"{api.url}/api/predict/{service}",
        content=body,
        headers={"Authorization": TOKEN, "Content-Type": content_type, "Cookie": "session=abc"},
        timeout=10,
    )
    assert answer.status_code == 200, answer.text
    return answer.headers[REQUEST_ID]


def result(api: Api, service: str, request_id: str, timeout: float = 30) -> dict[str, Any]:
    answer = httpx.get(
        f"{api.url}/api/predict/{service}/sink",
        params={"requestId": request_id, "_timeout_": f"{timeout:g}s"},
        headers={"Authorization": TOKEN},
        timeout=timeout + 10,
    )
    assert answer.status_code == 200, answer.text
    [frame] = answer.json()
    frame["data"] = base64.b64decode(frame["data"])
    return frame


def test_the_body_its_content_type_and_the_request_id_reach_the_upstream_and_nothing_else(
    stack: Api, worker: WorkerFactory, services: Path, upstream: Callable[[], ManagedProcess]
) -> None:
    upstream()
    worker("inspect", services_file=services)
    request_id = put(stack, "inspect", b'{"prompt": "hi"}', "application/json")

    seen = json.loads(result(stack, "inspect", request_id)["data"])

    assert seen["path"] == "/inspect/plain"
    assert seen["contentType"] == "application/json"
    assert seen["requestId"] == request_id
    assert seen["body"] == '{"prompt": "hi"}'
    assert "authorization" not in seen["headers"] and "cookie" not in seen["headers"]  # never the client's


def test_a_request_sub_path_is_forwarded_to_the_same_path_of_the_upstream(
    stack: Api, worker: WorkerFactory, services: Path, upstream: Callable[[], ManagedProcess], redis_url: str
) -> None:
    upstream()
    worker("llm", services_file=services)
    request_id = put_with_path(redis_url, "llm", b"{}", "inspect/v1/chat/completions", "application/json")

    seen = json.loads(result(stack, "llm", request_id)["data"])

    assert (seen["path"], seen["contentType"]) == ("/inspect/v1/chat/completions", "application/json")


def test_an_upstream_that_is_down_at_start_gets_503_for_sync_and_serves_async_puts_once_it_is_up(
    stack: Api,
    services: Path,
    upstream: Callable[[], ManagedProcess],
    sync_redis: redis.Redis,
    redis_url: str,
    tmp_path: Path,
    process_logs: list[ManagedProcess],
) -> None:
    # Not the `worker` factory: it waits until the worker is live, and this one is not, yet.
    process = start_worker(redis_url, services, ["llm"], log_dir=tmp_path / "logs")
    process_logs.append(process)
    time.sleep(1)  # it runs, and asks the upstream's health path
    sync = httpx.post(f"{stack.url}/api/predict/llm/sync", content=b"hi", headers={"Authorization": TOKEN}, timeout=10)
    assert sync.status_code == 503
    assert "no healthy upstream" in sync.json()["detail"]
    waiting = put(stack, "llm", b"queued while the model loads")  # async puts are accepted and wait
    time.sleep(1)
    assert sync_redis.xlen(keys.input_queue("llm").normal) == 1  # not taken: nothing to forward it to

    upstream()  # the model server has loaded

    assert result(stack, "llm", waiting)["data"] == b"queued while the model loads"
    wait_until(lambda: sync_redis.zscore(keys.live_workers("llm"), process.name), 10, "the worker live")
    answer = httpx.post(f"{stack.url}/api/predict/llm/sync", content=b"hi", headers={"Authorization": TOKEN})
    assert (answer.status_code, answer.content) == (200, b"hi")
    assert_counts_true(sync_redis, "llm")


def test_a_hung_upstream_ends_the_request_with_504_after_its_timeout_and_the_worker_is_free(
    stack: Api, worker: WorkerFactory, services: Path, upstream: Callable[[], ManagedProcess], redis_url: str
) -> None:
    upstream()
    worker("lonely", services_file=services)
    hung = put_with_path(redis_url, "lonely", b"x", "hang")
    started = time.monotonic()

    frame = result(stack, "lonely", hung)
    took = time.monotonic() - started

    assert frame["tags"]["lastCode"] == "504"
    assert "did not answer within upstream.timeout=1s" in frame["message"]
    assert took < 10  # its timeout (1 s), not the hour the upstream would take
    after = put(stack, "lonely", b"next")  # the one slot of the worker is free again
    assert result(stack, "lonely", after)["data"] == b"next"


def test_an_upstream_answering_500_gives_a_result_with_last_code_500(
    stack: Api, worker: WorkerFactory, services: Path, upstream: Callable[[], ManagedProcess]
) -> None:
    upstream()
    worker("fails", services_file=services)

    frame = result(stack, "fails", put(stack, "fails", b"x"))

    assert (frame["tags"]["lastCode"], frame["data"]) == ("500", b"status 500")


def test_an_upstream_that_refuses_connections_is_tried_again_then_ends_with_502(
    stack: Api, worker: WorkerFactory, services: Path
) -> None:
    worker("nowhere", services_file=services)

    frame = result(stack, "nowhere", put(stack, "nowhere", b"x"))

    assert frame["tags"]["lastCode"] == "502"
    assert "(3 attempts)" in frame["message"]


def test_one_worker_process_holds_worker_threads_requests_to_the_upstream_at_once(
    stack: Api, worker: WorkerFactory, services: Path, upstream: Callable[[], ManagedProcess], sync_redis: redis.Redis
) -> None:
    upstream()
    process = worker("slow", services_file=services)
    request_ids = [put(stack, "slow", f"item {n}".encode()) for n in range(THREADS)]

    def held() -> int:
        raw = sync_redis.hget(keys.running("slow"), process.name)
        return len(json.loads(raw)) if raw else 0

    wait_until(lambda: held() == THREADS, 10, f"{THREADS} requests in flight in one process")
    assert [result(stack, "slow", rid)["data"] for rid in request_ids] == [f"item {n}".encode() for n in range(8)]
