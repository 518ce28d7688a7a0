"""The store's calls for workers that hold many items at once: a batch's outcomes written in one round trip,
leases renewed per item, and what each worker holds published for dashboards (`qs:{s}:running`)."""

from __future__ import annotations

import json
import time

import pytest
import redis
import redis.asyncio

from queue_service.store import keys
from queue_service.store.consumer import Finish, TakeRules, Tick, WorkerStore
from queue_service.store.model import CANCELLED, HELD, ItemGone, NotHolder, Outcome, RunningItem
from queue_service.store.queues import QueueStore
from tests.support.counts import assert_counts_true

SERVICE = "echo"
IN = keys.input_queue(SERVICE)
RULES = TakeRules(lease_ms=3000, max_delivery=3, sink_max_items=1000, sink_max_bytes=1_000_000)


@pytest.fixture
def worker(client: redis.Redis) -> WorkerStore:
    return WorkerStore(client, "worker-1")


def round_trips(client: redis.Redis) -> int:
    """Socket reads Redis has served so far (one per command, pipeline or script call), this INFO included."""
    return int(client.info("stats")["total_reads_processed"])


async def test_a_batch_of_outcomes_is_written_in_one_round_trip_each_to_its_own_sink_entry(
    store: QueueStore, worker: WorkerStore, client: redis.Redis
) -> None:
    puts = [await store.put(IN, f"item {n}".encode(), {}, max_items=100) for n in range(8)]
    items = worker.take(SERVICE, RULES, want=8).items
    assert len(items) == 8
    finishes = [Finish(item, Outcome(f"result {item.index}".encode())) for item in items]
    worker.finish_many(finishes)  # loads the script; the round trips are counted on the next batch
    puts2 = [await store.put(IN, f"item {n}".encode(), {}, max_items=100) for n in range(8)]
    items = worker.take(SERVICE, RULES, want=8).items
    finishes = [
        Finish(item, Outcome(f"result {item.index}".encode(), 200 if item.index % 2 else 422)) for item in items
    ]

    before = round_trips(client)
    answers = worker.finish_many(finishes)
    assert round_trips(client) - before == 2  # the pipeline, and the INFO that counts

    assert [a.sink_index for a in answers if not isinstance(a, Exception)] == list(range(9, 17))
    for put in [*puts, *puts2]:
        [frame] = (await store.read(keys.sink_queue(SERVICE), request_id=put.request_id, max_bytes=1 << 20)).frames
        assert frame.data == f"result {put.index}".encode()
        assert frame.tags.get("lastCode") == (None if put.index <= 8 or put.index % 2 else "422")
    assert_counts_true(client)


async def test_one_item_gone_from_a_batch_does_not_stop_the_others_being_written(
    store: QueueStore, worker: WorkerStore, client: redis.Redis
) -> None:
    puts = [await store.put(IN, b"x", {}, max_items=100) for _ in range(3)]
    items = worker.take(SERVICE, RULES, want=3).items
    await store.remove(IN, [puts[1].index])  # deleted while the batch ran

    answers = worker.finish_many([Finish(item, Outcome(b"done")) for item in items])

    assert isinstance(answers[1], ItemGone)
    assert not isinstance(answers[0], NotHolder) and not isinstance(answers[2], NotHolder)
    assert (await store.state(keys.sink_queue(SERVICE))).length == 2
    assert_counts_true(client)


async def test_renewing_a_batch_says_per_item_which_ones_were_removed(
    store: QueueStore, worker: WorkerStore, client: redis.Redis
) -> None:
    await store.put(IN, b"normal", {}, max_items=100)
    high = await store.put(IN, b"priority", {}, max_items=100, priority=True)
    await store.put(IN, b"normal", {}, max_items=100)
    items = worker.take(SERVICE, RULES, want=3).items
    assert items[0].high and items[0].index == high.index  # the priority stream is served first

    await store.remove(IN, [items[2].index])

    assert worker.renew_many(items) == [HELD, HELD, CANCELLED]
    worker.release_many(items[:2])
    assert_counts_true(client)


async def test_a_worker_publishes_what_it_holds_and_the_api_reads_it(
    store: QueueStore, worker: WorkerStore, client: redis.Redis
) -> None:
    entries = [{"index": 3, "requestId": "r-3", "startedAt": 1000, "deliveries": 1}]
    worker.tick(Tick([SERVICE], running={SERVICE: json.dumps(entries)}), ttl=5)
    other = WorkerStore(client, "worker-2")
    other.tick(Tick([SERVICE], running={SERVICE: json.dumps([{**entries[0], "index": 1, "startedAt": 900}])}), 5)

    running = await store.running(SERVICE)

    assert running == [RunningItem("worker-2", 1, "r-3", 900, 1), RunningItem("worker-1", 3, "r-3", 1000, 1)]
    worker.tick(Tick([SERVICE], running={SERVICE: None}), ttl=5)  # it holds nothing now: its field goes
    assert [item.worker for item in await store.running(SERVICE)] == ["worker-2"]
    other.leave([SERVICE])  # at exit
    assert await store.running(SERVICE) == []


async def test_maintenance_drops_what_a_dead_worker_published(
    store: QueueStore, worker: WorkerStore, client: redis.Redis
) -> None:
    entry = json.dumps([{"index": 1, "requestId": "r", "startedAt": 1, "deliveries": 1}])
    killed = WorkerStore(client, "killed")
    killed.tick(Tick([SERVICE], running={SERVICE: entry}), ttl=0.2)  # its liveness lapses, nothing deletes it
    worker.tick(Tick([SERVICE], running={SERVICE: entry}), ttl=30)
    time.sleep(0.3)

    worker.maintain(SERVICE, 1)

    assert [item.worker for item in await store.running(SERVICE)] == ["worker-1"]


def test_a_worker_that_is_not_live_for_a_service_leaves_its_live_set(worker: WorkerStore, client: redis.Redis) -> None:
    worker.tick(Tick([SERVICE, "llm"]), ttl=5)
    assert client.zscore(keys.live_workers("llm"), worker.name)

    worker.tick(Tick([SERVICE], not_live=["llm"]), ttl=5)  # its upstream stopped answering its health path

    assert client.zscore(keys.live_workers("llm"), worker.name) is None
    assert client.zscore(keys.live_workers(SERVICE), worker.name)
