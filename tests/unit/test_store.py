"""The store on a real Redis, as the API (QueueStore) and a worker (WorkerStore) use it.

Every test that changes a queue ends by recounting the streams (`assert_counts_true`): the hot-path scripts
read the counters instead of scanning, so a counter that drifts stalls takes or refuses puts silently.
"""

from __future__ import annotations

import asyncio
import dataclasses
import threading
import time
import uuid
from collections.abc import Callable

import pytest
import redis
import redis.asyncio

from queue_service.embedded_redis import RedisServer
from queue_service.store import consumer as consumer_module
from queue_service.store import keys, scripts
from queue_service.store import queues as queues_module
from queue_service.store.consumer import Finish, TakeRules, WorkerStore
from queue_service.store.keys import WORKER_GROUP, QueueKeys
from queue_service.store.model import (
    CANCELLED,
    HANDED_OVER,
    HELD,
    REPLY_TTL_MS,
    DataFrame,
    Finished,
    Item,
    ItemGone,
    NoLiveWorker,
    NotHolder,
    Outcome,
    QueueFull,
    StoreError,
    TooManyGroups,
)
from queue_service.store.queues import QueueStore
from queue_service.store.scripts import decode_reply
from tests.support.counts import assert_counts_true, counters
from workers.runner import given_up

SERVICE = "echo"
IN = keys.input_queue(SERVICE)
SINK = keys.sink_queue(SERVICE)
# Long enough that an item just taken never looks lapsed on a loaded machine; tests make items lapse by hand.
LEASE_MS = 3000
RULES = TakeRules(lease_ms=LEASE_MS, max_delivery=3, sink_max_items=1000, sink_max_bytes=1_000_000)
ANY_SIZE = 1 << 30
CHANNEL = "api-process-1"


@pytest.fixture
def worker(client: redis.Redis) -> WorkerStore:
    return WorkerStore(client, "worker-1")


@pytest.fixture
def other_worker(client: redis.Redis) -> WorkerStore:
    return WorkerStore(client, "worker-2")


@pytest.fixture
def past_restart_guard(shared_redis_server: RedisServer) -> None:
    """Lapsed items are claimed only once Redis has been up for a lease (before that, only released ones)."""
    probe = redis.Redis.from_url(shared_redis_server.url)
    try:
        deadline = time.monotonic() + 30
        while int(probe.info("server")["uptime_in_seconds"]) * 1000 < LEASE_MS:
            assert time.monotonic() < deadline, "the shared redis-server never reached the uptime of a lease"
            time.sleep(0.1)
    finally:
        probe.close()


def rules(**changes: int) -> TakeRules:
    return dataclasses.replace(RULES, **changes)


def take_one(worker: WorkerStore, take_rules: TakeRules = RULES, *, claim: bool = False) -> Item:
    taken = worker.take(SERVICE, take_rules, claim=claim)
    assert len(taken.items) == 1, f"expected one item, got {taken}"
    return taken.items[0]


def took_nothing(worker: WorkerStore, take_rules: TakeRules = RULES, *, claim: bool = False) -> bool:
    return worker.take(SERVICE, take_rules, claim=claim).items == []


def lapse(client: redis.Redis, holder: WorkerStore, item: Item) -> None:
    """As if the holder had been silent (killed, hung) for longer than the lease."""
    client.xclaim(item.stream, WORKER_GROUP, holder.name, 0, [item.entry_id], idle=LEASE_MS + 1000, justid=True)


async def put_many(store: QueueStore, count: int, qk: QueueKeys = IN, max_items: int = 1000) -> list[int]:
    return [(await store.put(qk, f"item {n}".encode(), {}, max_items=max_items)).index for n in range(count)]


async def frames_in(store: QueueStore, qk: QueueKeys = IN) -> list[DataFrame]:
    return (await store.read(qk, length=1000, max_bytes=ANY_SIZE)).frames


async def indexes_in(store: QueueStore, qk: QueueKeys = IN) -> list[int]:
    return [frame.index for frame in await frames_in(store, qk)]


def now_ms() -> int:
    return int(time.time() * 1000)


# --- put and its bounds ---------------------------------------------------------------------


async def test_put_returns_increasing_indexes(store: QueueStore, client: redis.Redis) -> None:
    assert await put_many(store, 4) == [1, 2, 3, 4]
    assert_counts_true(client)


async def test_put_gives_each_item_a_unique_uuid4_request_id(store: QueueStore) -> None:
    ids = [(await store.put(IN, b"x", {}, max_items=100)).request_id for _ in range(20)]

    assert len(set(ids)) == 20
    for request_id in ids:
        parsed = uuid.UUID(request_id)
        assert (parsed.version, str(parsed)) == (4, request_id)


async def test_input_queue_and_sink_count_indexes_separately(store: QueueStore, client: redis.Redis) -> None:
    await put_many(store, 3)

    assert (await store.put(SINK, b"result", {}, max_items=10)).index == 1
    assert_counts_true(client)


async def test_tags_are_stored_and_returned_with_the_request_id(store: QueueStore) -> None:
    put = await store.put(IN, b"x", {"user": "ana", "lang": "日本語"}, max_items=10)

    (frame,) = await frames_in(store)

    assert frame.tags == {"user": "ana", "lang": "日本語", "requestId": put.request_id}


async def test_put_is_refused_at_exactly_the_waiting_bound(store: QueueStore, client: redis.Redis) -> None:
    await put_many(store, 3, max_items=3)

    with pytest.raises(QueueFull, match=r"echo/input is full \(3 waiting\)"):
        await store.put(IN, b"one too many", {}, max_items=3)
    assert await indexes_in(store) == [1, 2, 3]
    assert_counts_true(client)


async def test_priority_items_share_the_waiting_bound(store: QueueStore, client: redis.Redis) -> None:
    await store.put(IN, b"normal", {}, max_items=2)
    await store.put(IN, b"urgent", {}, max_items=2, priority=True)

    with pytest.raises(QueueFull):
        await store.put(IN, b"urgent too", {}, max_items=2, priority=True)
    assert_counts_true(client)


async def test_items_taken_by_a_worker_do_not_count_as_waiting(
    store: QueueStore, worker: WorkerStore, client: redis.Redis
) -> None:
    await put_many(store, 2, max_items=2)
    take_one(worker)

    assert (await store.put(IN, b"fits", {}, max_items=2)).index == 3
    with pytest.raises(QueueFull):
        await store.put(IN, b"does not", {}, max_items=2)
    assert_counts_true(client)


async def test_deleted_items_free_their_places(store: QueueStore, client: redis.Redis) -> None:
    await put_many(store, 2, max_items=2)
    await store.remove(IN, [1])

    assert (await store.put(IN, b"fits", {}, max_items=2)).index == 3
    assert_counts_true(client)


async def test_a_finished_item_frees_its_place(store: QueueStore, worker: WorkerStore, client: redis.Redis) -> None:
    await put_many(store, 1, max_items=1)
    worker.finish(take_one(worker), Outcome(b"done"))

    assert (await store.put(IN, b"next", {}, max_items=1)).index == 2
    assert_counts_true(client)


async def test_an_item_removed_while_held_frees_its_place_once(
    store: QueueStore, worker: WorkerStore, client: redis.Redis
) -> None:
    await put_many(store, 1, max_items=1)
    take_one(worker)
    await store.remove(IN, [1])  # deleted while the worker held it: cancelled
    assert_counts_true(client)

    await store.put(IN, b"next", {}, max_items=1)
    with pytest.raises(QueueFull):
        await store.put(IN, b"over", {}, max_items=1)
    assert_counts_true(client)


async def test_the_sink_is_bounded_by_its_results(store: QueueStore, client: redis.Redis) -> None:
    await store.put(SINK, b"r1", {}, max_items=2)
    await store.put(SINK, b"r2", {}, max_items=2)
    await frames_in(store, SINK)  # reading without deleting frees nothing

    with pytest.raises(QueueFull, match=r"echo/sink is full \(2 results\)"):
        await store.put(SINK, b"r3", {}, max_items=2)
    await store.remove(SINK, [1])
    assert (await store.put(SINK, b"r3", {}, max_items=2)).index == 3  # a refused put used no index
    assert_counts_true(client)


async def test_the_sink_is_bounded_by_its_bytes(store: QueueStore, client: redis.Redis) -> None:
    await store.put(SINK, b"x" * 600, {}, max_items=100, max_bytes=1000)

    with pytest.raises(QueueFull, match=r"echo/sink is full \(1000 bytes of results\)"):
        await store.put(SINK, b"y" * 401, {}, max_items=100, max_bytes=1000)
    assert (await store.put(SINK, b"z" * 400, {}, max_items=100, max_bytes=1000)).index == 2
    assert_counts_true(client)


async def test_the_sink_bound_counts_the_results_held_items_will_write(
    store: QueueStore, worker: WorkerStore, client: redis.Redis
) -> None:
    await put_many(store, 1)
    take_one(worker)  # its result will need a place in the sink

    await store.put(SINK, b"r1", {}, max_items=2)
    with pytest.raises(QueueFull):
        await store.put(SINK, b"r2", {}, max_items=2)
    assert_counts_true(client)


async def test_one_service_being_full_does_not_refuse_another(store: QueueStore, client: redis.Redis) -> None:
    small = keys.input_queue("small")
    await store.put(small, b"x", {}, max_items=1)

    with pytest.raises(QueueFull):
        await store.put(small, b"over", {}, max_items=1)
    assert (await store.put(IN, b"elsewhere", {}, max_items=1)).index == 1
    assert_counts_true(client, "small")
    assert_counts_true(client)


async def test_a_put_resent_with_the_same_request_id_stores_nothing_twice(
    store: QueueStore, worker: WorkerStore, client: redis.Redis
) -> None:
    first = await store.put(IN, b"once", {}, max_items=10, request_id="resent-1")
    again = await store.put(IN, b"once", {}, max_items=10, request_id="resent-1")
    assert again == first
    assert await indexes_in(store) == [first.index]
    assert_counts_true(client)

    take_one(worker)
    held_again = await store.put(IN, b"once", {}, max_items=10, request_id="resent-1")  # while a worker has it
    assert held_again == first
    assert await indexes_in(store) == [first.index]
    assert_counts_true(client)


async def test_a_sync_put_needs_a_live_worker(store: QueueStore, worker: WorkerStore, client: redis.Redis) -> None:
    with pytest.raises(NoLiveWorker):
        await store.put(IN, b"question", {}, max_items=10, reply_channel=CHANNEL)
    assert await indexes_in(store) == []

    worker.heartbeat([SERVICE], ttl=30)
    assert (await store.put(IN, b"question", {}, max_items=10, reply_channel=CHANNEL)).index == 1
    assert_counts_true(client)


async def test_a_sync_put_told_not_to_look_for_a_live_worker_is_accepted_without_one(
    store: QueueStore, client: redis.Redis
) -> None:
    # The API looks once a second (api/sync.py); the puts in between trust that look.
    put = await store.put(IN, b"question", {}, max_items=10, reply_channel=CHANNEL, check_live=False)

    assert await indexes_in(store) == [put.index]
    assert_counts_true(client)


async def test_an_api_heartbeat_keeps_its_reply_streams_alive(store: QueueStore, client: redis.Redis) -> None:
    # Workers answer into the stream with one XADD (NOMKSTREAM) and leave its lifetime to its API process.
    stream = keys.replies(SERVICE, CHANNEL)
    client.xadd(stream, {"rid": "r"})
    client.pexpire(stream, 1000)  # about to lapse

    await store.heartbeat_api([SERVICE], f"10.0.0.5:8000/{CHANNEL}", ttl=30)

    assert REPLY_TTL_MS - 5000 < client.pttl(stream) <= REPLY_TTL_MS


async def test_a_sync_put_is_refused_when_every_worker_heartbeat_lapsed(store: QueueStore, worker: WorkerStore) -> None:
    worker.heartbeat([SERVICE], ttl=-1)

    with pytest.raises(NoLiveWorker):
        await store.put(IN, b"question", {}, max_items=10, reply_channel=CHANNEL)


# --- take -----------------------------------------------------------------------------------


async def test_take_of_an_empty_queue_finds_nothing(worker: WorkerStore) -> None:
    taken = worker.take(SERVICE, RULES)

    assert (taken.items, taken.sink_full, taken.last_index) == ([], False, 0)


async def test_take_hands_over_the_item_as_it_was_put(store: QueueStore, worker: WorkerStore) -> None:
    put = await store.put(IN, b"\x00\xffpayload", {"user": "ana"}, max_items=10, path="v1/run")

    item = take_one(worker)

    assert (item.index, item.request_id, item.deliveries, item.exhausted) == (put.index, put.request_id, 1, False)
    assert (item.data, item.tags, item.sync, item.path) == (b"\x00\xffpayload", {"user": "ana"}, False, "v1/run")
    assert abs(item.put_ms / 1000 - time.time()) < 60


async def test_take_finding_nothing_tells_the_last_index_to_wait_after(
    store: QueueStore, worker: WorkerStore, client: redis.Redis
) -> None:
    await put_many(store, 2)
    worker.take(SERVICE, RULES, want=2)

    assert worker.take(SERVICE, RULES).last_index == 2
    assert_counts_true(client)


async def test_priority_items_are_taken_before_normal_ones(
    store: QueueStore, worker: WorkerStore, client: redis.Redis
) -> None:
    await store.put(IN, b"normal 1", {}, max_items=10)
    await store.put(IN, b"normal 2", {}, max_items=10)
    await store.put(IN, b"urgent", {}, max_items=10, priority=True)

    order = [take_one(worker).data for _ in range(3)]

    assert order == [b"urgent", b"normal 1", b"normal 2"]
    assert took_nothing(worker)
    assert_counts_true(client)


async def test_one_take_can_hand_over_several_items_priority_first(
    store: QueueStore, worker: WorkerStore, client: redis.Redis
) -> None:
    await put_many(store, 3)
    await store.put(IN, b"urgent", {}, max_items=10, priority=True)

    taken = worker.take(SERVICE, RULES, want=3)

    assert [item.index for item in taken.items] == [4, 1, 2]
    assert_counts_true(client)


async def test_two_workers_never_take_the_same_item(
    store: QueueStore, worker: WorkerStore, other_worker: WorkerStore, client: redis.Redis
) -> None:
    await store.put(IN, b"a", {}, max_items=10)
    await store.put(IN, b"b", {}, max_items=10)

    first, second = take_one(worker), take_one(other_worker)

    assert {first.data, second.data} == {b"a", b"b"}
    assert took_nothing(worker)
    assert took_nothing(other_worker)
    assert_counts_true(client)


async def test_a_sink_full_of_results_stops_take_until_results_are_removed(
    store: QueueStore, worker: WorkerStore, client: redis.Redis
) -> None:
    one_result = rules(sink_max_items=1)
    await store.put(IN, b"first", {}, max_items=10)
    second = await store.put(IN, b"second", {}, max_items=10)
    worker.finish(take_one(worker, one_result), Outcome(b"result 1"))

    taken = worker.take(SERVICE, one_result)

    assert (taken.items, taken.sink_full) == ([], True)
    position = await store.search(IN, second.index)
    assert position is not None and not position.is_pending  # still waiting, not dropped
    assert_counts_true(client)

    await store.remove(SINK, [1])
    assert take_one(worker, one_result).data == b"second"
    assert_counts_true(client)


async def test_held_async_items_take_their_results_room_in_the_sink(
    store: QueueStore, worker: WorkerStore, client: redis.Redis
) -> None:
    two_results = rules(sink_max_items=2)
    await put_many(store, 3)

    first = worker.take(SERVICE, two_results, want=3)
    assert len(first.items) == 2  # room for two results only
    assert_counts_true(client)
    second = worker.take(SERVICE, two_results)
    assert (second.items, second.sink_full) == ([], True)


async def test_held_sync_items_take_no_room_in_the_sink(
    store: QueueStore, worker: WorkerStore, client: redis.Redis
) -> None:
    one_result = rules(sink_max_items=1)
    worker.heartbeat([SERVICE], ttl=30)
    for _ in range(2):
        await store.put(IN, b"question", {}, max_items=10, reply_channel=CHANNEL)

    first, second = take_one(worker, one_result), take_one(worker, one_result)

    assert first.sync and second.sync
    assert counters(client, SERVICE)["sink_used"] == 0
    assert_counts_true(client)


async def test_a_sink_full_of_bytes_stops_take(store: QueueStore, worker: WorkerStore, client: redis.Redis) -> None:
    ten_bytes = rules(sink_max_bytes=10)
    await put_many(store, 2)
    worker.finish(take_one(worker, ten_bytes), Outcome(b"0123456789"))

    taken = worker.take(SERVICE, ten_bytes)

    assert (taken.items, taken.sink_full) == ([], True)
    assert_counts_true(client)


async def test_a_lapsed_item_is_taken_again_only_by_a_claiming_take(
    store: QueueStore, worker: WorkerStore, other_worker: WorkerStore, client: redis.Redis, past_restart_guard: None
) -> None:
    put = await store.put(IN, b"slow", {}, max_items=10)
    lapse(client, worker, take_one(worker))

    assert took_nothing(other_worker)  # a plain take never looks at lapsed items
    again = take_one(other_worker, claim=True)

    assert (again.request_id, again.deliveries) == (put.request_id, 2)
    assert_counts_true(client)


async def test_an_item_is_not_claimed_while_its_lease_holds(
    store: QueueStore, worker: WorkerStore, other_worker: WorkerStore, past_restart_guard: None
) -> None:
    await put_many(store, 1)
    take_one(worker)

    assert took_nothing(other_worker, claim=True)


async def test_only_the_result_of_the_worker_that_took_a_lapsed_item_over_counts(
    store: QueueStore, worker: WorkerStore, other_worker: WorkerStore, client: redis.Redis, past_restart_guard: None
) -> None:
    await put_many(store, 1)
    first = take_one(worker)
    lapse(client, worker, first)
    second = take_one(other_worker, claim=True)

    with pytest.raises(NotHolder) as refused:
        worker.finish(first, Outcome(b"late result"))
    assert not isinstance(refused.value, ItemGone)  # the item is there: someone else holds it
    assert await frames_in(store, SINK) == []
    assert other_worker.finish(second, Outcome(b"the result")).sink_index == 1
    assert [frame.data for frame in await frames_in(store, SINK)] == [b"the result"]
    assert_counts_true(client)


async def test_an_item_delivered_max_delivery_times_comes_back_exhausted(
    store: QueueStore, worker: WorkerStore, client: redis.Redis, past_restart_guard: None
) -> None:
    twice = rules(max_delivery=2)
    await store.put(IN, b"crashes every worker", {"user": "ana"}, max_items=10)
    first = take_one(worker, twice)
    lapse(client, worker, first)
    second = take_one(worker, twice, claim=True)
    assert (second.deliveries, second.exhausted) == (2, False)
    lapse(client, worker, second)

    third = take_one(worker, twice, claim=True)

    assert (third.deliveries, third.exhausted) == (3, True)
    worker.finish(third, given_up(third))  # what a worker does with it: a terminal answer, not a third run
    (result,) = await frames_in(store, SINK)
    assert result.tags == {"user": "ana", "requestId": third.request_id, "lastCode": "500"}
    assert "given up after 2 deliveries" in result.message
    assert await frames_in(store) == []
    assert_counts_true(client)


async def test_max_delivery_one_means_the_first_lapse_exhausts_the_item(
    store: QueueStore, worker: WorkerStore, client: redis.Redis, past_restart_guard: None
) -> None:
    once = rules(max_delivery=1)
    await put_many(store, 1)
    lapse(client, worker, take_one(worker, once))

    assert take_one(worker, once, claim=True).exhausted


async def test_an_exhausted_item_does_not_stop_the_next(
    store: QueueStore, worker: WorkerStore, client: redis.Redis, past_restart_guard: None
) -> None:
    once = rules(max_delivery=1)
    await store.put(IN, b"poison", {}, max_items=10)
    await store.put(IN, b"fine", {}, max_items=10)
    lapse(client, worker, take_one(worker, once))

    poison = take_one(worker, once, claim=True)
    worker.finish(poison, given_up(poison))

    assert take_one(worker, once).data == b"fine"
    assert_counts_true(client)


async def test_right_after_redis_starts_a_claim_takes_only_released_items(
    store: QueueStore, worker: WorkerStore, other_worker: WorkerStore, client: redis.Redis
) -> None:
    # A lease longer than Redis has been up: every idle time may include downtime, so none is trusted.
    hour = rules(lease_ms=3_600_000)
    await put_many(store, 1)
    item = take_one(worker, hour)
    client.xclaim(item.stream, WORKER_GROUP, worker.name, 0, [item.entry_id], idle=7_200_000, justid=True)

    assert took_nothing(other_worker, hour, claim=True)
    # The guard is what kept it: the same claim without it takes the item (a restarted Redis would hand
    # out every held item at once, to be run twice).
    unguarded = scripts.take(
        SERVICE,
        consumer=other_worker.name,
        want=1,
        lease_ms=3_600_000,
        max_delivery=3,
        sink_max_items=10,
        sink_max_bytes=10**6,
        restart_guard=False,
    )
    assert len(other_worker.scripts.run(unguarded).items) == 1
    assert_counts_true(client)


async def test_right_after_redis_starts_a_released_item_is_still_claimed_at_once(
    store: QueueStore, worker: WorkerStore, other_worker: WorkerStore, client: redis.Redis
) -> None:
    hour = rules(lease_ms=3_600_000)
    await put_many(store, 1)
    item = take_one(worker, hour)

    worker.release(item)

    assert take_one(other_worker, hour, claim=True).deliveries == 2
    assert_counts_true(client)


# --- finish ---------------------------------------------------------------------------------


async def test_finish_writes_the_result_to_the_sink_and_removes_the_input(
    store: QueueStore, worker: WorkerStore, client: redis.Redis
) -> None:
    put = await store.put(IN, b"hello", {"user": "ana"}, max_items=10)

    written = worker.finish(take_one(worker), Outcome(b"HELLO"), processing_seconds=0.1).sink_index

    (result,) = (await store.read(SINK, request_id=put.request_id, max_bytes=ANY_SIZE)).frames
    assert written == result.index == 1
    assert (result.data, result.tags) == (b"HELLO", {"user": "ana", "requestId": put.request_id})
    assert await frames_in(store) == []
    assert await store.search(IN, put.index) is None
    assert_counts_true(client)


async def test_a_chains_results_go_in_one_call_and_only_the_items_still_held_are_published(
    store: QueueStore, worker: WorkerStore, other_worker: WorkerStore, client: redis.Redis
) -> None:
    await put_many(store, 5)
    chain = worker.take(SERVICE, RULES, want=4).items
    worker.release(chain[1])  # its lease handed on: another worker holds it now
    assert take_one(other_worker, claim=True).index == chain[1].index
    client.script_load(worker.scripts.source_of("finish"))  # known to Redis, as after any earlier finish
    before = client.info("commandstats")["cmdstat_evalsha"]["calls"]

    answers = worker.finish_many([Finish(item, Outcome(f"r{item.index}".encode())) for item in chain])

    assert client.info("commandstats")["cmdstat_evalsha"]["calls"] - before == 1  # one call for the chain
    assert [type(a).__name__ for a in answers] == ["Finished", "NotHolder", "Finished", "Finished"]
    assert [a.waiting for a in answers if isinstance(a, Finished)] == [None, None, 1]  # the last one tells
    assert [r.data for r in await frames_in(store, SINK)] == [b"r1", b"r3", b"r4"]
    assert await indexes_in(store) == [2, 5]  # the item the other worker holds, and the one left waiting
    assert_counts_true(client)


def commands_during(client: redis.Redis, names: list[str], action: Callable[[], object]) -> dict[str, int]:
    """How many times Redis ran each named command (inside scripts too) while `action` ran."""

    def calls() -> dict[str, int]:
        stats = client.info("commandstats")
        return {name: int(stats.get(f"cmdstat_{name}", {}).get("calls", 0)) for name in names}

    before = calls()
    action()
    return {name: count - before[name] for name, count in calls().items()}


async def test_a_finish_soon_after_the_take_needs_no_holder_check_and_still_sees_a_cancel(
    store: QueueStore, client: redis.Redis
) -> None:
    # Within half a lease of its take no other worker can have claimed the item: the XACK is the check.
    fresh = WorkerStore(client, "worker-1", lease_seconds={SERVICE: 3600})
    await put_many(store, 2)
    kept, cancelled = fresh.take(SERVICE, RULES, want=2).items
    await store.cancel(SERVICE, [cancelled.index])  # removed while held: its worker writes the terminal answer

    answers: list[Finished | StoreError] = []
    finishes = [Finish(kept, Outcome(b"one")), Finish(cancelled, Outcome(b"two"))]
    used = commands_during(client, ["xpending", "xack"], lambda: answers.extend(fresh.finish_many(finishes)))

    assert [type(a).__name__ for a in answers] == ["Finished", "ItemGone"]
    assert used == {"xpending": 0, "xack": 2}
    assert [r.data for r in await frames_in(store, SINK)] == [b"one"]
    assert await frames_in(store) == []
    assert_counts_true(client)


async def test_a_finish_late_in_its_lease_checks_the_holder(
    store: QueueStore, worker: WorkerStore, other_worker: WorkerStore, client: redis.Redis
) -> None:
    late = WorkerStore(client, "worker-1", lease_seconds={SERVICE: 0.2})
    await put_many(store, 1)
    item = late.take(SERVICE, RULES).items[0]
    late.release(item)  # as if its lease lapsed: another worker takes it over
    assert take_one(other_worker, claim=True).index == item.index
    time.sleep(0.15)  # past half its lease

    with pytest.raises(NotHolder):
        late.finish(item, Outcome(b"stale"))

    assert await frames_in(store, SINK) == []
    assert_counts_true(client)


async def test_a_finish_tells_how_many_items_wait(store: QueueStore, worker: WorkerStore) -> None:
    await put_many(store, 3)
    first, second = worker.take(SERVICE, RULES, want=2).items

    with_one_waiting = worker.finish(first, Outcome(b"one"))
    worker.take(SERVICE, RULES)
    with_none_waiting = worker.finish(second, Outcome(b"two"))

    assert (with_one_waiting.waiting, with_none_waiting.waiting) == (1, 0)


async def test_a_finish_can_take_the_next_item_in_its_round_trip(
    store: QueueStore, worker: WorkerStore, client: redis.Redis
) -> None:
    await put_many(store, 2)
    first = take_one(worker)
    # As on a Redis that ran a finish before (alone, this test would meet a Redis that knows no finish.lua:
    # the take runs, and the finish is loaded and sent again after it).
    client.script_load(worker.scripts.source_of("finish"))

    [finished], taken = worker.finish_then_take([Finish(first, Outcome(b"one"))], SERVICE, RULES)

    assert isinstance(finished, Finished) and finished.waiting == 1  # counted before the take
    assert [(item.index, item.deliveries) for item in taken.items] == [(2, 1)]
    assert [r.data for r in await frames_in(store, SINK)] == [b"one"]
    [finished], taken = worker.finish_then_take([Finish(taken.items[0], Outcome(b"two"))], SERVICE, RULES)
    assert (finished.waiting, taken.items, taken.last_index) == (0, [], 2)
    assert_counts_true(client)


async def test_a_failed_item_carries_its_status_as_last_code(
    store: QueueStore, worker: WorkerStore, client: redis.Redis
) -> None:
    put = await store.put(IN, b"bad input", {}, max_items=10)

    worker.finish(take_one(worker), Outcome.failure(400, "ValueError: no"))

    (result,) = await frames_in(store, SINK)
    assert result.tags == {"requestId": put.request_id, "lastCode": "400"}
    assert (result.data, result.message) == (b"ValueError: no", "ValueError: no")
    assert_counts_true(client)


async def test_an_empty_failure_still_reaches_the_sink(
    store: QueueStore, worker: WorkerStore, client: redis.Redis
) -> None:
    await put_many(store, 1)

    worker.finish(take_one(worker), Outcome(b"", status=503))

    assert [(r.data, r.tags["lastCode"]) for r in await frames_in(store, SINK)] == [(b"", "503")]
    assert_counts_true(client)


async def test_an_empty_200_result_writes_nothing_but_its_status_says_finished(
    store: QueueStore, worker: WorkerStore, client: redis.Redis
) -> None:
    put = await store.put(IN, b"delivered elsewhere", {}, max_items=10)

    written = worker.finish(take_one(worker), Outcome(b"")).sink_index

    assert written == 0
    assert await frames_in(store, SINK) == []
    assert await frames_in(store) == []
    state = await store.status(SERVICE, put.request_id)
    assert state is not None and (state.state, state.status) == ("removed", 200)
    assert_counts_true(client)


async def test_a_sync_item_is_answered_on_its_reply_stream_never_the_sink(
    store: QueueStore, worker: WorkerStore, client: redis.Redis
) -> None:
    worker.heartbeat([SERVICE], ttl=30)
    put = await store.put(IN, b"question", {}, max_items=10, reply_channel=CHANNEL)
    item = take_one(worker)
    assert item.sync and item.reply_channel == CHANNEL

    worker.finish(item, Outcome(b"answer", status=201, content_type="text/plain"), processing_seconds=0.25)

    reply_stream = keys.replies(SERVICE, CHANNEL)
    [reply] = [decode_reply(fields) for _, fields in client.xrange(reply_stream)]
    assert reply.request_id == put.request_id
    assert reply.outcome == Outcome(b"answer", status=201, content_type="text/plain")
    assert reply.processing == 0.25  # for the API's log line of this request
    assert 0 <= reply.queue_wait < 60
    assert 0 < client.pttl(reply_stream) <= REPLY_TTL_MS  # an answer nobody reads expires
    assert await frames_in(store, SINK) == []
    assert await frames_in(store) == []
    assert_counts_true(client)


async def test_a_sync_item_with_an_empty_answer_is_still_answered(
    store: QueueStore, worker: WorkerStore, client: redis.Redis
) -> None:
    worker.heartbeat([SERVICE], ttl=30)
    await store.put(IN, b"question", {}, max_items=10, reply_channel=CHANNEL)

    worker.finish(take_one(worker), Outcome(b""))

    [(_, fields)] = client.xrange(keys.replies(SERVICE, CHANNEL))
    assert decode_reply(fields).outcome == Outcome(b"", status=200)
    assert_counts_true(client)


async def test_finish_of_an_item_removed_while_it_ran_is_item_gone(
    store: QueueStore, worker: WorkerStore, client: redis.Redis
) -> None:
    put = await store.put(IN, b"x", {}, max_items=10)
    item = take_one(worker)
    await store.remove(IN, [put.index])

    with pytest.raises(ItemGone):
        worker.finish(item, Outcome(b"unwanted"))
    assert await frames_in(store, SINK) == []
    assert_counts_true(client)


async def test_the_terminal_answer_of_a_cancelled_item_reaches_the_sink(
    store: QueueStore, worker: WorkerStore, client: redis.Redis
) -> None:
    put = await store.put(IN, b"x", {}, max_items=10)
    item = take_one(worker)
    await store.remove(IN, [put.index])  # cancelled: its room in the sink was given back

    worker.finish(item, Outcome.failure(499, "cancelled"), held=False)

    (result,) = await frames_in(store, SINK)
    assert (result.tags["requestId"], result.tags["lastCode"]) == (put.request_id, "499")
    assert_counts_true(client)


async def test_a_finish_resent_after_its_answer_was_lost_keeps_the_counters_true(
    store: QueueStore, worker: WorkerStore, client: redis.Redis
) -> None:
    """A worker whose finish reached Redis but whose answer was lost (a dropped connection) sends it again,
    hears ItemGone while its lease was still its own, and publishes a 'cancelled' answer (held=False), as a
    cancelled item gets. The result already in the sink stands, and nothing is counted twice."""
    await put_many(store, 1)
    item = take_one(worker)
    worker.finish(item, Outcome(b"the result"))
    with pytest.raises(ItemGone):
        worker.finish(item, Outcome(b"the result"))

    worker.finish(item, Outcome.failure(499, "cancelled: the item was deleted while it ran"), held=False)

    assert [frame.data for frame in await frames_in(store, SINK)] == [b"the result"]
    assert_counts_true(client)


async def test_a_request_id_put_again_after_its_result_was_written_keeps_the_counters_true(
    store: QueueStore, worker: WorkerStore, client: redis.Redis
) -> None:
    """The input queue forgets a request id once its item is done; a late resend is a new item, and its
    result finds the first one in the sink: nothing more is written, and its room is given back."""
    await store.put(IN, b"x", {}, max_items=10, request_id="late-resend")
    worker.finish(take_one(worker), Outcome(b"first"))
    await store.put(IN, b"x", {}, max_items=10, request_id="late-resend")

    worker.finish(take_one(worker), Outcome(b"second"))

    assert [frame.data for frame in await frames_in(store, SINK)] == [b"first"]
    assert_counts_true(client)


# --- renew and release ----------------------------------------------------------------------


async def test_a_renewed_lease_keeps_the_item_from_claiming_workers(
    store: QueueStore, worker: WorkerStore, other_worker: WorkerStore, client: redis.Redis, past_restart_guard: None
) -> None:
    await put_many(store, 1)
    item = take_one(worker)
    lapse(client, worker, item)  # silent for longer than a lease, but nobody claimed it yet

    assert worker.renew(item) == HELD
    assert took_nothing(other_worker, claim=True)
    assert worker.finish(item, Outcome(b"done")).sink_index == 1
    assert_counts_true(client)


async def test_renew_reports_an_item_removed_while_it_ran_as_cancelled(
    store: QueueStore, worker: WorkerStore, client: redis.Redis
) -> None:
    put = await store.put(IN, b"x", {}, max_items=10)
    item = take_one(worker)

    await store.remove(IN, [put.index])

    assert worker.renew(item) == CANCELLED
    assert_counts_true(client)


async def test_renew_reports_an_item_handed_to_another_worker(
    store: QueueStore, worker: WorkerStore, other_worker: WorkerStore, client: redis.Redis, past_restart_guard: None
) -> None:
    await put_many(store, 1)
    item = take_one(worker)
    lapse(client, worker, item)
    take_one(other_worker, claim=True)

    assert worker.renew(item) == HANDED_OVER


async def test_a_released_item_is_claimed_at_once_by_another_worker(
    store: QueueStore, worker: WorkerStore, other_worker: WorkerStore, client: redis.Redis
) -> None:
    put = await store.put(IN, b"x", {}, max_items=10)
    item = take_one(worker)

    worker.release(item)
    again = take_one(other_worker, claim=True)

    assert (again.request_id, again.deliveries) == (put.request_id, 2)
    with pytest.raises(NotHolder):
        worker.finish(item, Outcome(b"too late"))
    assert_counts_true(client)


# --- reads ----------------------------------------------------------------------------------


async def test_read_from_an_index_returns_at_most_length_items(store: QueueStore) -> None:
    await put_many(store, 5)

    found = await store.read(IN, start=2, length=2, max_bytes=ANY_SIZE)

    assert [(f.index, f.data) for f in found.frames] == [(2, b"item 1"), (3, b"item 2")]
    assert found.last_index == 5


async def test_read_from_index_zero_starts_at_the_head(store: QueueStore) -> None:
    await put_many(store, 3)

    assert [f.index for f in (await store.read(IN, start=0, max_bytes=ANY_SIZE)).frames] == [1]


async def test_priority_items_are_read_before_normal_ones(store: QueueStore) -> None:
    await store.put(IN, b"normal 1", {}, max_items=10)
    await store.put(IN, b"normal 2", {}, max_items=10)
    await store.put(IN, b"urgent", {}, max_items=10, priority=True)

    frames = await frames_in(store)

    assert [(f.index, f.data) for f in frames] == [(3, b"urgent"), (1, b"normal 1"), (2, b"normal 2")]


async def test_read_stops_at_max_bytes_but_answers_at_least_one_item(store: QueueStore) -> None:
    for size in (400, 400, 400):
        await store.put(SINK, b"x" * size, {}, max_items=10)

    assert [f.index for f in (await store.read(SINK, length=10, max_bytes=900)).frames] == [1, 2]
    assert [f.index for f in (await store.read(SINK, length=10, max_bytes=10)).frames] == [1]


async def test_read_with_a_tag_filter_returns_only_matching_items(store: QueueStore) -> None:
    await store.put(IN, b"a", {"user": "ana", "kind": "img"}, max_items=10)
    await store.put(IN, b"b", {"user": "bob", "kind": "img"}, max_items=10)
    await store.put(IN, b"c", {"user": "ana", "kind": "txt"}, max_items=10)

    async def matching(tags: dict[str, str]) -> list[bytes]:
        return [f.data for f in (await store.read(IN, length=10, tags=tags, max_bytes=ANY_SIZE)).frames]

    assert await matching({"user": "ana"}) == [b"a", b"c"]
    assert await matching({"user": "ana", "kind": "txt"}) == [b"c"]
    assert await matching({"user": "eve"}) == []


async def test_read_by_request_id_finds_that_item_only(store: QueueStore) -> None:
    await store.put(IN, b"first", {}, max_items=10)
    wanted = await store.put(IN, b"\x00\xff second", {}, max_items=10)
    await store.put(IN, b"third", {}, max_items=10)

    found = await store.read(IN, request_id=wanted.request_id, length=10, max_bytes=ANY_SIZE)

    assert [(f.index, f.data) for f in found.frames] == [(wanted.index, b"\x00\xff second")]
    assert found.frames[0].tags["requestId"] == wanted.request_id
    assert (await store.read(IN, request_id=str(uuid.uuid4()), max_bytes=ANY_SIZE)).frames == []


async def test_a_removed_result_is_no_longer_found_by_request_id(store: QueueStore, client: redis.Redis) -> None:
    put = await store.put(SINK, b"result", {}, max_items=10)

    await store.remove(SINK, [put.index])

    assert (await store.read(SINK, request_id=put.request_id, max_bytes=ANY_SIZE)).frames == []
    assert_counts_true(client)


async def test_an_answered_reservation_removes_what_it_answered(store: QueueStore, client: redis.Redis) -> None:
    await put_many(store, 2, SINK)
    reserved = await store.read(SINK, length=10, max_bytes=ANY_SIZE, reserve_token="reader-1", reserve_ms=30_000)

    removed = await store.settle_reserved(SINK, reserved.frames, "reader-1", delivered=True)

    assert removed == 2
    assert await frames_in(store, SINK) == []
    assert_counts_true(client)


async def test_a_reservation_whose_client_left_gives_the_items_back(store: QueueStore, client: redis.Redis) -> None:
    await put_many(store, 1, SINK)
    reserved = await store.read(SINK, max_bytes=ANY_SIZE, reserve_token="reader-1", reserve_ms=30_000)

    assert await store.settle_reserved(SINK, reserved.frames, "reader-1", delivered=False) == 0

    again = await store.read(SINK, max_bytes=ANY_SIZE, reserve_token="reader-2", reserve_ms=30_000)
    assert [f.index for f in again.frames] == [1]
    assert_counts_true(client)


async def test_a_second_auto_deleting_reader_skips_reserved_items(store: QueueStore) -> None:
    await put_many(store, 2, SINK)
    first = await store.read(SINK, max_bytes=ANY_SIZE, reserve_token="reader-1", reserve_ms=30_000)

    second = await store.read(SINK, length=10, max_bytes=ANY_SIZE, reserve_token="reader-2", reserve_ms=30_000)
    plain = await store.read(SINK, length=10, max_bytes=ANY_SIZE)

    assert [f.index for f in first.frames] == [1]
    assert [f.index for f in second.frames] == [2]
    assert [f.index for f in plain.frames] == [1, 2]  # a reader that deletes nothing sees everything


async def test_an_expired_reservation_is_visible_again(store: QueueStore) -> None:
    await put_many(store, 1, SINK)
    await store.read(SINK, max_bytes=ANY_SIZE, reserve_token="crashed-reader", reserve_ms=1)
    time.sleep(0.01)

    again = await store.read(SINK, max_bytes=ANY_SIZE, reserve_token="reader-2", reserve_ms=30_000)

    assert [f.index for f in again.frames] == [1]


async def test_settling_another_readers_reservation_removes_nothing(store: QueueStore, client: redis.Redis) -> None:
    await put_many(store, 1, SINK)
    reserved = await store.read(SINK, max_bytes=ANY_SIZE, reserve_token="reader-1", reserve_ms=30_000)

    assert await store.settle_reserved(SINK, reserved.frames, "reader-2", delivered=True) == 0
    assert await indexes_in(store, SINK) == [1]
    assert_counts_true(client)


# --- remove, withdraw, truncate -------------------------------------------------------------


async def test_remove_deletes_only_the_listed_indexes(store: QueueStore, client: redis.Redis) -> None:
    await put_many(store, 4)

    assert await store.remove(IN, [1, 3]) == 2
    assert await indexes_in(store) == [2, 4]
    assert_counts_true(client)


async def test_remove_of_absent_indexes_counts_nothing(store: QueueStore, client: redis.Redis) -> None:
    await put_many(store, 2)

    assert await store.remove(IN, [7, 8]) == 0
    assert await indexes_in(store) == [1, 2]
    assert_counts_true(client)


async def test_removing_priority_and_held_items_keeps_the_counters_true(
    store: QueueStore, worker: WorkerStore, client: redis.Redis
) -> None:
    await put_many(store, 2)
    await store.put(IN, b"urgent", {}, max_items=10, priority=True)
    await store.put(IN, b"urgent 2", {}, max_items=10, priority=True)
    take_one(worker)  # index 3, priority, held

    assert await store.remove(IN, [3, 4, 1]) == 3
    assert await indexes_in(store) == [2]
    assert_counts_true(client)


def xranges(client: redis.Redis) -> int:
    return int(client.info("commandstats").get("cmdstat_xrange", {}).get("calls", 0))


async def test_a_commit_of_a_run_of_indexes_reads_them_in_one_xrange_and_removes_only_those_named(
    store: QueueStore, worker: WorkerStore, client: redis.Redis
) -> None:
    await put_many(store, 10)
    await store.put(IN, b"urgent", {}, max_items=100, priority=True)  # 11, in the priority stream
    take_one(worker)  # 11 (priority first): held
    before = xranges(client)

    # 5 named twice, 11 in the other stream, 12 never put; 1, 6 and 7 stay.
    assert await store.remove(IN, [2, 3, 4, 5, 5, 8, 9, 10, 11, 12]) == 8

    assert xranges(client) - before == 4  # the run; then 11, 12 and the second 5 looked for in the priority stream
    assert await indexes_in(store) == [1, 6, 7]
    assert_counts_true(client)


async def test_a_commit_of_scattered_indexes_still_removes_each(store: QueueStore, client: redis.Redis) -> None:
    await put_many(store, 40)

    assert await store.remove(IN, [1, 20, 40, 39]) == 4  # spread wider than 4 per index: read one by one
    assert len(await indexes_in(store)) == 36
    assert 1 not in await indexes_in(store) and 20 not in await indexes_in(store)
    assert_counts_true(client)


async def test_withdraw_removes_a_waiting_item_but_never_a_taken_one(
    store: QueueStore, worker: WorkerStore, client: redis.Redis
) -> None:
    await put_many(store, 2)
    take_one(worker)

    assert not await store.withdraw(SERVICE, 1)  # a worker runs it: it finishes, its answer is dropped
    assert await store.withdraw(SERVICE, 2)
    assert await indexes_in(store) == [1]
    assert_counts_true(client)


async def test_truncate_removes_every_item_below_the_index(store: QueueStore, client: redis.Redis) -> None:
    await put_many(store, 3)
    await store.put(IN, b"urgent", {}, max_items=10, priority=True)  # index 4
    await put_many(store, 1)  # index 5

    assert await store.truncate(IN, below=4) == 3
    assert sorted(await indexes_in(store)) == [4, 5]
    assert_counts_true(client)


async def test_truncate_below_the_first_index_removes_nothing(store: QueueStore) -> None:
    await put_many(store, 2)

    assert await store.truncate(IN, below=1) == 0
    assert await indexes_in(store) == [1, 2]


async def test_a_big_truncate_removes_a_step_at_a_time(
    store: QueueStore, client: redis.Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    await put_many(store, 6)
    await store.put(IN, b"urgent", {}, max_items=10, priority=True)  # index 7

    one_step = scripts.remove(IN, "below", [8, 2], now_ms=now_ms())
    assert await store.scripts.run_async(one_step) == (2, True)  # stopped at its step: more to do
    assert_counts_true(client)

    monkeypatch.setattr(queues_module, "TRUNCATE_STEP", 2)
    assert await store.truncate(IN, below=8) == 5
    assert await indexes_in(store) == []
    assert_counts_true(client)


async def test_indexes_never_repeat_after_items_are_removed(store: QueueStore) -> None:
    await put_many(store, 3)
    await store.truncate(IN, below=10)

    assert await put_many(store, 1) == [4]


# --- search ---------------------------------------------------------------------------------


async def test_search_counts_the_items_waiting_ahead(store: QueueStore) -> None:
    await put_many(store, 3)

    position = await store.search(IN, 3)

    assert position is not None
    assert (position.consumer_id, position.is_pending, position.wait_count) == ("", False, 2)


async def test_search_counts_priority_items_ahead_of_a_normal_one(store: QueueStore) -> None:
    await put_many(store, 2)
    await store.put(IN, b"urgent", {}, max_items=10, priority=True)

    normal, urgent = await store.search(IN, 2), await store.search(IN, 3)

    assert normal is not None and normal.wait_count == 2
    assert urgent is not None and urgent.wait_count == 0


async def test_search_shows_a_taken_item_as_pending_without_the_workers_name(
    store: QueueStore, worker: WorkerStore
) -> None:
    await put_many(store, 3)
    take_one(worker)

    taken, behind = await store.search(IN, 1), await store.search(IN, 3)

    assert taken is not None and (taken.consumer_id, taken.is_pending) == ("", True)
    # The taken item no longer counts as waiting ahead of the others.
    assert behind is not None and (behind.consumer_id, behind.is_pending, behind.wait_count) == ("", False, 1)


async def test_search_in_a_client_group_names_the_consumer_holding_the_item(store: QueueStore) -> None:
    await put_many(store, 2, SINK)
    await store.join(SINK, "eas", start_index=0, max_groups=4, idle_ms=15_000)
    await store.deliver(SINK, group="eas", consumer="client-7", want=1, lease_ms=0, tags=None, max_bytes=ANY_SIZE)

    held, next_one = await store.search(SINK, 1, "eas"), await store.search(SINK, 2, "eas")

    assert held is not None and (held.consumer_id, held.is_pending) == ("client-7", True)
    assert next_one is not None and (next_one.is_pending, next_one.wait_count) == (False, 0)


async def test_search_of_an_absent_index_is_none(store: QueueStore) -> None:
    await put_many(store, 2)
    await store.remove(IN, [1])

    assert await store.search(IN, 1) is None
    assert await store.search(IN, 99) is None
    assert await store.search(keys.input_queue("nobody"), 1) is None


# --- status of one request ------------------------------------------------------------------


async def test_status_of_a_queued_request_tells_its_position(store: QueueStore) -> None:
    await put_many(store, 2)
    put = await store.put(IN, b"mine", {}, max_items=10)

    state = await store.status(SERVICE, put.request_id)

    assert state is not None
    assert (state.state, state.index, state.ahead) == ("queued", put.index, 2)
    assert abs(state.put_ms / 1000 - time.time()) < 60


async def test_status_of_a_running_request_tells_its_deliveries(
    store: QueueStore, worker: WorkerStore, client: redis.Redis, past_restart_guard: None
) -> None:
    put = await store.put(IN, b"mine", {}, max_items=10)
    lapse(client, worker, take_one(worker))
    take_one(worker, claim=True)

    state = await store.status(SERVICE, put.request_id)

    assert state is not None and (state.state, state.index, state.deliveries) == ("running", put.index, 2)


async def test_status_of_a_finished_request_tells_its_status_code_and_result(
    store: QueueStore, worker: WorkerStore
) -> None:
    put = await store.put(IN, b"bad", {"user": "ana"}, max_items=10)
    worker.finish(take_one(worker), Outcome.failure(422, "no such language"))

    state = await store.status(SERVICE, put.request_id)

    assert state is not None
    assert (state.state, state.index, state.status, state.message) == ("done", 1, 422, "no such language")
    assert state.size == len(b"no such language")
    assert state.tags is not None and state.tags["user"] == "ana"
    assert abs(state.finished_ms / 1000 - time.time()) < 60


async def test_status_of_a_removed_result_keeps_its_status_code(store: QueueStore, worker: WorkerStore) -> None:
    put = await store.put(IN, b"bad", {}, max_items=10)
    index = worker.finish(take_one(worker), Outcome.failure(400, "ValueError")).sink_index
    before = now_ms()

    await store.remove(SINK, [index])

    state = await store.status(SERVICE, put.request_id)
    assert state is not None and (state.state, state.status) == ("removed", 400)
    assert before <= state.removed_ms <= now_ms()


async def test_status_of_an_unknown_request_is_none(store: QueueStore) -> None:
    assert await store.status(SERVICE, str(uuid.uuid4())) is None


# --- the state of a queue -------------------------------------------------------------------


async def test_state_counts_waiting_and_in_flight_items(
    store: QueueStore, worker: WorkerStore, client: redis.Redis
) -> None:
    await put_many(store, 3)
    await store.put(IN, b"urgent", {}, max_items=10, priority=True)
    await store.remove(IN, [1])
    take_one(worker)  # the priority item, index 4
    worker.heartbeat([SERVICE], ttl=30)

    state = await store.state(IN)

    assert (state.length, state.waiting, state.in_flight) == (3, 2, 1)
    assert (state.first_index, state.last_index, state.last_given) == (2, 4, 4)
    assert state.live_workers == 1 and state.backlog_per_worker == 2
    assert state.oldest_put is not None and abs(state.oldest_put - time.time()) < 60
    assert_counts_true(client)


async def test_state_of_the_sink_counts_its_results_and_bytes(store: QueueStore, worker: WorkerStore) -> None:
    await put_many(store, 1)
    take_one(worker)  # will write one more result
    await store.put(SINK, b"12345", {}, max_items=10)

    state = await store.state(SINK)

    assert (state.length, state.used, state.bytes) == (1, 2, 5)


# --- client consumer groups (watches) -------------------------------------------------------


async def join(store: QueueStore, group: str, *, max_groups: int = 4, idle_ms: int = 15_000) -> bool:
    return await store.join(SINK, group, start_index=0, max_groups=max_groups, idle_ms=idle_ms)


async def deliver(store: QueueStore, group: str, consumer: str, want: int = 10, **options: int) -> list[int]:
    frames = await store.deliver(
        SINK,
        group=group,
        consumer=consumer,
        want=want,
        lease_ms=options.get("lease_ms", 0),
        tags=None,
        max_bytes=options.get("max_bytes", ANY_SIZE),
    )
    assert frames is not None, f"group {group} is gone"
    return [frame.index for frame in frames]


def groups_on(client: redis.Redis, stream: str) -> set[str]:
    return {group["name"].decode() for group in client.xinfo_groups(stream)}


async def test_join_creates_the_group_once(store: QueueStore, client: redis.Redis) -> None:
    assert await join(store, "eas") is True
    assert await join(store, "eas") is False
    assert groups_on(client, SINK.normal) == groups_on(client, SINK.high) == {"eas"}


async def test_join_from_an_index_skips_the_items_before_it(store: QueueStore) -> None:
    await put_many(store, 4, SINK)

    await store.join(SINK, "late", start_index=3, max_groups=4, idle_ms=15_000)

    assert await deliver(store, "late", "c1") == [3, 4]


async def test_a_new_group_is_refused_while_every_group_of_the_queue_is_live(
    store: QueueStore, client: redis.Redis
) -> None:
    await join(store, "a", max_groups=2)
    await join(store, "b", max_groups=2)

    with pytest.raises(TooManyGroups, match="2 consumer groups"):
        await join(store, "c", max_groups=2)
    assert groups_on(client, SINK.normal) == {"a", "b"}
    assert await join(store, "a", max_groups=2) is False  # an existing group still gets in


async def test_a_group_idle_for_long_is_replaced_by_a_new_one(store: QueueStore, client: redis.Redis) -> None:
    await join(store, "a", max_groups=2)
    await join(store, "b", max_groups=2)
    client.zadd(SINK.groups, {"a": now_ms() - 60_000})  # none of a's consumers seen for a minute

    assert await join(store, "c", max_groups=2, idle_ms=15_000) is True
    assert groups_on(client, SINK.normal) == {"b", "c"}
    frames = await store.deliver(SINK, group="a", consumer="c1", want=1, lease_ms=0, tags=None, max_bytes=ANY_SIZE)
    assert frames is None  # a's watch hears its group is gone, and joins again


async def test_seen_groups_keep_a_group_from_being_replaced(store: QueueStore, client: redis.Redis) -> None:
    await join(store, "a", max_groups=1)
    client.zadd(SINK.groups, {"a": now_ms() - 60_000})

    await store.seen_groups(SINK, ["a", "never-joined"])

    with pytest.raises(TooManyGroups):
        await join(store, "b", max_groups=1)
    assert client.zscore(SINK.groups, "never-joined") is None  # only groups that exist are marked


async def test_each_group_sees_every_item_and_each_item_goes_to_one_consumer_of_a_group(
    store: QueueStore,
) -> None:
    await put_many(store, 3, SINK)
    await join(store, "g1")
    await join(store, "g2")

    first = await deliver(store, "g1", "c1", want=2)
    second = await deliver(store, "g1", "c2", want=2)
    other_group = await deliver(store, "g2", "c3", want=10)

    assert (first, second, other_group) == ([1, 2], [3], [1, 2, 3])


async def test_deliver_with_a_tag_filter_skips_other_items_for_good(store: QueueStore) -> None:
    await store.put(SINK, b"a", {"user": "ana"}, max_items=10)
    await store.put(SINK, b"b", {"user": "bob"}, max_items=10)
    await join(store, "eas")

    frames = await store.deliver(
        SINK, group="eas", consumer="c1", want=10, lease_ms=0, tags={"user": "bob"}, max_bytes=ANY_SIZE
    )

    assert frames is not None and [f.index for f in frames] == [2]
    assert await deliver(store, "eas", "c2") == []  # the group is done with ana's item too


async def test_deliver_pages_by_bytes_without_losing_items(store: QueueStore) -> None:
    for n in range(20):
        await store.put(SINK, bytes([n]) * 100, {}, max_items=100)
    await join(store, "eas")

    seen: list[int] = []
    for _ in range(20):
        page = await deliver(store, "eas", "c1", want=20, max_bytes=150)
        if not page:
            break
        assert len(page) < 20
        seen += page

    assert seen == list(range(1, 21))


async def test_held_counts_renews_and_releases_a_consumers_items(store: QueueStore, past_restart_guard: None) -> None:
    await put_many(store, 3, SINK)
    await join(store, "eas")
    await deliver(store, "eas", "c1", want=2)

    assert await store.held(SINK, group="eas", consumer="c1", mode="count", most=10) == 2
    assert await store.held(SINK, group="eas", consumer="c1", mode="renew", most=10) == 2
    assert await deliver(store, "eas", "c2", want=10, lease_ms=LEASE_MS) == [3]  # renewed: not claimable

    assert await store.held(SINK, group="eas", consumer="c1", mode="release", most=10) == 2
    assert await deliver(store, "eas", "c3", want=10, lease_ms=LEASE_MS) == [1, 2]  # claimed at once


async def test_a_lapsed_item_of_a_group_goes_to_another_consumer(
    store: QueueStore, client: redis.Redis, past_restart_guard: None
) -> None:
    await put_many(store, 1, SINK)
    await join(store, "eas")
    await deliver(store, "eas", "left-without-commit", want=1)
    assert not await store.lapsed(SINK, "eas", LEASE_MS)
    client.xclaim(SINK.normal, "eas", "left-without-commit", 0, [keys.stream_id(1)], idle=LEASE_MS + 1000, justid=True)

    assert await store.lapsed(SINK, "eas", LEASE_MS)
    assert await deliver(store, "eas", "c2", lease_ms=LEASE_MS) == [1]


async def test_an_item_committed_by_one_group_stops_counting_in_anothers_window(
    store: QueueStore, client: redis.Redis
) -> None:
    await put_many(store, 2, SINK)
    await join(store, "a")
    await join(store, "b")
    await deliver(store, "a", "ca")
    await deliver(store, "b", "cb")

    await store.remove(SINK, [1], group="a")  # a's commit removes the item for everyone

    assert await store.held(SINK, group="b", consumer="cb", mode="count", most=10) == 1
    assert [row["message_id"] for row in client.xpending_range(SINK.normal, "b", "-", "+", 10)] == [b"2-0"]
    assert_counts_true(client)


# --- maintenance ----------------------------------------------------------------------------


async def test_maintenance_repairs_a_hand_broken_counter(
    store: QueueStore, worker: WorkerStore, client: redis.Redis
) -> None:
    await put_many(store, 3)
    await store.put(IN, b"urgent", {}, max_items=10, priority=True)
    take_one(worker)
    await store.put(SINK, b"result", {}, max_items=10)
    client.hset(keys.counts(SERVICE), mapping={"waiting": 0, "waiting_high": 7, "sink_used": -4, "sink_bytes": 99})
    assert took_nothing(worker)  # the counter says nothing waits: take believes it

    assert worker.maintain(SERVICE, lock_seconds=60)

    assert_counts_true(client)
    assert take_one(worker).index == 1


async def test_reconcile_answers_the_repaired_counters(store: QueueStore, worker: WorkerStore) -> None:
    await put_many(store, 2)
    worker.scripts.run(scripts.reconcile(SERVICE))

    assert worker.scripts.run(scripts.reconcile(SERVICE)) == {
        "waiting": 2,
        "waiting_high": 0,
        "sink_used": 0,
        "sink_bytes": 0,
    }


async def test_maintenance_runs_on_one_worker_at_a_time(worker: WorkerStore, other_worker: WorkerStore) -> None:
    assert worker.maintain(SERVICE, lock_seconds=60)
    assert not other_worker.maintain(SERVICE, lock_seconds=60)


async def test_maintenance_forgets_removed_result_markers_older_than_a_day(
    worker: WorkerStore, client: redis.Redis
) -> None:
    day_and_a_bit_ago = now_ms() - (24 * 3600 + 60) * 1000
    recent = f"-{now_ms() - 3600_000}:400"
    client.hset(SINK.ids, mapping={"old": f"-{day_and_a_bit_ago}:200", "recent": recent, "in-sink": "5"})

    worker.maintain(SERVICE, lock_seconds=60)

    assert client.hgetall(SINK.ids) == {b"recent": recent.encode(), b"in-sink": b"5"}


async def test_maintenance_drops_dead_consumers_with_nothing_pending(
    store: QueueStore,
    worker: WorkerStore,
    other_worker: WorkerStore,
    client: redis.Redis,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    await put_many(store, 2)
    worker.finish(take_one(worker), Outcome(b"done"))  # worker-1 holds nothing now
    take_one(other_worker)  # worker-2 holds an item: dropping it would drop the item from the group
    monkeypatch.setattr(consumer_module, "DEAD_CONSUMER_SECONDS", 0.05)  # instead of an hour
    time.sleep(0.2)

    WorkerStore(client, "worker-3").maintain(SERVICE, lock_seconds=60)

    names = {c["name"].decode() for c in client.xinfo_consumers(IN.normal, WORKER_GROUP)}
    assert names == {"worker-2"}
    assert_counts_true(client)


async def test_maintenance_forgets_workers_whose_heartbeat_lapsed_an_hour_ago(client: redis.Redis) -> None:
    WorkerStore(client, "gone").heartbeat([SERVICE], ttl=-2 * 3600)
    WorkerStore(client, "late").heartbeat([SERVICE], ttl=-60)
    WorkerStore(client, "live").heartbeat([SERVICE], ttl=30)

    WorkerStore(client, "live").maintain(SERVICE, lock_seconds=60)

    assert {name.decode() for name in client.zrange(keys.live_workers(SERVICE), 0, -1)} == {"late", "live"}


# --- liveness, waiting, timings -------------------------------------------------------------


async def test_heartbeat_counts_the_worker_as_live_until_it_leaves(store: QueueStore, worker: WorkerStore) -> None:
    worker.heartbeat([SERVICE, "other"], ttl=30)
    assert (await store.live_workers(SERVICE), await store.live_workers("other")) == (1, 1)

    worker.leave([SERVICE])
    assert (await store.live_workers(SERVICE), await store.live_workers("other")) == (0, 1)


async def test_wait_for_new_returns_once_an_item_is_there_and_waits_otherwise(
    store: QueueStore, worker: WorkerStore
) -> None:
    await put_many(store, 1)

    started = time.monotonic()
    worker.wait_for_new({SERVICE: 0}, seconds=10)
    assert time.monotonic() - started < 8  # index 1 is after 0: no wait for the 10 s

    started = time.monotonic()
    worker.wait_for_new({SERVICE: 1}, seconds=0.2)
    assert time.monotonic() - started >= 0.15


def _blocked_on_the_bell(client: redis.Redis, count: int) -> bool:
    """Whether `count` connections are blocked in an XREADGROUP (the workers' wait for the bell)."""
    return sum(1 for c in client.client_list() if c.get("cmd") == "xreadgroup" and "b" in c.get("flags", "")) >= count


async def test_an_idle_worker_wakes_at_once_for_an_item_put_since_it_last_looked(
    store: QueueStore, worker: WorkerStore
) -> None:
    await put_many(store, 1)  # no worker waited: its ring waits for the first one that does

    started = time.monotonic()
    worker.wait_for_work([SERVICE], seconds=10)
    assert time.monotonic() - started < 8

    started = time.monotonic()
    worker.wait_for_work([SERVICE], seconds=0.2)
    assert time.monotonic() - started >= 0.15


async def test_one_put_wakes_one_idle_worker_and_the_next_put_the_other(
    store: QueueStore, worker: WorkerStore, other_worker: WorkerStore
) -> None:
    woken: list[str] = []

    def wait(store_of: WorkerStore) -> None:
        store_of.wait_for_work([SERVICE], seconds=8)
        woken.append(store_of.name)

    threads = [threading.Thread(target=wait, args=(w,), daemon=True) for w in (worker, other_worker)]
    for thread in threads:
        thread.start()
    deadline = time.monotonic() + 5
    while not _blocked_on_the_bell(worker.redis, 2):
        assert time.monotonic() < deadline, "both workers wait for the bell"
        await asyncio.sleep(0.01)

    await put_many(store, 1)
    deadline = time.monotonic() + 5
    while not woken:
        assert time.monotonic() < deadline, "a put wakes an idle worker"
        await asyncio.sleep(0.01)
    await asyncio.sleep(1.0)
    assert len(woken) == 1  # one, not both (an XREAD of the input stream woke both)

    await put_many(store, 1)
    for thread in threads:
        await asyncio.to_thread(thread.join, 5)  # the second well before its 8 s wait ends
    assert sorted(woken) == sorted([worker.name, other_worker.name])


async def test_a_take_queued_behind_the_wait_hands_the_woken_worker_the_item_put_meanwhile(
    store: QueueStore, worker: WorkerStore
) -> None:
    assert worker.wait_then_take(SERVICE, 0.2, RULES).items == []  # nothing came: the take after the timeout

    def put_later() -> None:
        time.sleep(0.3)
        now_ms = int(time.time() * 1000)
        worker.scripts.run(scripts.put(IN, data=b"woken", tags={}, request_id="r-woken", now_ms=now_ms, max_items=9))

    putter = threading.Thread(target=put_later, daemon=True)
    putter.start()
    started = time.monotonic()
    taken = worker.wait_then_take(SERVICE, 10, RULES)
    assert time.monotonic() - started < 8  # woken by the put's ring, not by the 10 s timeout
    assert [item.data for item in taken.items] == [b"woken"]
    putter.join(5)


async def test_worker_timings_add_up_across_workers(worker: WorkerStore, other_worker: WorkerStore) -> None:
    worker.add_timings({SERVICE: {"processing:0.025": 1, "processing:sum": 0.02}})
    other_worker.add_timings({SERVICE: {"processing:0.025": 2, "processing:sum": 0.03}})

    stats = {k.decode(): float(v) for k, v in worker.redis.hgetall(keys.timings(SERVICE)).items()}
    assert stats == {"processing:0.025": 3, "processing:sum": pytest.approx(0.05)}
