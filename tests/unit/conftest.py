"""Unit-test fixtures: one real redis-server for the whole session, emptied before each test that asks for it.

The store's Lua scripts run on a real Redis (fakeredis answers XREADGROUP inside Lua in another shape), but
starting a server per test would cost more than the tests. The server is ours, on a port of its own: the
per-test FLUSHALL never reaches any other Redis on the machine.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator

import pytest
import redis
import redis.asyncio

# Starlette's FileResponse (the /docs assets) imports anyio's file I/O lazily, deep in a request's stack,
# and pytest rewrites anyio's modules on import (anyio is a pytest plugin). On CPython 3.11.7 that compile()
# can fail with "AST constructor recursion depth mismatch" once an earlier test has failed: importing it
# here, at the top level, keeps one failing test from failing another.
from anyio import open_file  # noqa: F401

from queue_service.embedded_redis import RedisServer
from queue_service.store.queues import QueueStore


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


@pytest.fixture
def client(fresh_redis_url: str) -> Iterator[redis.Redis]:
    """A plain client of the emptied server (a test module may name its own `client`)."""
    sync_client = redis.Redis.from_url(fresh_redis_url)
    yield sync_client
    sync_client.close()


@pytest.fixture
async def store(fresh_redis_url: str) -> AsyncIterator[QueueStore]:
    """The API's store over an asyncio client of the emptied server."""
    async_client = redis.asyncio.Redis.from_url(fresh_redis_url)
    yield QueueStore(async_client)
    await async_client.aclose()
