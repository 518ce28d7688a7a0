"""The store's operations behind the Go and Java SDKs' calls: end of stream, negative commit, count, API registry.

On a real Redis, each ending with the counters recounted from the streams (`assert_counts_true`).
"""

from __future__ import annotations

import time

import pytest
import redis
import redis.asyncio

from queue_service.store import keys
from queue_service.store.consumer import TakeRules, WorkerStore
from queue_service.store.keys import WORKER_GROUP, QueueKeys
from queue_service.store.model import ItemGone, Outcome, QueueEnded
from queue_service.store.queues import QueueStore
from tests.support.counts import assert_counts_true, counters

SERVICE = "echo"
IN = keys.input_queue(SERVICE)
SINK = keys.sink_queue(SERVICE)
RULES = TakeRules(lease_ms=3000, max_delivery=3, sink_max_items=1000, sink_max_bytes=1_000_000)
ANY_SIZE = 1 << 30


async def put(store: QueueStore, qk: QueueKeys, count: int, priority: bool = False) -> list[int]:
    return [(await store.put(qk, b"x", {}, max_items=1000, priority=priority)).index for _ in range(count)]


async def deliver(store: QueueStore, qk: QueueKeys, consumer: str, *, claim: bool = False, want: int = 10) -> list[int]:
    await store.join(qk, "eas", start_index=0, max_groups=4, idle_ms=15_000)
    frames = await store.deliver(
        qk, group="eas", consumer=consumer, want=want, lease_ms=3000 if claim else 0, tags=None, max_bytes=ANY_SIZE
    )
    assert frames is not None
    return [frame.index for frame in frames]


async def refuse(store: QueueStore, qk: QueueKeys, index: int, max_delivery: int = 2) -> tuple[int, int]:
    refused = await store.refuse(qk, [index], "eas", max_delivery=max_delivery, last_code=500, message="Shutdown: bye")
    return refused.released, refused.ended


# --- end of stream --------------------------------------------------------------------------


async def test_an_ended_queue_refuses_puts_until_a_truncate_past_its_end(
    store: QueueStore, client: redis.Redis
) -> None:
    await put(store, SINK, 2)
    assert await store.end_stream(SINK) == 2
    assert await store.end_stream(SINK) == 2, "ending again keeps the first end"
    with pytest.raises(QueueEnded):
        await put(store, SINK, 1)

    await store.truncate(SINK, below=2)  # not past the end: still ended
    with pytest.raises(QueueEnded):
        await put(store, SINK, 1)
    await store.truncate(SINK, below=3)
    assert await put(store, SINK, 1) == [3]
    assert await store.end_of_stream(SINK) is None
    assert_counts_true(client)


async def test_the_end_is_reached_once_nothing_put_before_it_is_left(store: QueueStore, client: redis.Redis) -> None:
    await put(store, IN, 1)
    await put(store, IN, 1, priority=True)
    await store.end_stream(IN)
    end = await store.end_of_stream(IN)
    assert end is not None and (end.index, end.reached) == (2, False)

    await store.remove(IN, [1])
    assert not (await store.end_of_stream(IN)).reached  # type: ignore[union-attr]
    await store.remove(IN, [2])
    assert (await store.end_of_stream(IN)).reached  # type: ignore[union-attr]
    assert_counts_true(client)


async def test_a_forced_end_removes_what_is_left_counters_included(store: QueueStore, client: redis.Redis) -> None:
    worker = WorkerStore(client, "worker-1")
    await put(store, IN, 3)
    [held] = worker.take(SERVICE, RULES).items
    assert counters(client, SERVICE)["sink_used"] == 1

    await store.end_stream(IN, force=True)

    assert client.xlen(IN.normal) == 0
    assert (await store.end_of_stream(IN)).reached  # type: ignore[union-attr]
    assert_counts_true(client)
    with pytest.raises(ItemGone):  # the worker's item went with the rest: its finish writes nothing
        worker.finish(held, Outcome(b"done"))


# --- negative commit ------------------------------------------------------------------------


async def test_a_refused_item_goes_back_to_the_group_and_its_next_delivery_counts(
    store: QueueStore, client: redis.Redis
) -> None:
    await put(store, IN, 1)
    assert await deliver(store, IN, "leaving") == [1]

    assert await refuse(store, IN, 1) == (1, 0)

    assert await deliver(store, IN, "staying", claim=True) == [1]
    [held] = client.xpending_range(IN.normal, "eas", "-", "+", 1)
    assert (held["consumer"], held["times_delivered"]) == (b"staying", 2)
    assert_counts_true(client)


async def test_refused_max_delivery_times_an_input_item_ends_with_a_terminal_result(
    store: QueueStore, client: redis.Redis
) -> None:
    request_id = (await store.put(IN, b"work", {"team": "blue"}, max_items=10)).request_id
    await deliver(store, IN, "a")
    await refuse(store, IN, 1)
    await deliver(store, IN, "b", claim=True)

    assert await refuse(store, IN, 1) == (0, 1)

    assert client.xlen(IN.normal) == 0
    [result] = (await store.read(SINK, request_id=request_id, max_bytes=ANY_SIZE)).frames
    assert result.tags == {"team": "blue", "requestId": request_id, "lastCode": "500"}
    assert (result.message, result.data) == ("Shutdown: bye", b"Shutdown: bye")
    assert_counts_true(client)


async def test_an_item_a_worker_holds_ends_once_and_the_workers_finish_writes_nothing(
    store: QueueStore, client: redis.Redis
) -> None:
    worker = WorkerStore(client, "worker-1")
    request_id = (await store.put(IN, b"work", {}, max_items=10)).request_id
    [item] = worker.take(SERVICE, RULES).items  # the workers hold it, and a client group watches it too
    await deliver(store, IN, "a")

    assert await refuse(store, IN, 1, max_delivery=1) == (0, 1)
    assert_counts_true(client)
    with pytest.raises(ItemGone):
        worker.finish(item, Outcome(b"done"))
    assert client.xlen(SINK.normal) == 1, "one result per request: the terminal one"
    [result] = (await store.read(SINK, request_id=request_id, max_bytes=ANY_SIZE)).frames
    assert result.tags["lastCode"] == "500"
    assert_counts_true(client)


async def test_a_refused_result_past_max_delivery_is_given_up_by_the_group_only(
    store: QueueStore, client: redis.Redis
) -> None:
    await put(store, SINK, 1)
    await deliver(store, SINK, "a")

    assert await refuse(store, SINK, 1, max_delivery=1) == (0, 1)

    assert client.xlen(SINK.normal) == 1, "the result stays in the sink"
    assert client.xpending(SINK.normal, "eas")["pending"] == 0
    assert_counts_true(client)


async def test_indexes_the_group_does_not_hold_are_skipped(store: QueueStore, client: redis.Redis) -> None:
    await put(store, IN, 2)
    await deliver(store, IN, "a")
    client.xack(IN.normal, "eas", keys.stream_id(2))  # committed by the group already

    assert await refuse(store, IN, 2) == (0, 0)
    assert await refuse(store, IN, 99) == (0, 0)
    assert_counts_true(client)


# --- count, and the workers' group untouched ------------------------------------------------


async def test_count_counts_both_streams_the_priority_one_or_a_tag(store: QueueStore) -> None:
    await put(store, IN, 3)
    await put(store, IN, 2, priority=True)
    await store.put(IN, b"x", {"team": "blue"}, max_items=1000)

    assert await store.count(IN) == 6
    assert await store.count(IN, priority_only=True) == 2
    assert await store.count(IN, tags={"team": "blue"}) == 1


async def test_a_watch_connection_that_leaves_holding_nothing_leaves_no_consumer_behind(
    store: QueueStore, client: redis.Redis
) -> None:
    await put(store, SINK, 2)
    await deliver(store, SINK, "holds-one", want=1)
    await deliver(store, SINK, "committed-all", want=1)
    await store.remove(SINK, [2], group="eas")

    for consumer in ("holds-one", "committed-all"):
        await store.held(SINK, group="eas", consumer=consumer, mode="release", most=10)

    # The one that held an item keeps it (released: claimable by another consumer at once).
    assert {c["name"] for c in client.xinfo_consumers(SINK.normal, "eas")} == {b"holds-one"}


async def test_join_drops_idle_consumers_holding_nothing_once_a_group_has_many(
    store: QueueStore, client: redis.Redis
) -> None:
    await put(store, SINK, 1)
    await deliver(store, SINK, "holds-one", want=1)
    for n in range(70):  # consumers an API that died left behind, holding nothing
        client.xgroup_createconsumer(SINK.normal, "eas", f"left-{n}")
    time.sleep(0.01)  # idle longer than the 0 ms this join allows

    await store.join(SINK, "eas", start_index=0, max_groups=4, idle_ms=0)

    assert {c["name"] for c in client.xinfo_consumers(SINK.normal, "eas")} == {b"holds-one"}
    assert WORKER_GROUP not in {g["name"].decode() for g in client.xinfo_groups(SINK.normal)}


# --- the API processes' registry --------------------------------------------------------------


async def test_a_live_api_process_is_listed_until_it_leaves(store: QueueStore) -> None:
    await store.heartbeat_api([SERVICE, "other"], "10.0.0.5:8000/chan-1", ttl=30)
    await store.heartbeat_api([SERVICE], "10.0.0.6:8000/chan-2", ttl=-1)  # its heartbeat lapsed

    assert await store.live_apis(SERVICE) == ["10.0.0.5:8000/chan-1"]
    await store.leave_api([SERVICE], "10.0.0.5:8000/chan-1")
    assert await store.live_apis(SERVICE) == []
    assert await store.live_apis("other") == ["10.0.0.5:8000/chan-1"]
