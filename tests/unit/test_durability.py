"""`queue.durability: replicated`: a put, and a worker's result, is acknowledged only once a replica has it."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Iterator

import httpx
import pytest
import redis
import redis.asyncio

from queue_service.api import create_app
from queue_service.config import Settings, durability, parse_services
from queue_service.embedded_redis import RedisServer
from queue_service.store import keys
from queue_service.store.consumer import WorkerStore
from queue_service.store.durability import refuse_on_a_cluster
from queue_service.store.model import Outcome
from workers.worker import take_rules

WAIT_MS = 200
SERVICES = parse_services(
    {
        "services": [
            {
                "name": "safe",
                "processor": "workers.examples:Echo",
                "queue": {"durability": "replicated", "replication_timeout_ms": WAIT_MS},
            },
            {"name": "fast", "processor": "workers.examples:Echo"},
        ]
    }
)


@pytest.fixture(scope="module")
def primary_and_replica(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[RedisServer, RedisServer]]:
    base = tmp_path_factory.mktemp("replicated")
    with RedisServer(data_dir=base / "primary") as primary:
        replica = RedisServer(data_dir=base / "replica", extra_args=["--replicaof", "127.0.0.1", str(primary.port)])
        with replica:
            client = redis.Redis(port=replica.port)
            deadline = time.monotonic() + 30
            while client.info("replication").get("master_link_status") != "up":
                assert time.monotonic() < deadline, "the replica never synced"
                time.sleep(0.05)
            client.close()
            yield primary, replica


@pytest.fixture
def replicated_url(primary_and_replica: tuple[RedisServer, RedisServer]) -> str:
    primary, _ = primary_and_replica
    client = redis.Redis(port=primary.port)
    client.flushall()
    client.close()
    return primary.url


async def _client(url: str) -> AsyncIterator[httpx.AsyncClient]:
    redis_client = redis.asyncio.Redis.from_url(url)
    app = create_app(Settings(), services=SERVICES, redis_client=redis_client)
    transport = httpx.ASGITransport(app=app)
    async with app.router.lifespan_context(app), httpx.AsyncClient(transport=transport, base_url="http://qs") as c:
        yield c
    await redis_client.aclose()


@pytest.fixture
async def without_replica(fresh_redis_url: str) -> AsyncIterator[httpx.AsyncClient]:
    async for client in _client(fresh_redis_url):
        yield client


@pytest.fixture
async def with_replica(replicated_url: str) -> AsyncIterator[httpx.AsyncClient]:
    async for client in _client(replicated_url):
        yield client


async def test_a_replicated_put_without_a_replica_gets_503_after_the_wait(without_replica: httpx.AsyncClient) -> None:
    started = time.monotonic()
    answer = await without_replica.post("/api/predict/safe", content=b"x")
    waited = time.monotonic() - started
    assert answer.status_code == 503, answer.text
    assert "not confirmed by a replica" in answer.json()["detail"]
    assert answer.headers["Retry-After"] == "1"
    assert waited >= WAIT_MS / 1000 * 0.9
    # A service acknowledged by the primary alone answers at once on the same Redis.
    assert (await without_replica.post("/api/predict/fast", content=b"x")).status_code == 200


async def test_a_replicated_put_is_on_the_replica_when_it_is_acknowledged(
    with_replica: httpx.AsyncClient, primary_and_replica: tuple[RedisServer, RedisServer]
) -> None:
    _, replica = primary_and_replica
    on_replica = redis.Redis(port=replica.port)
    try:
        for number in range(1, 21):
            answer = await with_replica.post("/api/predict/safe", content=b"x")
            assert answer.status_code == 200, answer.text
            # Read at once: WAIT returned only after the replica had it.
            assert on_replica.xlen(keys.input_queue("safe").normal) == number
    finally:
        on_replica.close()


def test_a_replicated_result_is_on_the_replica_when_finish_returns(
    replicated_url: str, primary_and_replica: tuple[RedisServer, RedisServer]
) -> None:
    _, replica = primary_and_replica
    client = redis.Redis.from_url(replicated_url)
    on_replica = redis.Redis(port=replica.port)
    worker = WorkerStore(client, "w-1", durability=durability(SERVICES.services))
    try:
        client.xadd(keys.input_queue("safe").normal, {"data": b"x", "rid": "r-1", "tags": b"{}"}, id="1-0")
        client.hset(keys.counts("safe"), "waiting", 1)
        [item] = worker.take("safe", take_rules(SERVICES.by_name["safe"])).items
        worker.finish(item, Outcome(body=b"done"))
        assert on_replica.xlen(keys.sink_queue("safe").normal) == 1
        assert on_replica.xlen(keys.input_queue("safe").normal) == 0
    finally:
        client.close()
        on_replica.close()


def test_a_replicated_result_without_a_replica_is_written_once_and_the_wait_is_logged(
    fresh_redis_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    client = redis.Redis.from_url(fresh_redis_url)
    worker = WorkerStore(client, "w-1", durability=durability(SERVICES.services))
    try:
        client.xadd(keys.input_queue("safe").normal, {"data": b"x", "rid": "r-1", "tags": b"{}"}, id="1-0")
        client.hset(keys.counts("safe"), "waiting", 1)
        [item] = worker.take("safe", take_rules(SERVICES.by_name["safe"])).items
        started = time.monotonic()
        written = worker.finish(item, Outcome(body=b"done"))
        # The finish waited for a replica (there is none), then kept its result: running it again would
        # publish twice (the item is gone from the input queue once its result is written).
        assert time.monotonic() - started >= WAIT_MS / 1000 * 0.9
        assert written.sink_index == 1
        assert client.xlen(keys.sink_queue("safe").normal) == 1
        assert "0 of 1 replica(s) confirmed 1 result(s)" in caplog.text
    finally:
        client.close()


async def test_replicated_durability_on_a_cluster_is_refused_at_start() -> None:
    cluster = redis.asyncio.RedisCluster(host="127.0.0.1", port=1)
    with pytest.raises(ValueError, match="not supported on a Redis Cluster"):
        refuse_on_a_cluster(cluster, durability(SERVICES.services))
    refuse_on_a_cluster(cluster, {})  # a cluster without replicated services is fine
    await cluster.aclose()
