"""`progress` and `output` webhooks of a streaming request, on a real Redis: chunks.lua enqueues them with the write
that carries the report or the chunks, at most one of each per request per gap, and the payload renders them."""

from __future__ import annotations

import base64
import dataclasses
import json
import time
from collections.abc import Iterator
from typing import Any

import pytest
import redis

from queue_service.config import parse_services
from queue_service.store import keys, scripts
from queue_service.store.consumer import WorkerStore
from queue_service.store.model import Delivery, Item
from queue_service.webhooks.payload import render
from workers.context import Progress
from workers.streaming import StreamWriter

SERVICE = "llm"
HOOKS = keys.webhooks(SERVICE)
SECRET = "whsec_" + base64.b64encode(b"x" * 32).decode()


def targets(*events: str) -> str:
    return json.dumps([{"url": "https://receiver.example/hook", "events": list(events)}])


def item(request_id: str, hooks: str, deliveries: int = 1) -> Item:
    queue = keys.input_queue(SERVICE).normal
    return Item(SERVICE, queue, "5-0", 5, request_id, b"", {}, 1_700_000_000_000, "", deliveries, hooks=hooks)


# What the worker counts of each request's chunks so far: (bytes joined, encodings seen).
_SO_FAR: dict[str, tuple[int, str]] = {}


@pytest.fixture
def client(fresh_redis_url: str) -> Iterator[redis.Redis]:
    _SO_FAR.clear()
    sync_client = redis.Redis.from_url(fresh_redis_url)
    yield sync_client
    sync_client.close()


def deliveries(client: redis.Redis, event: str | None = None) -> list[Delivery]:
    found = [
        Delivery(SERVICE, entry_id.decode(), "msg", 1, {k.decode(): v for k, v in fields.items()})
        for entry_id, fields in client.xrange(HOOKS.stream)
    ]
    return [d for d in found if event is None or d.event == event]


def payload(d: Delivery, public_url: str = "") -> dict[str, Any]:
    data: dict[str, Any] = json.loads(render(d, public_url=public_url))
    return data


def append(
    client: redis.Redis,
    held: Item,
    entries: list[tuple[str, str, bytes | str]],
    *,
    progress: str = "",
    gap_ms: int = 1000,
    inline_bytes: int = 1000,
) -> bool:
    hooks = scripts.stream_hooks(held, inline_bytes=inline_bytes, start_ms=1_700_000_001_000)
    if hooks is not None:
        hooks = dataclasses.replace(hooks, gap_ms=gap_ms)
    size, seen = _SO_FAR.get(held.request_id, (0, ""))
    for kind, encoding, value in entries:
        if kind == "c":
            size += len(value) + (encoding == "j")
            seen = "".join(e for e in "tbj" if e in seen + encoding)
    _SO_FAR[held.request_id] = (size, seen)
    call = scripts.chunks_append(
        SERVICE,
        held.request_id,
        delivery=held.deliveries,
        entries=entries,
        progress_json=progress,
        ttl_ms=60_000,
        hooks=hooks,
        output_bytes=size,
        encodings=seen,
    )
    return scripts.Scripts(client).run(call)


def report(fraction: float, message: str) -> str:
    return json.dumps({"fraction": fraction, "message": message, "at": 1})


def test_a_report_and_chunks_enqueue_progress_and_output_with_the_output_so_far(client: redis.Redis) -> None:
    held = item("r-1", targets("progress", "output", "completed"))
    assert append(client, held, [("c", "t", "t0 "), ("p", "", report(0.5, "1/2"))], progress=report(0.5, "1/2"))

    progress, output = deliveries(client, "progress"), deliveries(client, "output")
    assert len(progress) == 1 and len(output) == 1
    data = payload(progress[0])
    assert data["type"] == "request.progress"
    body = data["data"]
    assert (body["requestId"], body["index"], body["state"], body["deliveries"]) == ("r-1", 5, "running", 1)
    assert body["progress"] == {"fraction": 0.5, "message": "1/2"}
    assert {"acceptedAt", "startedAt"} <= body["timings"].keys()
    out = payload(output[0])["data"]
    assert (out["output"], out["outputSize"], out["outputType"]) == ("t0 ", 3, "text/plain; charset=utf-8")
    assert out["progress"]["fraction"] == 0.5
    state = json.loads(client.hget(HOOKS.requests, "r-1") or b"{}")
    assert state["progress/1"]["state"] == "pending" and state["output/1"]["state"] == "pending"


def test_within_the_gap_nothing_more_is_enqueued_and_after_it_the_latest_is(client: redis.Redis) -> None:
    held = item("r-2", targets("progress", "output"))
    for i in range(20):  # a fast stream: 20 writes within the gap
        append(client, held, [("c", "t", f"t{i} ")], progress=report((i + 1) / 40, f"{i + 1}/40"), gap_ms=300)
    assert len(deliveries(client, "progress")) == 1 and len(deliveries(client, "output")) == 1
    time.sleep(0.35)
    append(client, held, [("c", "t", "last ")], progress=report(0.75, "30/40"), gap_ms=300)

    progress, output = deliveries(client, "progress"), deliveries(client, "output")
    assert [payload(d)["data"]["progress"]["message"] for d in progress] == ["1/40", "30/40"]
    so_far = "".join(f"t{i} " for i in range(20)) + "last "
    assert [payload(d)["data"]["output"] for d in output] == ["t0 ", so_far]  # the output so far, each time


def test_output_beyond_max_result_bytes_is_a_link_to_the_stream_and_binary_is_base64(client: redis.Redis) -> None:
    big = item("r-3", targets("output"))
    append(client, big, [("c", "t", "x" * 50)], inline_bytes=10)
    binary = item("r-4", targets("output"))
    append(client, binary, [("c", "b", b"\xff\x00"), ("c", "j", '{"a":1}')])

    linked, encoded = (payload(d, "https://qs.example")["data"] for d in deliveries(client, "output"))
    assert linked["outputUrl"] == "https://qs.example/api/predict/llm/sink?requestId=r-3&_stream_=true"
    assert "output" not in linked and linked["outputSize"] == 50
    assert base64.b64decode(encoded["outputBase64"]) == b'\xff\x00{"a":1}\n'
    assert encoded["outputType"] == "application/octet-stream"


def test_a_request_whose_webhooks_ask_neither_gets_none_and_writes_no_gate(client: redis.Redis) -> None:
    held = item("r-5", targets("start", "completed"))
    assert scripts.stream_hooks(held, inline_bytes=10, start_ms=0) is None
    append(client, held, [("c", "t", "t0 ")], progress=report(0.1, "x"))
    only_progress = item("r-6", targets("progress"))
    append(client, only_progress, [("c", "t", "t0 ")])  # chunks only: no report, no progress webhook

    assert deliveries(client) == []
    assert client.keys(f"{HOOKS.stream}:gate:*") == []


def test_the_output_so_far_restarts_with_a_new_delivery_and_goes_at_the_end(client: redis.Redis) -> None:
    first, second = item("r-9", targets("output")), item("r-9", targets("output"), deliveries=2)
    append(client, first, [("c", "t", "old ")], gap_ms=1)
    _SO_FAR.clear()  # the new delivery's worker counts from nothing
    time.sleep(0.01)
    append(client, second, [("c", "t", "new ")], gap_ms=1)
    time.sleep(0.01)
    append(client, second, [("c", "t", "more ")], gap_ms=1)

    assert [payload(d)["data"]["output"] for d in deliveries(client, "output")] == ["old ", "new ", "new more "]
    assert [payload(d)["data"]["deliveries"] for d in deliveries(client, "output")] == [1, 2, 2]
    end = scripts.chunks_end(SERVICE, "r-9", delivery=2, done_json="{}", ttl_ms=60_000, if_exists=True)
    assert scripts.Scripts(client).run(end)
    assert not client.exists(keys.webhook_output(SERVICE, "r-9"))


def test_a_refused_write_of_an_earlier_delivery_enqueues_nothing(client: redis.Redis) -> None:
    append(client, item("r-7", "", deliveries=2), [("c", "t", "new ")])
    assert not append(client, item("r-7", targets("output"), deliveries=1), [("c", "t", "stale ")])
    assert deliveries(client) == []


def test_the_writer_enqueues_a_streaming_requests_webhooks_coalesced(fresh_redis_url: str) -> None:
    services = parse_services(
        {"services": [{"name": SERVICE, "processor": "workers.examples:Echo", "webhook": {"secret": SECRET}}]}
    ).services
    client = redis.Redis.from_url(fresh_redis_url)
    writer = StreamWriter(WorkerStore(client, "worker-1"), services, 5, 256)
    held = item("r-8", targets("progress", "output", "completed"))
    stream = writer.open(held)
    for i in range(200):  # 200 chunks within well under a second
        stream.add("t", f"t{i} ".encode())
        stream.progress(Progress((i + 1) / 200, f"{i + 1}/200"))
    writer.drain([held])

    assert 1 <= len(deliveries(client, "progress")) <= 2 and 1 <= len(deliveries(client, "output")) <= 2
    first = payload(deliveries(client, "output")[0])["data"]
    assert first["output"].startswith("t0 ") and first["timings"]["startedAt"]
    client.close()
