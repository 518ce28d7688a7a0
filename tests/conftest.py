"""Shared fixtures: a real redis-server per test, a services file factory and the official client's Python."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis

from queue_service.embedded_redis import RedisServer
from tests.support import eas
from tests.support.processes import write_services

ServicesFileFactory = Callable[[list[dict[str, Any]]], Path]


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    # Data and redis.log under tmp_path, so a failed test's Redis log is kept by pytest.
    with RedisServer(data_dir=tmp_path / "redis") as server:
        yield server


@pytest.fixture
def redis_url(redis_server: RedisServer) -> str:
    return redis_server.url


@pytest.fixture
def sync_redis(redis_url: str) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(redis_url)
    yield client
    client.close()


@pytest.fixture
def services_file(tmp_path: Path) -> ServicesFileFactory:
    """`make(services)` writes a new services file under tmp_path and returns its path."""
    written: list[Path] = []

    def make(services: list[dict[str, Any]]) -> Path:
        written.append(write_services(tmp_path / f"services-{len(written)}.yaml", services))
        return written[-1]

    return make


@pytest.fixture(scope="session")
def eas_python() -> str:
    return eas.ensure_eas_venv()
