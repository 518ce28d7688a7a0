"""Auto-pipelined puts: concurrent puts share round trips, and each keeps its own answer or its own error."""

from __future__ import annotations

import asyncio

import redis
import redis.asyncio

from queue_service.store import keys
from queue_service.store.model import QueueFull
from queue_service.store.pipelining import MAX_BATCH
from queue_service.store.queues import QueueStore

IN = keys.input_queue("echo")


def round_trips(client: redis.Redis) -> int:
    return int(client.info("stats")["total_reads_processed"])


async def test_concurrent_puts_share_round_trips_and_each_gets_its_own_index_and_id(
    store: QueueStore, client: redis.Redis
) -> None:
    await store.put(IN, b"first", {}, max_items=1000)  # loads the script
    before = round_trips(client)
    results = await asyncio.gather(
        *(store.put(IN, f"item {n}".encode(), {"n": str(n)}, max_items=1000) for n in range(50))
    )
    used = round_trips(client) - before - 1  # this INFO
    assert sorted(r.index for r in results) == list(range(2, 52))
    assert len({r.request_id for r in results}) == 50
    assert used <= 5, used  # one alone, then batches (a socket read may split a batch: a few, not 50)
    assert await store.count(IN) == 51
    # Each item holds its own body and tags.
    read = await store.read(IN, start=2, length=50, max_bytes=1_000_000)
    by_index = {frame.index: frame for frame in read.frames}
    for n, result in enumerate(results):
        frame = by_index[result.index]
        assert frame.data == f"item {n}".encode()
        assert frame.tags["n"] == str(n) and frame.tags["requestId"] == result.request_id


async def test_a_full_queue_refuses_only_the_puts_past_its_bound(store: QueueStore) -> None:
    outcomes = await asyncio.gather(*(store.put(IN, b"x", {}, max_items=10) for _ in range(30)), return_exceptions=True)
    assert sum(1 for o in outcomes if isinstance(o, QueueFull)) == 20
    assert sorted(o.index for o in outcomes if not isinstance(o, BaseException)) == list(range(1, 11))


async def test_a_script_redis_forgot_is_loaded_again_and_its_batched_calls_run_once(
    store: QueueStore, client: redis.Redis
) -> None:
    await store.put(IN, b"first", {}, max_items=1000)
    client.script_flush()  # as after a Redis restart
    results = await asyncio.gather(*(store.put(IN, b"x", {}, max_items=1000) for _ in range(20)))
    assert sorted(r.index for r in results) == list(range(2, 22))
    assert await store.count(IN) == 21


async def test_more_puts_than_a_batch_holds_all_go(store: QueueStore) -> None:
    n = MAX_BATCH * 2 + 7
    results = await asyncio.gather(*(store.put(IN, b"x", {}, max_items=10_000) for _ in range(n)))
    assert sorted(r.index for r in results) == list(range(1, n + 1))


async def test_an_unreachable_redis_fails_every_waiting_put_with_its_error_and_never_hangs() -> None:
    broken = redis.asyncio.Redis.from_url("redis://127.0.0.1:1", socket_connect_timeout=0.5)
    store = QueueStore(broken)
    try:
        for _ in range(2):  # the second burst finds the pipeline idle again
            outcomes = await asyncio.wait_for(
                asyncio.gather(*(store.put(IN, b"x", {}, max_items=10) for _ in range(5)), return_exceptions=True), 30
            )
            assert all(isinstance(o, redis.exceptions.ConnectionError) for o in outcomes), outcomes
    finally:
        await broken.aclose()
