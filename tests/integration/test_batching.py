"""Dynamic batching (`metadata.rpc.batching`): full batches when items wait, no wait at low load, a busy
worker's batch filled up to `max_batch_timeout`, each item its own result, priority first."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis

from queue_service.store import keys
from queue_service.testing import spawn_worker
from tests.conftest import ServicesFileFactory
from tests.integration.conftest import REQUEST_ID, Api, ApiFactory, WorkerFactory
from tests.support.counts import assert_counts_true
from tests.support.waiting import wait_until

pytestmark = pytest.mark.integration

TIMEOUT_MS = 8000  # long, so that waiting for it (or not) shows in the times, and a loaded box sees it


def batching(name: str, processor: str, size: int = 8) -> dict[str, Any]:
    rpc = {"batching": True, "max_batch_size": size, "max_batch_timeout": TIMEOUT_MS, "max_queue_size": 1000}
    return {"name": name, "processor": processor, "metadata": {"rpc": rpc}}


SERVICES = [
    batching("batches", "tests.integration.processors:Batches"),
    batching("lists", "tests.integration.processors:Lists", size=4),
    batching("echo", "workers.examples:Echo"),  # takes no batches: refused at start
]


@pytest.fixture
def batch_services(services_file: ServicesFileFactory) -> Path:
    return services_file(SERVICES)


def put(api: Api, service: str, body: str, **params: str) -> str:
    answer = httpx.post(f"{api.url}/api/predict/{service}", content=body.encode(), params=params, timeout=10)
    assert answer.status_code == 200, answer.text
    return answer.headers[REQUEST_ID]


def result(api: Api, service: str, request_id: str) -> dict[str, Any]:
    answer = httpx.get(
        f"{api.url}/api/predict/{service}/sink", params={"requestId": request_id, "_timeout_": "30s"}, timeout=40
    )
    assert answer.status_code == 200, answer.text
    [frame] = answer.json()
    return frame


def body_of(frame: dict[str, Any]) -> Any:
    import base64

    return json.loads(base64.b64decode(frame["data"]))


def test_items_waiting_when_a_worker_starts_are_served_in_full_batches(
    api: ApiFactory, worker: WorkerFactory, batch_services: Path, sync_redis: redis.Redis
) -> None:
    stack = api(batch_services)
    request_ids = [put(stack, "batches", f"item {n}") for n in range(20)]
    worker("batches", services_file=batch_services)

    sizes = [body_of(result(stack, "batches", rid))["batch"] for rid in request_ids]

    assert sorted(sizes) == [4] * 4 + [8] * 16  # two full batches of 8, then the 4 left
    assert_counts_true(sync_redis, "batches")


def test_a_lone_sync_request_is_answered_at_once_not_after_the_batch_timeout(
    api: ApiFactory, worker: WorkerFactory, batch_services: Path
) -> None:
    stack = api(batch_services)
    worker("batches", services_file=batch_services)
    times = []
    for _ in range(3):
        started = time.monotonic()
        answer = httpx.post(f"{stack.url}/api/predict/batches/sync", content=b"alone", timeout=30)
        times.append(time.monotonic() - started)
        assert answer.status_code == 200, answer.text
        assert answer.json() == {"batch": 1, "position": 0, "body": "alone"}
    assert max(times) < TIMEOUT_MS / 1000 / 2, times  # an 8 s wait for more would show


@pytest.mark.quiet  # a timing window: the third item must come while the busy worker waits for more
def test_a_busy_worker_waits_up_to_the_timeout_for_more_items_to_fill_its_batch(
    api: ApiFactory, worker: WorkerFactory, batch_services: Path, sync_redis: redis.Redis
) -> None:
    stack = api(batch_services)
    worker("batches", services_file=batch_services)

    def held() -> set[str]:
        return {e["requestId"] for raw in sync_redis.hvals(keys.running("batches")) for e in json.loads(raw)}

    # Alone: the worker was idle. 3 s: `running` is published once a keeper tick (1 s), and the second put
    # must land while this batch still runs (with 1 s it sometimes came after the end: CI, 076dbf2).
    first = put(stack, "batches", "sleep:3")
    wait_until(lambda: first in held(), 10, "the first batch running")
    second = put(stack, "batches", "ok")  # waits for the first batch, then is taken by a busy worker...
    wait_until(lambda: second in held() and first not in held(), 20, "the second item taken")
    taken_at = time.monotonic()
    third = put(stack, "batches", "ok")  # ...which waits for more: this one joins its batch
    frames = [result(stack, "batches", rid) for rid in (second, third)]
    answered_after = time.monotonic() - taken_at

    assert body_of(result(stack, "batches", first))["batch"] == 1
    assert [body_of(frame)["batch"] for frame in frames] == [2, 2]
    assert answered_after < TIMEOUT_MS / 1000 + 5  # never past the timeout (plus a loaded machine's slack)


def test_one_item_failing_fails_that_item_only(api: ApiFactory, worker: WorkerFactory, batch_services: Path) -> None:
    stack = api(batch_services)
    request_ids = [put(stack, "batches", body) for body in ("ok", "fail", "reject", "ok")]
    worker("batches", services_file=batch_services)

    frames = [result(stack, "batches", rid) for rid in request_ids]

    assert [frame["tags"].get("lastCode", "200") for frame in frames] == ["200", "400", "422", "200"]
    assert frames[1]["message"] == "ValueError: no good: item 1"
    assert body_of(frames[3]) == {"batch": 4, "position": 3, "body": "ok"}


def test_an_exception_of_the_whole_call_fails_every_item_of_the_batch_with_400(
    api: ApiFactory, worker: WorkerFactory, batch_services: Path
) -> None:
    stack = api(batch_services)
    request_ids = [put(stack, "batches", body) for body in ("ok", "boom", "ok")]
    worker("batches", services_file=batch_services)

    frames = [result(stack, "batches", rid) for rid in request_ids]

    assert [frame["tags"]["lastCode"] for frame in frames] == ["400"] * 3
    assert {frame["message"] for frame in frames} == {"RuntimeError: the whole batch failed"}


def test_priority_items_go_first_into_a_batch(api: ApiFactory, worker: WorkerFactory, batch_services: Path) -> None:
    stack = api(batch_services)
    normal = [put(stack, "batches", f"normal {n}") for n in range(3)]
    high = [put(stack, "batches", f"high {n}", _priority_="1") for n in range(2)]
    worker("batches", services_file=batch_services)

    positions = {rid: body_of(result(stack, "batches", rid))["position"] for rid in normal + high}

    assert sorted(positions[rid] for rid in high) == [0, 1]
    assert sorted(positions[rid] for rid in normal) == [2, 3, 4]


def test_a_processor_that_declares_accepts_batches_gets_the_list_in_process(
    api: ApiFactory, worker: WorkerFactory, batch_services: Path
) -> None:
    stack = api(batch_services)
    request_ids = [put(stack, "lists", "x") for _ in range(4)]
    worker("lists", services_file=batch_services)

    assert [body_of(result(stack, "lists", rid)) for rid in request_ids] == [{"batch": 4}] * 4


def test_batching_for_a_processor_without_process_batch_stops_the_worker_naming_the_key(
    redis_url: str, batch_services: Path, tmp_path: Path
) -> None:
    process = spawn_worker(redis_url, batch_services, ["echo"], log_dir=tmp_path)
    assert process.wait(60) == 78
    assert "service 'echo': metadata.rpc.batching is on, but processor 'workers.examples:Echo'" in process.log_text()
