"""Webhook deliveries, deadlines and idempotency in the store, on a real Redis.

Each delivery is written in the step that causes its event (finish, take, cancel, expiry): these tests look at
what that step left in the deliveries stream, and at the dispatchers' side (take, retry, lease lapse, dead
letters). Every test that changes a queue recounts the streams.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import time
from collections.abc import AsyncIterator

import pytest
import redis
import redis.asyncio

from queue_service.store import keys
from queue_service.store.consumer import TakeRules, WorkerStore
from queue_service.store.deliveries import DeliveryStore
from queue_service.store.model import EXPIRED_MESSAGE, Outcome
from queue_service.store.queues import QueueStore
from tests.support.counts import assert_counts_true
from workers.runner import expired

SERVICE = "echo"
IN = keys.input_queue(SERVICE)
HOOKS = keys.webhooks(SERVICE)
RULES = TakeRules(lease_ms=3000, max_delivery=3, sink_max_items=1000, sink_max_bytes=1_000_000)
COMPLETED = json.dumps([{"url": "https://receiver.example/hook", "events": ["completed"]}])
EVERY_EVENT = json.dumps([{"url": "https://receiver.example/hook", "events": ["start", "completed"]}])


@pytest.fixture
async def async_client(fresh_redis_url: str) -> AsyncIterator[redis.asyncio.Redis]:
    async_redis = redis.asyncio.Redis.from_url(fresh_redis_url)
    yield async_redis
    await async_redis.aclose()


@pytest.fixture
def store(async_client: redis.asyncio.Redis) -> QueueStore:
    return QueueStore(async_client)


@pytest.fixture
def deliveries(async_client: redis.asyncio.Redis) -> DeliveryStore:
    return DeliveryStore(async_client)


@pytest.fixture
def worker(client: redis.Redis) -> WorkerStore:
    return WorkerStore(client, "worker-1", webhook_inline_bytes={SERVICE: 1000})


def queued_deliveries(client: redis.Redis) -> list[dict[str, str]]:
    return [
        {k.decode(): v.decode(errors="replace") for k, v in fields.items()} for _, fields in client.xrange(HOOKS.stream)
    ]


# --- written in the step that causes the event ----------------------------------------------


async def test_a_finished_request_with_a_webhook_enqueues_its_completed_delivery_with_the_result(
    store: QueueStore, worker: WorkerStore, client: redis.Redis
) -> None:
    put = await store.put(IN, b"hello", {"user": "ana"}, max_items=10, hooks=COMPLETED)
    [item] = worker.take(SERVICE, RULES).items
    worker.finish(item, Outcome(b"HELLO"))

    [delivery] = queued_deliveries(client)
    assert (delivery["event"], delivery["rid"], delivery["code"], delivery["data"]) == (
        "completed",
        put.request_id,
        "200",
        "HELLO",
    )
    assert delivery["url"] == "https://receiver.example/hook" and json.loads(delivery["tags"])["user"] == "ana"
    assert_counts_true(client, SERVICE)


async def test_a_result_above_the_inline_size_is_not_copied_into_the_delivery(
    store: QueueStore, client: redis.Redis
) -> None:
    small = WorkerStore(client, "worker-1", webhook_inline_bytes={SERVICE: 4})
    await store.put(IN, b"hello", {}, max_items=10, hooks=COMPLETED)
    small.finish(small.take(SERVICE, RULES).items[0], Outcome(b"a long result"))

    [delivery] = queued_deliveries(client)
    assert "data" not in delivery and delivery["size"] == str(len(b"a long result"))


async def test_a_request_without_a_webhook_enqueues_nothing(
    store: QueueStore, worker: WorkerStore, client: redis.Redis
) -> None:
    await store.put(IN, b"hello", {}, max_items=10)
    worker.finish(worker.take(SERVICE, RULES).items[0], Outcome(b"HELLO"))

    assert client.xlen(HOOKS.stream) == 0


async def test_take_enqueues_the_start_delivery_of_a_request_that_asked_for_it(
    store: QueueStore, worker: WorkerStore, client: redis.Redis
) -> None:
    put = await store.put(IN, b"hello", {}, max_items=10, hooks=EVERY_EVENT)
    worker.take(SERVICE, RULES)

    [start] = queued_deliveries(client)
    assert (start["event"], start["rid"], start["deliveries"]) == ("start", put.request_id, "1")
    state = await store.status(SERVICE, put.request_id)
    pending = {"state": "pending", "attempts": 0, "at": int(start["ts"])}
    assert state is not None and state.webhooks == {"start/1": pending}


async def test_a_cancelled_waiting_request_ends_cancelled_with_its_webhook(
    store: QueueStore, client: redis.Redis
) -> None:
    put = await store.put(IN, b"hello", {}, max_items=10, hooks=COMPLETED)

    assert await store.cancel(SERVICE, [put.index]) == 1

    state = await store.status(SERVICE, put.request_id)
    assert state is not None and (state.state, state.status) == ("removed", 499)
    [delivery] = queued_deliveries(client)
    assert (delivery["event"], delivery["code"]) == ("completed", "499")
    assert_counts_true(client, SERVICE)


# --- deadlines ------------------------------------------------------------------------------


async def test_a_request_taken_after_its_deadline_comes_back_expired_and_ends_408(
    store: QueueStore, worker: WorkerStore, client: redis.Redis
) -> None:
    put = await store.put(IN, b"hello", {}, max_items=10, ttl_ms=50, hooks=EVERY_EVENT)
    await asyncio.sleep(0.1)

    [item] = worker.take(SERVICE, RULES).items
    assert item.expired and not item.exhausted
    assert client.xlen(HOOKS.stream) == 0  # an expired request does not start
    worker.finish(item, expired(item))

    state = await store.status(SERVICE, put.request_id)
    assert state is not None and (state.state, state.status, state.ending) == ("done", 408, "expired")
    assert state.message == EXPIRED_MESSAGE
    assert [d["event"] for d in queued_deliveries(client)] == ["completed"]
    assert_counts_true(client, SERVICE)


async def test_a_request_taken_before_its_deadline_runs(store: QueueStore, worker: WorkerStore) -> None:
    await store.put(IN, b"hello", {}, max_items=10, ttl_ms=60_000)

    [item] = worker.take(SERVICE, RULES).items
    assert not item.expired


async def test_the_sweep_ends_a_waiting_request_at_its_deadline(store: QueueStore, client: redis.Redis) -> None:
    put = await store.put(IN, b"hello", {"user": "ana"}, max_items=10, ttl_ms=50, hooks=COMPLETED)
    kept = await store.put(IN, b"later", {}, max_items=10, ttl_ms=60_000)
    await asyncio.sleep(0.1)

    assert await store.expire(SERVICE) == 1

    state = await store.status(SERVICE, put.request_id)
    assert state is not None and (state.state, state.status, state.ending) == ("done", 408, "expired")
    assert state.tags is not None and (state.tags["user"], state.tags["lastCode"]) == ("ana", "408")
    later = await store.status(SERVICE, kept.request_id)
    assert later is not None and later.state == "queued" and later.deadline_ms > 0
    [delivery] = queued_deliveries(client)
    assert (delivery["code"], delivery["end"]) == ("408", "expired")
    assert_counts_true(client, SERVICE)


async def test_the_sweep_leaves_a_request_a_worker_took(
    store: QueueStore, worker: WorkerStore, client: redis.Redis
) -> None:
    put = await store.put(IN, b"hello", {}, max_items=10, ttl_ms=300)
    worker.take(SERVICE, RULES)
    await asyncio.sleep(0.4)

    assert await store.expire(SERVICE) == 0
    state = await store.status(SERVICE, put.request_id)
    assert state is not None and state.state == "running"
    assert_counts_true(client, SERVICE)


async def test_an_expired_result_that_was_read_is_still_remembered_as_expired(store: QueueStore) -> None:
    put = await store.put(IN, b"hello", {}, max_items=10, ttl_ms=10)
    await asyncio.sleep(0.05)
    await store.expire(SERVICE)
    state = await store.status(SERVICE, put.request_id)
    assert state is not None

    await store.remove(keys.sink_queue(SERVICE), [state.index])

    removed = await store.status(SERVICE, put.request_id)
    assert removed is not None and (removed.state, removed.status, removed.ending) == ("removed", 408, "expired")


# --- idempotency ----------------------------------------------------------------------------


async def test_a_put_with_a_known_idempotency_key_answers_the_first_and_stores_nothing(
    store: QueueStore, client: redis.Redis
) -> None:
    digest = hashlib.sha256(b"order-17").hexdigest()
    first = await store.put(IN, b"hello", {}, max_items=10, idempotency_digest=digest)
    again = await store.put(IN, b"hello", {}, max_items=10, idempotency_digest=digest)
    other = await store.put(IN, b"hello", {}, max_items=10, idempotency_digest=hashlib.sha256(b"x").hexdigest())

    assert (again.index, again.request_id, again.repeated) == (first.index, first.request_id, True)
    assert other.index == first.index + 1 and not other.repeated
    assert client.xlen(IN.normal) == 2
    assert 0 < client.ttl(keys.idempotency(SERVICE, digest)) <= 24 * 3600
    assert_counts_true(client, SERVICE)


# --- the dispatchers' side ------------------------------------------------------------------


async def finished_with_webhook(store: QueueStore, worker: WorkerStore) -> str:
    put = await store.put(IN, b"hello", {}, max_items=10, hooks=COMPLETED)
    worker.finish(worker.take(SERVICE, RULES).items[0], Outcome(b"HELLO"))
    return put.request_id


async def test_a_delivery_retried_keeps_its_webhook_id_and_counts_its_attempts(
    store: QueueStore, worker: WorkerStore, deliveries: DeliveryStore
) -> None:
    request_id = await finished_with_webhook(store, worker)
    [first] = (await deliveries.take(SERVICE, consumer="d1", want=10, lease_ms=60_000)).deliveries
    assert first.attempt == 1 and first.request_id == request_id

    assert await deliveries.done(first, consumer="d1", outcome="retry", next_ms=0, status=500)
    [second] = (await deliveries.take(SERVICE, consumer="d1", want=10, lease_ms=60_000)).deliveries

    assert (second.webhook_id, second.attempt) == (first.webhook_id, 2)
    state = await store.status(SERVICE, request_id)
    assert state is not None and state.webhooks is not None
    assert state.webhooks["completed/1"]["state"] == "retrying"


async def test_a_delivery_in_flight_is_not_taken_by_another_dispatcher_until_its_lease_lapses(
    store: QueueStore, worker: WorkerStore, deliveries: DeliveryStore
) -> None:
    await finished_with_webhook(store, worker)
    [held] = (await deliveries.take(SERVICE, consumer="dead-one", want=10, lease_ms=300)).deliveries

    assert (await deliveries.take(SERVICE, consumer="d2", want=10, lease_ms=300)).deliveries == []
    await asyncio.sleep(0.4)
    [again] = (await deliveries.take(SERVICE, consumer="d2", want=10, lease_ms=300)).deliveries

    assert (again.webhook_id, again.attempt) == (held.webhook_id, 2)
    # The first holder's late record counts for nothing: the delivery is the second one's now.
    assert not await deliveries.done(held, consumer="dead-one", outcome="delivered", status=200)
    assert await deliveries.done(again, consumer="d2", outcome="delivered", status=200)


async def test_a_delivered_delivery_is_gone_from_the_stream(
    store: QueueStore, worker: WorkerStore, deliveries: DeliveryStore, client: redis.Redis
) -> None:
    request_id = await finished_with_webhook(store, worker)
    [delivery] = (await deliveries.take(SERVICE, consumer="d1", want=10, lease_ms=60_000)).deliveries

    await deliveries.done(delivery, consumer="d1", outcome="delivered", status=204)

    assert client.xlen(HOOKS.stream) == 0 and client.zcard(HOOKS.due) == 0
    state = await store.status(SERVICE, request_id)
    assert state is not None and state.webhooks is not None
    record = state.webhooks["completed/1"]
    assert (record["state"], record["attempts"], record["lastStatus"]) == ("delivered", 1, 204)
    assert (await store.webhook_counts(SERVICE)).delivered == 1


async def test_a_dead_letter_is_listed_and_sent_again_by_hand_with_the_same_webhook_id(
    store: QueueStore, worker: WorkerStore, deliveries: DeliveryStore
) -> None:
    await finished_with_webhook(store, worker)
    [delivery] = (await deliveries.take(SERVICE, consumer="d1", want=10, lease_ms=60_000)).deliveries
    await deliveries.done(delivery, consumer="d1", outcome="dead", status=503, error="")

    [letter] = await deliveries.dead_letters(SERVICE)
    assert (letter.webhook_id, letter.last_status, letter.attempts) == (delivery.webhook_id, 503, 1)
    counts = await store.webhook_counts(SERVICE)
    assert (counts.dead, counts.queued, counts.scheduled) == (1, 0, 0)

    assert await deliveries.revive(SERVICE) == 1
    [revived] = (await deliveries.take(SERVICE, consumer="d1", want=10, lease_ms=60_000)).deliveries
    assert (revived.webhook_id, revived.attempt, revived.event) == (delivery.webhook_id, 1, "completed")
    assert await deliveries.dead_letters(SERVICE) == []


async def test_take_tells_when_the_next_retry_is_due(
    store: QueueStore, worker: WorkerStore, deliveries: DeliveryStore
) -> None:
    await finished_with_webhook(store, worker)
    [delivery] = (await deliveries.take(SERVICE, consumer="d1", want=10, lease_ms=60_000)).deliveries
    due = int(time.time() * 1000) + 30_000
    await deliveries.done(delivery, consumer="d1", outcome="retry", next_ms=due, status=500)

    batch = await deliveries.take(SERVICE, consumer="d1", want=10, lease_ms=60_000)

    assert batch.deliveries == [] and batch.next_due_ms == due


async def test_status_of_a_running_request_tells_when_its_worker_started_it(
    store: QueueStore, worker: WorkerStore
) -> None:
    put = await store.put(IN, b"hello", {}, max_items=10)
    [item] = worker.take(SERVICE, RULES).items
    published = [{"index": item.index, "requestId": item.request_id, "startedAt": 1234, "deliveries": 1}]
    worker.redis.hset(keys.running(SERVICE), worker.name, json.dumps(published))

    state = await store.status(SERVICE, put.request_id)

    assert state is not None and (state.state, state.started_ms) == ("running", 1234)
