"""API-side queue operations on fakeredis: put, get, delete, truncate, search, attributes and the bounds."""

from __future__ import annotations

import asyncio
import time
import uuid
from typing import Any

import fakeredis
import pytest
from queue_service.consumer import InputConsumer, Outcome, TakenItem
from queue_service.queues import QueueFull, Queues

from queue_service.config import ServiceConfig


def service(name: str = "echo", **settings: Any) -> ServiceConfig:
    return ServiceConfig(name=name, processor="workers.examples:Echo", **settings)


ECHO = service()


@pytest.fixture
def server() -> fakeredis.FakeServer:
    return fakeredis.FakeServer()


@pytest.fixture
def queues(server: fakeredis.FakeServer) -> Queues:
    return Queues(fakeredis.FakeAsyncRedis(server=server))


@pytest.fixture
def worker(server: fakeredis.FakeServer) -> InputConsumer:
    return InputConsumer(fakeredis.FakeRedis(server=server), "worker-1")


def take(worker: InputConsumer, svc: ServiceConfig = ECHO) -> TakenItem:
    item = worker.take(svc)
    assert isinstance(item, TakenItem)
    return item


async def put_many(queues: Queues, count: int, svc: ServiceConfig = ECHO) -> list[int]:
    return [(await queues.put(svc, "input", f"item {n}".encode(), {})).index for n in range(count)]


async def indexes_in(queues: Queues) -> list[int]:
    return [frame.index for frame in await queues.read("echo", "input", length=100)]


# --- put ----------------------------------------------------------------------------------


async def test_put_returns_increasing_indexes(queues: Queues) -> None:
    assert await put_many(queues, 4) == [1, 2, 3, 4]


async def test_put_gives_each_item_a_unique_uuid4_request_id(queues: Queues) -> None:
    ids = [(await queues.put(ECHO, "input", b"x", {})).request_id for _ in range(20)]

    assert len(set(ids)) == 20
    for request_id in ids:
        parsed = uuid.UUID(request_id)
        assert parsed.version == 4
        assert str(parsed) == request_id


async def test_input_queue_and_sink_count_indexes_separately(queues: Queues) -> None:
    await put_many(queues, 3)

    assert (await queues.put(ECHO, "sink", b"result", {})).index == 1


async def test_put_then_get_by_request_id(queues: Queues) -> None:
    await queues.put(ECHO, "input", b"first", {})
    wanted = await queues.put(ECHO, "input", b"\x00\xff second", {})
    await queues.put(ECHO, "input", b"third", {})

    frames = await queues.read("echo", "input", request_id=wanted.request_id, length=10)

    assert [(f.index, f.data) for f in frames] == [(wanted.index, b"\x00\xff second")]
    assert frames[0].tags["requestId"] == wanted.request_id


async def test_get_by_an_unknown_request_id_returns_nothing(queues: Queues) -> None:
    await put_many(queues, 2)

    assert await queues.read("echo", "input", request_id=str(uuid.uuid4())) == []


async def test_tags_are_stored_and_returned_with_the_request_id(queues: Queues) -> None:
    put = await queues.put(ECHO, "input", b"x", {"user": "ana", "lang": "日本語"})

    (frame,) = await queues.read("echo", "input")

    assert frame.tags == {"user": "ana", "lang": "日本語", "requestId": put.request_id}


async def test_priority_items_are_read_before_normal_ones(queues: Queues) -> None:
    await queues.put(ECHO, "input", b"normal 1", {})
    await queues.put(ECHO, "input", b"normal 2", {})
    await queues.put(ECHO, "input", b"urgent", {}, priority=True)

    frames = await queues.read("echo", "input", length=10)

    assert [f.data for f in frames] == [b"urgent", b"normal 1", b"normal 2"]
    assert [f.index for f in frames] == [3, 1, 2]


# --- get ----------------------------------------------------------------------------------


async def test_get_from_an_index_returns_at_most_length_items(queues: Queues) -> None:
    await put_many(queues, 5)

    frames = await queues.read("echo", "input", start=2, length=2)

    assert [f.index for f in frames] == [2, 3]
    assert [f.data for f in frames] == [b"item 1", b"item 2"]


async def test_get_from_index_zero_starts_at_the_head(queues: Queues) -> None:
    await put_many(queues, 3)

    assert [f.index for f in await queues.read("echo", "input", start=0, length=1)] == [1]


async def test_get_with_a_tag_filter_returns_only_matching_items(queues: Queues) -> None:
    await queues.put(ECHO, "input", b"a", {"user": "ana", "kind": "img"})
    await queues.put(ECHO, "input", b"b", {"user": "bob", "kind": "img"})
    await queues.put(ECHO, "input", b"c", {"user": "ana", "kind": "txt"})

    by_user = await queues.read("echo", "input", length=10, tags={"user": "ana"})
    by_both = await queues.read("echo", "input", length=10, tags={"user": "ana", "kind": "txt"})
    by_none = await queues.read("echo", "input", length=10, tags={"user": "eve"})

    assert [f.data for f in by_user] == [b"a", b"c"]
    assert [f.data for f in by_both] == [b"c"]
    assert by_none == []


async def test_get_with_auto_delete_returns_an_item_only_once(queues: Queues) -> None:
    put = await queues.put(ECHO, "input", b"once", {})

    first = await queues.read("echo", "input", delete=True)
    second = await queues.read("echo", "input", delete=True)

    assert [f.data for f in first] == [b"once"]
    assert second == []
    assert await queues.read("echo", "input", request_id=put.request_id) == []


async def test_get_without_auto_delete_leaves_the_item(queues: Queues) -> None:
    await queues.put(ECHO, "input", b"stays", {})

    await queues.read("echo", "input")

    assert [f.data for f in await queues.read("echo", "input")] == [b"stays"]


async def test_get_of_an_empty_queue_answers_at_once(queues: Queues) -> None:
    started = time.monotonic()

    assert await queues.read("echo", "input", timeout=0) == []
    assert time.monotonic() - started < 0.5


async def test_get_waits_for_an_item_put_within_its_timeout(queues: Queues) -> None:
    async def put_later() -> None:
        await asyncio.sleep(0.2)
        await queues.put(ECHO, "sink", b"late result", {})

    frames, _ = await asyncio.gather(queues.read("echo", "sink", timeout=3), put_later())

    assert [f.data for f in frames] == [b"late result"]


async def test_get_gives_up_when_its_timeout_passes(queues: Queues) -> None:
    started = time.monotonic()

    assert await queues.read("echo", "sink", timeout=0.3) == []
    assert 0.25 < time.monotonic() - started < 2


# --- delete, commit, truncate -------------------------------------------------------------


async def test_remove_deletes_only_the_listed_indexes(queues: Queues) -> None:
    await put_many(queues, 4)

    assert await queues.remove("echo", "input", [1, 3]) == 2
    assert await indexes_in(queues) == [2, 4]


async def test_remove_of_absent_indexes_counts_nothing(queues: Queues) -> None:
    await put_many(queues, 2)

    assert await queues.remove("echo", "input", [7, 8]) == 0
    assert await indexes_in(queues) == [1, 2]


async def test_removed_item_is_no_longer_found_by_request_id(queues: Queues) -> None:
    put = await queues.put(ECHO, "sink", b"result", {})

    await queues.remove("echo", "sink", [put.index])

    assert await queues.read("echo", "sink", request_id=put.request_id) == []


async def test_truncate_removes_every_item_below_the_index(queues: Queues) -> None:
    await put_many(queues, 3)
    await queues.put(ECHO, "input", b"urgent", {}, priority=True)  # index 4
    await put_many(queues, 1)  # index 5

    assert await queues.truncate("echo", "input", below=4) == 3
    assert sorted(await indexes_in(queues)) == [4, 5]


async def test_truncate_below_the_first_index_removes_nothing(queues: Queues) -> None:
    await put_many(queues, 2)

    assert await queues.truncate("echo", "input", below=1) == 0
    assert await indexes_in(queues) == [1, 2]


async def test_indexes_never_repeat_after_items_are_removed(queues: Queues) -> None:
    await put_many(queues, 3)
    await queues.truncate("echo", "input", below=10)

    assert await put_many(queues, 1) == [4]


# --- search -------------------------------------------------------------------------------


async def test_search_counts_the_items_waiting_ahead(queues: Queues) -> None:
    await put_many(queues, 3)

    position = await queues.search("echo", "input", 3)

    assert position is not None
    assert (position.consumer_id, position.is_pending, position.wait_count) == ("", False, 2)


async def test_search_counts_priority_items_ahead_of_a_normal_one(queues: Queues) -> None:
    await put_many(queues, 2)
    await queues.put(ECHO, "input", b"urgent", {}, priority=True)

    normal = await queues.search("echo", "input", 2)
    urgent = await queues.search("echo", "input", 3)

    assert normal is not None and normal.wait_count == 2
    assert urgent is not None and urgent.wait_count == 0


async def test_search_names_the_worker_once_it_took_the_item(queues: Queues, worker: InputConsumer) -> None:
    await put_many(queues, 3)
    take(worker)

    taken = await queues.search("echo", "input", 1)
    behind = await queues.search("echo", "input", 3)

    assert taken is not None
    assert (taken.consumer_id, taken.is_pending) == ("worker-1", True)
    # The taken item no longer counts as waiting ahead of the others.
    assert behind is not None
    assert (behind.consumer_id, behind.is_pending, behind.wait_count) == ("", False, 1)


async def test_search_of_an_absent_index_is_none(queues: Queues) -> None:
    await put_many(queues, 2)
    await queues.remove("echo", "input", [1])

    assert await queues.search("echo", "input", 1) is None
    assert await queues.search("echo", "input", 99) is None
    assert await queues.search("nobody", "input", 1) is None


# --- attributes ---------------------------------------------------------------------------


async def test_attributes_of_an_empty_queue(queues: Queues) -> None:
    attrs = await queues.attributes(ECHO, "input")

    assert all(isinstance(value, str) for value in attrs.values())
    assert attrs["meta.name"] == "echo"
    assert attrs["meta.maxPayloadBytes"] == str(8 * 1024 * 1024)
    assert attrs["stream.length"] == "0"
    assert attrs["stream.firstEntry"] == "0"
    assert attrs["stream.lastEntry"] == "0"
    assert attrs["stream.approxMaxLength"] == "64"


async def test_attributes_count_waiting_and_in_flight_items(queues: Queues, worker: InputConsumer) -> None:
    await put_many(queues, 3)
    await queues.put(ECHO, "input", b"urgent", {}, priority=True)
    await queues.remove("echo", "input", [1])
    take(worker)  # the priority item, index 4

    attrs = await queues.attributes(ECHO, "input")

    assert attrs["stream.length"] == "3"
    assert attrs["stream.firstEntry"] == "2"
    assert attrs["stream.lastEntry"] == "4"
    assert attrs["stream.waiting"] == "2"
    assert attrs["stream.inFlight"] == "1"


async def test_attributes_count_live_workers_and_the_backlog_per_worker(
    queues: Queues, server: fakeredis.FakeServer
) -> None:
    await put_many(queues, 5)
    workers = [InputConsumer(fakeredis.FakeRedis(server=server), f"worker-{n}") for n in range(3)]
    for live in workers[:2]:
        live.heartbeat([ECHO], ttl=30)
    workers[2].heartbeat([ECHO], ttl=-1)  # its liveness already lapsed

    attrs = await queues.attributes(ECHO, "input")

    assert attrs["workers.live"] == "2"
    assert attrs["consumers.stats.total"] == "2"
    assert attrs["workers.backlogPerWorker"] == "2.50"
    assert attrs["meta.state"] == "Normal"


async def test_attributes_without_workers_show_the_whole_backlog(queues: Queues, worker: InputConsumer) -> None:
    await put_many(queues, 3)
    worker.heartbeat([ECHO], ttl=30)
    worker.leave([ECHO])

    attrs = await queues.attributes(ECHO, "input")

    assert attrs["workers.live"] == "0"
    assert attrs["workers.backlogPerWorker"] == "3"
    assert attrs["meta.state"] == "NoWorker"


async def test_attributes_of_the_sink_name_it_and_show_its_bound(queues: Queues) -> None:
    svc = service(queue={"sink": {"max_length": 50}})
    await queues.put(svc, "sink", b"r1", {})
    await queues.put(svc, "sink", b"r2", {})

    attrs = await queues.attributes(svc, "sink")

    assert attrs["meta.name"] == "echo/sink"
    assert attrs["stream.length"] == "2"
    assert attrs["stream.approxMaxLength"] == "50"


# --- admission ----------------------------------------------------------------------------


async def test_put_is_refused_at_exactly_max_queue_size(queues: Queues) -> None:
    svc = service(metadata={"rpc": {"max_queue_size": 3}})
    await put_many(queues, 3, svc)

    with pytest.raises(QueueFull, match="echo/input is full"):
        await queues.put(svc, "input", b"one too many", {})
    assert await indexes_in(queues) == [1, 2, 3]


async def test_priority_items_share_the_bound(queues: Queues) -> None:
    svc = service(metadata={"rpc": {"max_queue_size": 2}})
    await queues.put(svc, "input", b"normal", {})
    await queues.put(svc, "input", b"urgent", {}, priority=True)

    with pytest.raises(QueueFull):
        await queues.put(svc, "input", b"urgent too", {}, priority=True)


async def test_items_taken_by_a_worker_do_not_count_as_waiting(queues: Queues, worker: InputConsumer) -> None:
    svc = service(metadata={"rpc": {"max_queue_size": 2}})
    await put_many(queues, 2, svc)
    take(worker, svc)

    assert (await queues.put(svc, "input", b"fits", {})).index == 3
    with pytest.raises(QueueFull):
        await queues.put(svc, "input", b"does not", {})


async def test_deleted_items_free_their_slots(queues: Queues) -> None:
    svc = service(metadata={"rpc": {"max_queue_size": 2}})
    await put_many(queues, 2, svc)
    await queues.remove("echo", "input", [1])

    assert (await queues.put(svc, "input", b"fits", {})).index == 3


async def test_a_finished_item_frees_its_slot(queues: Queues, worker: InputConsumer) -> None:
    svc = service(metadata={"rpc": {"max_queue_size": 1}})
    await put_many(queues, 1, svc)
    worker.finish(take(worker, svc), Outcome(b"done"))

    assert (await queues.put(svc, "input", b"next", {})).index == 2


async def test_a_cancelled_item_frees_its_slot(queues: Queues, worker: InputConsumer) -> None:
    svc = service(metadata={"rpc": {"max_queue_size": 1}})
    await put_many(queues, 1, svc)
    take(worker, svc)
    await queues.remove("echo", "input", [1])  # deleted while the worker held it

    await queues.put(svc, "input", b"next", {})
    with pytest.raises(QueueFull):
        await queues.put(svc, "input", b"over", {})


async def test_the_sink_bound_is_its_length(queues: Queues) -> None:
    svc = service(queue={"sink": {"max_length": 2}})
    await queues.put(svc, "sink", b"r1", {})
    await queues.put(svc, "sink", b"r2", {})
    await queues.read("echo", "sink", length=10)  # reading without deleting frees nothing

    with pytest.raises(QueueFull, match=r"echo/sink is full \(2 items\)"):
        await queues.put(svc, "sink", b"r3", {})
    await queues.read("echo", "sink", delete=True)
    assert (await queues.put(svc, "sink", b"r3", {})).index == 3


async def test_one_service_being_full_does_not_refuse_another(queues: Queues) -> None:
    small = service("small", metadata={"rpc": {"max_queue_size": 1}})
    await put_many(queues, 1, small)

    with pytest.raises(QueueFull):
        await queues.put(small, "input", b"over", {})
    assert (await queues.put(ECHO, "input", b"elsewhere", {})).index == 1
