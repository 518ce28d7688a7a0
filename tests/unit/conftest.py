"""Unit-test fixtures: one real redis-server for the whole session, emptied before each test that asks for it.

The store's Lua scripts run on a real Redis (fakeredis answers XREADGROUP inside Lua in another shape), but
starting a server per test would cost more than the tests. The server is ours, on a port of its own: the
per-test FLUSHALL never reaches any other Redis on the machine.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import redis

# Starlette's FileResponse (the /docs assets) imports anyio's file I/O lazily, deep in a request's stack,
# and pytest rewrites anyio's modules on import (anyio is a pytest plugin). On CPython 3.11.7 that compile()
# can fail with "AST constructor recursion depth mismatch" once an earlier test has failed: importing it
# here, at the top level, keeps one failing test from failing another.
from anyio import open_file  # noqa: F401

from queue_service.embedded_redis import RedisServer


@pytest.fixture(scope="session")
def shared_redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    with RedisServer(data_dir=tmp_path_factory.mktemp("shared-redis")) as server:
        yield server


@pytest.fixture
def fresh_redis_url(shared_redis_server: RedisServer) -> str:
    """The URL of the session's redis-server, emptied for this test."""
    client = redis.Redis.from_url(shared_redis_server.url)
    try:
        client.flushall()
    finally:
        client.close()
    return shared_redis_server.url
