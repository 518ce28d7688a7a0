"""Integration fixtures: the API (uvicorn) and `rq worker` processes as factories, stopped after each test.

Every process writes its log under the test's tmp_path; a failed test prints the tail of each log.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import httpx
import pytest
import redis

from queue_service.config import load_services
from queue_service.store import keys
from queue_service.testing import START_TIMEOUT_SECONDS, ManagedProcess, start_api, start_worker, stop_all
from tests.conftest import ServicesFileFactory
from tests.support.waiting import wait_until

ECHO = "workers.examples:Echo"
SLEEP = "workers.examples:Sleep"
# The services most stories need; tests name the services their workers serve, and `idle` never has one.
STANDARD_SERVICES: list[dict[str, Any]] = [
    {"name": "echo", "processor": ECHO},
    {"name": "sleep", "processor": SLEEP},
    {"name": "idle", "processor": ECHO},
]
REQUEST_ID = "X-Eas-Queueservice-Request-Id"
STOP_GRACE_SECONDS = 2.0


@dataclass
class Api:
    process: ManagedProcess
    url: str

    def client(self, **kwargs: Any) -> httpx.Client:
        kwargs.setdefault("timeout", 30)
        return httpx.Client(base_url=self.url, **kwargs)


class ApiFactory(Protocol):
    def __call__(self, services_file: Path | None = None) -> Api: ...


class WorkerFactory(Protocol):
    def __call__(self, *services: str, services_file: Path | None = None) -> ManagedProcess: ...


@pytest.fixture
def standard_services(services_file: ServicesFileFactory) -> Path:
    return services_file(STANDARD_SERVICES)


@pytest.fixture
def process_logs(request: pytest.FixtureRequest) -> Iterator[list[ManagedProcess]]:
    """Every process a test started; stopped at teardown, their log tails printed when it failed."""
    started: list[ManagedProcess] = []
    yield started
    # Short grace: uvicorn would otherwise wait for any long poll still open.
    stop_all(started, grace=STOP_GRACE_SECONDS)
    report = getattr(request.node, "rep_call", None)
    if report is not None and report.failed:
        for process in started:
            print(f"--- {process!r}\n{process.log_tail(60)}")


@pytest.fixture
def api(redis_url: str, standard_services: Path, tmp_path: Path, process_logs: list[ManagedProcess]) -> ApiFactory:
    """`api(services_file=None)` runs the API on a free port (default: the standard services)."""

    def start(services_file: Path | None = None) -> Api:
        process, url = start_api(redis_url, services_file or standard_services, log_dir=tmp_path / "logs")
        process_logs.append(process)
        return Api(process, url)

    return start


@pytest.fixture
def worker(
    redis_url: str, standard_services: Path, tmp_path: Path, process_logs: list[ManagedProcess]
) -> WorkerFactory:
    """`worker(*services)` runs `rq worker -w workers.worker.QueueWorker` and returns once it is live.

    Live: the API counts it as a worker of each of its services (no names: every service of the file).
    """

    def start(*services: str, services_file: Path | None = None) -> ManagedProcess:
        path = services_file or standard_services
        process = start_worker(redis_url, path, services, log_dir=tmp_path / "logs")
        process_logs.append(process)
        client = redis.Redis.from_url(redis_url)
        try:
            for service in services or [s.name for s in load_services(path).services]:
                wait_until(
                    lambda s=service: client.zscore(keys.live_workers(s), process.name),
                    START_TIMEOUT_SECONDS,
                    f"{process.name} live for {service}",
                )
        finally:
            client.close()
        return process

    return start


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Any:
    # Keeps the call phase's report on the item, so process_logs can tell whether the test failed.
    report = yield
    if report.when == "call":
        item.rep_call = report  # type: ignore[attr-defined]
    return report
