"""Fixtures of the attack tests: the integration fixtures, an API started with environment settings, a shared stack.

The attacks run against real processes only: a redis-server of the test's own, the API under
uvicorn and `rq worker` processes, as in tests/integration.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import pytest

from queue_service.embedded_redis import RedisServer
from queue_service.testing import ManagedProcess, start_api, start_worker, write_services
from tests.integration import conftest as integration
from tests.integration.conftest import STANDARD_SERVICES, Api, stop_all

# The integration fixtures, and the hook that lets process_logs print the logs of a failed test.
api = integration.api
worker = integration.worker
process_logs = integration.process_logs
standard_services = integration.standard_services
pytest_runtest_makereport = integration.pytest_runtest_makereport


class ApiWithEnv(Protocol):
    def __call__(self, services_file: Path | None = None, env: Mapping[str, str] | None = None) -> Api: ...


@pytest.fixture
def api_with_env(
    redis_url: str, standard_services: Path, tmp_path: Path, process_logs: list[ManagedProcess]
) -> ApiWithEnv:
    """`api_with_env(services_file, env)`: the `api` fixture with QS_* settings in the API's environment.

    Raises ProcessStartError when the API does not start (a services file it refuses), so a test
    can turn that into its own failure instead of an error in setup.
    """

    def start(services_file: Path | None = None, env: Mapping[str, str] | None = None) -> Api:
        process, url = start_api(redis_url, services_file or standard_services, env=env, log_dir=tmp_path / "logs")
        process_logs.append(process)
        return Api(process, url)

    return start


@dataclass
class SharedStack:
    """One Redis and one API on the standard services, shared by the tests of a module (they leave no state)."""

    redis_url: str
    services_file: Path
    log_dir: Path
    api: Api
    processes: list[ManagedProcess] = field(default_factory=list)

    def start_worker(self, *services: str) -> ManagedProcess:
        process = start_worker(self.redis_url, self.services_file, services, log_dir=self.log_dir)
        self.processes.append(process)
        return process


@pytest.fixture(scope="module")
def shared_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SharedStack]:
    log_dir = tmp_path_factory.mktemp("hostile")
    services_file = write_services(log_dir / "services.yaml", STANDARD_SERVICES)
    with RedisServer(data_dir=log_dir / "redis") as server:
        process, url = start_api(server.url, services_file, log_dir=log_dir)
        stack = SharedStack(server.url, services_file, log_dir, Api(process, url), [process])
        try:
            yield stack
        finally:
            stop_all(stack.processes)
