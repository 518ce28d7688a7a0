"""One worker process holding several requests at once: a sync processor that declares `thread_safe = True`
runs in `worker_threads` threads; a worker started by hand takes `QS_WORKER_THREADS` instead."""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import pytest
import redis

from queue_service.store import keys
from queue_service.testing import ManagedProcess, start_worker
from tests.conftest import ServicesFileFactory
from tests.integration.conftest import REQUEST_ID, Api, ApiFactory
from tests.support.waiting import wait_until

pytestmark = pytest.mark.integration

THREADS = 4


@pytest.fixture
def services(services_file: ServicesFileFactory) -> Path:
    rpc = {"worker_threads": THREADS, "max_queue_size": 100}
    return services_file(
        [
            {"name": "threads", "processor": "tests.integration.processors:ThreadSafeSleep", "metadata": {"rpc": rpc}},
            {"name": "sleep", "processor": "workers.examples:Sleep", "metadata": {"rpc": rpc}},  # not thread-safe
            {
                "name": "limited",
                "processor": "tests.integration.processors:ThreadSafeSleep",
                "metadata": {"rpc": rpc},
                "queue": {"max_processing_seconds": 1},
            },
        ]
    )


def held_by(client: redis.Redis, service: str, worker: ManagedProcess) -> int:
    raw = client.hget(keys.running(service), worker.name)
    return len(json.loads(raw)) if raw else 0


def most_held(client: redis.Redis, service: str, worker: ManagedProcess, request_ids: list[str], api: Api) -> int:
    """Watch what the worker publishes until every request has its result: the most it held at once."""
    most = 0

    def all_done() -> bool:
        nonlocal most
        most = max(most, held_by(client, service, worker))
        answers = [
            httpx.get(f"{api.url}/api/predict/{service}/sink", params={"requestId": rid}, timeout=10)
            for rid in request_ids
        ]
        return all(answer.status_code == 200 for answer in answers)

    wait_until(all_done, 60, "every result", interval=0.1)
    return most


def start(redis_url: str, services: Path, tmp_path: Path, logs: list[ManagedProcess], service: str, **env: str):
    process = start_worker(redis_url, services, [service], env=env, log_dir=tmp_path / "logs")
    logs.append(process)
    return process


def puts(api: Api, service: str, count: int, seconds: float) -> list[str]:
    answers = [httpx.post(f"{api.url}/api/predict/{service}", content=str(seconds).encode()) for _ in range(count)]
    assert {answer.status_code for answer in answers} == {200}
    return [answer.headers[REQUEST_ID] for answer in answers]


def test_a_thread_safe_sync_processor_runs_worker_threads_requests_at_once_in_one_process(
    api: ApiFactory, services: Path, redis_url: str, sync_redis: redis.Redis, tmp_path: Path,
    process_logs: list[ManagedProcess],
) -> None:  # fmt: skip
    stack = api(services)
    worker = start(redis_url, services, tmp_path, process_logs, "threads")
    request_ids = puts(stack, "threads", 2 * THREADS, 1.5)

    assert most_held(sync_redis, "threads", worker, request_ids, stack) == THREADS
    assert f"threads runs up to {THREADS} requests at once in threads" in worker.log_text()


def test_a_sync_processor_that_is_not_thread_safe_holds_one_request_per_process(
    api: ApiFactory, services: Path, redis_url: str, sync_redis: redis.Redis, tmp_path: Path,
    process_logs: list[ManagedProcess],
) -> None:  # fmt: skip
    stack = api(services)
    worker = start(redis_url, services, tmp_path, process_logs, "sleep")
    request_ids = puts(stack, "sleep", 3, 1.2)

    assert most_held(sync_redis, "sleep", worker, request_ids, stack) == 1


def test_a_worker_started_by_hand_takes_qs_worker_threads(
    api: ApiFactory, services: Path, redis_url: str, sync_redis: redis.Redis, tmp_path: Path,
    process_logs: list[ManagedProcess],
) -> None:  # fmt: skip
    stack = api(services)
    worker = start(redis_url, services, tmp_path, process_logs, "threads", QS_WORKER_THREADS="2")
    request_ids = puts(stack, "threads", 6, 1.5)

    assert most_held(sync_redis, "threads", worker, request_ids, stack) == 2


def test_a_request_in_a_thread_past_its_limit_ends_with_408_at_the_limit_and_the_others_are_served(
    api: ApiFactory, services: Path, redis_url: str, tmp_path: Path, process_logs: list[ManagedProcess]
) -> None:
    stack = api(services)
    start(redis_url, services, tmp_path, process_logs, "limited")
    [stuck] = puts(stack, "limited", 1, 30)
    answer = httpx.get(
        f"{stack.url}/api/predict/limited/sink", params={"requestId": stuck, "_timeout_": "8s"}, timeout=20
    )
    assert answer.status_code == 200 and answer.json()[0]["tags"]["lastCode"] == "408"  # at 1 s, not 30 s
    [after] = puts(stack, "limited", 1, 0.1)  # its thread still sleeps; another thread serves this one
    answer = httpx.get(f"{stack.url}/api/predict/limited/sink", params={"requestId": after, "_timeout_": "8s"})
    assert answer.status_code == 200 and "lastCode" not in answer.json()[0]["tags"]
