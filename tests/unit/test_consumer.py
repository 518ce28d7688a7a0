"""The worker's side on fakeredis: take, finish, leases, retries and back-pressure, seen from the client."""

from __future__ import annotations

import time
from typing import Any

import fakeredis
import pytest
from queue_service.consumer import (
    CANCELLED,
    HANDED_OVER,
    HELD,
    SINK_FULL,
    InputConsumer,
    Outcome,
    TakenItem,
    decode_reply,
)
from queue_service.keys import WORKER_GROUP
from queue_service.queues import Queues

from queue_service import keys
from queue_service.config import ServiceConfig
from queue_service.wire import DataFrame


def service(**queue: Any) -> ServiceConfig:
    return ServiceConfig(name="echo", processor="workers.examples:Echo", queue=queue)


ECHO = service()


@pytest.fixture
def server() -> fakeredis.FakeServer:
    return fakeredis.FakeServer()


@pytest.fixture
def redis(server: fakeredis.FakeServer) -> fakeredis.FakeRedis:
    return fakeredis.FakeRedis(server=server)


@pytest.fixture
def queues(server: fakeredis.FakeServer) -> Queues:
    return Queues(fakeredis.FakeAsyncRedis(server=server))


@pytest.fixture
def worker(redis: fakeredis.FakeRedis) -> InputConsumer:
    return InputConsumer(redis, "worker-1")


@pytest.fixture
def other_worker(redis: fakeredis.FakeRedis) -> InputConsumer:
    return InputConsumer(redis, "worker-2")


def take(worker: InputConsumer, svc: ServiceConfig = ECHO) -> TakenItem:
    item = worker.take(svc)
    assert isinstance(item, TakenItem), f"expected an item, got {item!r}"
    return item


def stop_renewing(redis: fakeredis.FakeRedis, holder: InputConsumer, item: TakenItem, svc: ServiceConfig) -> None:
    """As if the holder had been silent (killed, hung) for longer than the lease."""
    idle_ms = int(svc.queue.lease_seconds * 1000) + 1
    redis.xclaim(item.stream, WORKER_GROUP, holder.name, 0, [item.entry_id], idle=idle_ms, justid=True)


async def sink(queues: Queues) -> list[DataFrame]:
    return await queues.read("echo", "sink", length=100)


async def input_items(queues: Queues) -> list[DataFrame]:
    return await queues.read("echo", "input", length=100)


# --- take and finish ----------------------------------------------------------------------


async def test_take_of_an_empty_queue_returns_none(worker: InputConsumer) -> None:
    assert worker.take(ECHO) is None


async def test_take_hands_over_the_item_as_it_was_put(queues: Queues, worker: InputConsumer) -> None:
    put = await queues.put(ECHO, "input", b"\x00\xffpayload", {"user": "ana"})

    item = take(worker)

    assert (item.index, item.request_id, item.deliveries) == (put.index, put.request_id, 1)
    assert (item.data, item.tags, item.sync_reply) == (b"\x00\xffpayload", {"user": "ana"}, False)
    assert abs(item.put_ms / 1000 - time.time()) < 5


async def test_take_then_finish_writes_the_result_to_the_sink_and_removes_the_input(
    queues: Queues, worker: InputConsumer
) -> None:
    put = await queues.put(ECHO, "input", b"hello", {"user": "ana"})

    written = worker.finish(take(worker), Outcome(b"HELLO"))

    (result,) = await queues.read("echo", "sink", request_id=put.request_id)
    assert written == result.index == 1
    assert result.data == b"HELLO"
    assert result.tags == {"user": "ana", "requestId": put.request_id}
    assert await input_items(queues) == []
    assert await queues.search("echo", "input", put.index) is None


async def test_a_failed_item_carries_its_status_as_last_code(queues: Queues, worker: InputConsumer) -> None:
    put = await queues.put(ECHO, "input", b"bad input", {})

    worker.finish(take(worker), Outcome(b"ValueError: no", status=400, message="ValueError: no"))

    (result,) = await sink(queues)
    assert result.tags == {"requestId": put.request_id, "lastCode": "400"}
    assert (result.data, result.message) == (b"ValueError: no", "ValueError: no")


async def test_an_empty_failure_still_reaches_the_sink(queues: Queues, worker: InputConsumer) -> None:
    await queues.put(ECHO, "input", b"x", {})

    worker.finish(take(worker), Outcome(b"", status=503))

    assert [(r.data, r.tags["lastCode"]) for r in await sink(queues)] == [(b"", "503")]


async def test_an_empty_200_result_writes_nothing_to_the_sink(queues: Queues, worker: InputConsumer) -> None:
    await queues.put(ECHO, "input", b"delivered elsewhere", {})

    written = worker.finish(take(worker), Outcome(b""))

    assert written == 0
    assert await sink(queues) == []
    assert await input_items(queues) == []


async def test_priority_items_are_taken_before_normal_ones(queues: Queues, worker: InputConsumer) -> None:
    await queues.put(ECHO, "input", b"normal 1", {})
    await queues.put(ECHO, "input", b"normal 2", {})
    await queues.put(ECHO, "input", b"urgent", {}, priority=True)

    order = [take(worker).data for _ in range(3)]

    assert order == [b"urgent", b"normal 1", b"normal 2"]
    assert worker.take(ECHO) is None


async def test_two_workers_never_take_the_same_item(
    queues: Queues, worker: InputConsumer, other_worker: InputConsumer
) -> None:
    await queues.put(ECHO, "input", b"a", {})
    await queues.put(ECHO, "input", b"b", {})

    first, second = take(worker), take(other_worker)

    assert {first.data, second.data} == {b"a", b"b"}
    assert worker.take(ECHO) is None
    assert other_worker.take(ECHO) is None


async def test_a_sync_item_is_answered_in_its_reply_list_never_the_sink(
    queues: Queues, worker: InputConsumer, redis: fakeredis.FakeRedis
) -> None:
    put = await queues.put(ECHO, "input", b"question", {}, sync_reply=True)
    item = take(worker)
    assert item.sync_reply

    worker.finish(item, Outcome(b"answer", status=201, content_type="text/plain"), processing_seconds=0.25)

    reply_key = keys.sync_reply("echo", put.request_id)
    [reply] = [decode_reply(raw) for raw in redis.lrange(reply_key, 0, -1)]
    assert reply.outcome == Outcome(b"answer", status=201, content_type="text/plain")
    assert reply.processing == 0.25  # for the API's log line of this request
    assert 0 <= reply.queue_wait < 5
    assert 0 < redis.pttl(reply_key) <= 60_000  # an answer nobody picks up expires
    assert await sink(queues) == []
    assert await input_items(queues) == []


async def test_a_sync_item_with_an_empty_answer_is_still_answered(
    queues: Queues, worker: InputConsumer, redis: fakeredis.FakeRedis
) -> None:
    put = await queues.put(ECHO, "input", b"question", {}, sync_reply=True)

    worker.finish(take(worker), Outcome(b""))

    (raw,) = redis.lrange(keys.sync_reply("echo", put.request_id), 0, -1)
    assert decode_reply(raw).outcome == Outcome(b"", status=200)


# --- leases -------------------------------------------------------------------------------


async def test_an_item_whose_lease_lapsed_goes_to_another_worker_and_only_its_result_counts(
    queues: Queues, worker: InputConsumer, other_worker: InputConsumer
) -> None:
    svc = service(lease_seconds=1)
    put = await queues.put(svc, "input", b"slow", {})
    first = take(worker, svc)

    time.sleep(1.1)  # the first worker stops renewing: its lease lapses
    second = take(other_worker, svc)

    assert (second.request_id, second.deliveries) == (put.request_id, 2)
    assert worker.finish(first, Outcome(b"late result")) is None
    assert await sink(queues) == []
    assert other_worker.finish(second, Outcome(b"the result")) == 1
    assert [r.data for r in await sink(queues)] == [b"the result"]


async def test_an_item_is_not_taken_again_while_its_lease_holds(
    queues: Queues, worker: InputConsumer, other_worker: InputConsumer
) -> None:
    await queues.put(ECHO, "input", b"x", {})
    take(worker)

    assert other_worker.take(ECHO) is None


async def test_renewing_the_lease_keeps_the_item(
    queues: Queues, worker: InputConsumer, other_worker: InputConsumer
) -> None:
    svc = service(lease_seconds=1)
    await queues.put(svc, "input", b"long job", {})
    item = take(worker, svc)

    for _ in range(3):  # 1.5 s of work, renewed every 0.5 s
        time.sleep(0.5)
        assert worker.renew(item) == HELD
        assert other_worker.take(svc) is None

    assert worker.finish(item, Outcome(b"done")) == 1


async def test_renew_and_finish_report_an_item_deleted_while_it_ran(queues: Queues, worker: InputConsumer) -> None:
    put = await queues.put(ECHO, "input", b"x", {})
    item = take(worker)

    await queues.remove("echo", "input", [put.index])

    assert worker.renew(item) == CANCELLED
    assert worker.finish(item, Outcome(b"unwanted")) is None
    assert await sink(queues) == []


async def test_renew_reports_an_item_handed_to_another_worker(
    queues: Queues, worker: InputConsumer, other_worker: InputConsumer, redis: fakeredis.FakeRedis
) -> None:
    await queues.put(ECHO, "input", b"x", {})
    item = take(worker)
    stop_renewing(redis, worker, item, ECHO)
    take(other_worker)

    assert worker.renew(item) == HANDED_OVER


async def test_a_released_item_is_taken_at_once_by_another_worker(
    queues: Queues, worker: InputConsumer, other_worker: InputConsumer
) -> None:
    put = await queues.put(ECHO, "input", b"x", {})
    item = take(worker)

    worker.release(item)
    again = take(other_worker)

    assert (again.request_id, again.deliveries) == (put.request_id, 2)
    assert worker.finish(item, Outcome(b"too late")) is None


# --- max_delivery -------------------------------------------------------------------------


async def test_an_item_is_given_up_after_max_delivery_deliveries(
    queues: Queues, worker: InputConsumer, redis: fakeredis.FakeRedis
) -> None:
    svc = service(max_delivery=2)
    put = await queues.put(svc, "input", b"crashes every worker", {"user": "ana"})
    for _ in range(2):
        stop_renewing(redis, worker, take(worker, svc), svc)

    assert worker.take(svc) is None

    (result,) = await queues.read("echo", "sink", request_id=put.request_id)
    assert result.tags == {"user": "ana", "requestId": put.request_id, "lastCode": "500"}
    assert result.data == b""
    assert "given up after 2 deliveries" in result.message
    assert await input_items(queues) == []


async def test_max_delivery_one_means_no_retry(
    queues: Queues, worker: InputConsumer, redis: fakeredis.FakeRedis
) -> None:
    svc = service(max_delivery=1)
    await queues.put(svc, "input", b"x", {})
    stop_renewing(redis, worker, take(worker, svc), svc)

    assert worker.take(svc) is None
    assert [r.tags["lastCode"] for r in await sink(queues)] == ["500"]


async def test_giving_up_one_item_does_not_stop_the_next(
    queues: Queues, worker: InputConsumer, redis: fakeredis.FakeRedis
) -> None:
    svc = service(max_delivery=1)
    await queues.put(svc, "input", b"poison", {})
    await queues.put(svc, "input", b"fine", {})
    stop_renewing(redis, worker, take(worker, svc), svc)

    assert take(worker, svc).data == b"fine"


async def test_a_worker_that_returns_after_its_item_was_given_up_writes_nothing(
    queues: Queues, worker: InputConsumer, other_worker: InputConsumer, redis: fakeredis.FakeRedis
) -> None:
    svc = service(max_delivery=1)
    await queues.put(svc, "input", b"x", {})
    item = take(worker, svc)
    stop_renewing(redis, worker, item, svc)
    assert other_worker.take(svc) is None  # gives the item up

    assert worker.finish(item, Outcome(b"too late")) is None
    assert [r.tags["lastCode"] for r in await sink(queues)] == ["500"]


async def test_a_sync_item_given_up_gets_a_500_reply(
    queues: Queues, worker: InputConsumer, redis: fakeredis.FakeRedis
) -> None:
    svc = service(max_delivery=1)
    put = await queues.put(svc, "input", b"question", {}, sync_reply=True)
    stop_renewing(redis, worker, take(worker, svc), svc)

    assert worker.take(svc) is None

    (raw,) = redis.lrange(keys.sync_reply("echo", put.request_id), 0, -1)
    reply = decode_reply(raw).outcome
    assert reply.status == 500
    assert b"given up after 1 deliveries" in reply.body
    assert await sink(queues) == []


# --- back-pressure ------------------------------------------------------------------------


async def test_a_full_sink_stops_take_until_results_are_read(queues: Queues, worker: InputConsumer) -> None:
    svc = service(sink={"max_length": 1})
    await queues.put(svc, "input", b"first", {})
    second = await queues.put(svc, "input", b"second", {})
    worker.finish(take(worker, svc), Outcome(b"result 1"))

    assert worker.take(svc) == SINK_FULL
    position = await queues.search("echo", "input", second.index)
    assert position is not None and not position.is_pending  # still waiting, not dropped

    await queues.read("echo", "sink", delete=True)
    assert take(worker, svc).data == b"second"


# --- liveness -----------------------------------------------------------------------------


async def test_heartbeat_counts_the_worker_as_live_until_it_leaves(queues: Queues, worker: InputConsumer) -> None:
    worker.heartbeat([ECHO], ttl=30)
    assert await queues.live_workers("echo") == 1

    worker.leave([ECHO])
    assert await queues.live_workers("echo") == 0


async def test_last_indexes_follow_puts(queues: Queues, worker: InputConsumer) -> None:
    other = ServiceConfig(name="other", processor="workers.examples:Echo")
    await queues.put(ECHO, "input", b"x", {})
    await queues.put(ECHO, "input", b"y", {}, priority=True)

    assert worker.last_indexes([ECHO, other]) == {"echo": 2, "other": 0}


async def test_finish_records_worker_timings_for_metrics(
    queues: Queues, worker: InputConsumer, redis: fakeredis.FakeRedis
) -> None:
    """Each finished item adds to the cluster-wide histograms that /metrics exposes."""
    await queues.put(ECHO, "input", b"x", {})
    worker.finish(take(worker), Outcome(b"y"), processing_seconds=0.02)
    stats = {k.decode(): float(v) for k, v in redis.hgetall(keys.timings("echo")).items()}
    assert stats["processing:0.025"] == 1
    assert stats["processing:sum"] == 0.02
    assert sum(v for k, v in stats.items() if k.startswith("queue_wait:") and not k.endswith(":sum")) == 1
    assert sum(v for k, v in stats.items() if k.startswith("total:") and not k.endswith(":sum")) == 1
