"""Generator processors and their streams: what the sink gets (the chunks joined), progress, the byte cap, and
the worker's writer against a real Redis: order, coalescing (not one round trip per chunk), deliveries."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest
import redis

from queue_service.config import parse_services
from queue_service.store import keys, scripts
from queue_service.store.consumer import WorkerStore
from queue_service.store.model import Item, Outcome
from workers import streaming
from workers.context import Progress, RequestContext
from workers.processor import LoadedProcessor
from workers.runner import run_item
from workers.streaming import StreamTooLarge, StreamWriter


def loaded(target: object) -> LoadedProcessor:
    return LoadedProcessor(target, "test")


def item(request_id: str = "rid-1", deliveries: int = 1, service: str = "svc") -> Item:
    return Item(service, keys.input_queue(service).normal, "1-0", 1, request_id, b"", {}, 0, "", deliveries)


def test_a_generator_processor_result_is_its_chunks_joined() -> None:
    def text(data: bytes) -> Iterator[str]:
        yield "a"
        yield "b"

    def lines(data: bytes) -> Iterator[Any]:
        yield {"x": 1}
        yield [2]

    def mixed(data: bytes) -> Iterator[Any]:
        yield "t"
        yield b"\xff"
        yield 3

    assert loaded(text).process(b"").body == b"ab" and loaded(text).process(b"").content_type.startswith("text/plain")
    joined = loaded(lines).process(b"")
    assert (joined.body, joined.content_type) == (b'{"x":1}\n[2]\n', "application/x-ndjson")
    joined = loaded(mixed).process(b"")
    assert (joined.body, joined.content_type) == (b"t\xff3\n", "application/octet-stream")


def test_an_async_generator_processor_streams_on_the_event_loop() -> None:
    class Async:
        async def process(self, data: bytes) -> AsyncIterator[str | Progress]:
            for word in data.split():
                await asyncio.sleep(0)
                yield word.decode()
                yield Progress(0.5, "half")

    processor = loaded(Async())
    assert processor.is_async and processor.streams
    assert asyncio.run(processor.process_async(b"one two")).body == b"onetwo"


def test_a_bad_chunk_or_progress_fails_the_request_with_400_naming_it() -> None:
    def bad_chunk(data: bytes) -> Iterator[Any]:
        yield "fine"
        yield object()

    def bad_progress(data: bytes, context: RequestContext) -> str:
        context.progress(1.5)
        return "never"

    outcome = run_item(loaded(bad_chunk), item())
    assert outcome.status == 400 and "a chunk is str, bytes" in outcome.message
    outcome = run_item(loaded(bad_progress), item())
    assert outcome.status == 400 and "0..1" in outcome.message
    with pytest.raises(ValueError, match=r"0\.\.1"):
        Progress(float("nan"))


def test_past_the_cap_the_processor_is_told_at_its_yield_and_the_request_ends_with_413(
    fresh_redis_url: str,
) -> None:
    told: list[str] = []

    def fill(data: bytes) -> Iterator[str]:
        try:
            for _ in range(100):
                yield "x" * 10
        except StreamTooLarge as exc:
            told.append(str(exc))
            raise

    writer = _writer(fresh_redis_url, max_bytes=55)
    streaming.install(writer)
    held = item("capped")
    try:
        outcome = run_item(loaded(fill), held)
    finally:
        streaming.install(None)
        writer.drain([held])
    assert outcome.status == 413 and "queue.stream.max_bytes=55" in outcome.message
    assert len(told) == 1


def _writer(url: str, *, max_bytes: int = 1_000_000, flush_ms: float = 5, flush_chunks: int = 256) -> StreamWriter:
    services = parse_services(
        {
            "services": [
                {"name": "svc", "processor": "workers.examples:Echo", "queue": {"stream": {"max_bytes": max_bytes}}}
            ]
        }
    ).services
    return StreamWriter(WorkerStore(redis.Redis.from_url(url), "worker-1"), services, flush_ms, flush_chunks)


def _evalsha_calls(client: redis.Redis) -> int:
    stats: dict[str, Any] = client.info("commandstats")
    return int(stats.get("cmdstat_evalsha", {}).get("calls", 0))


def test_the_writer_keeps_order_and_sends_thousands_of_chunks_in_few_round_trips(fresh_redis_url: str) -> None:
    client = redis.Redis.from_url(fresh_redis_url)
    writer = _writer(fresh_redis_url)
    held = item("many")
    stream = writer.open(held)
    before = _evalsha_calls(client)
    for i in range(5000):
        stream.add("t", f"{i} ".encode())
        if i % 10 == 0:
            stream.progress(Progress(i / 5000, f"{i}"))
    writer.drain([held])
    entries = client.xrange(keys.chunks("svc", held.request_id))
    values = [fields[b"v"] for _, fields in entries if fields[b"k"] == b"c"]
    assert values == [f"{i} ".encode() for i in range(5000)]
    round_trips = _evalsha_calls(client) - before
    print(f"TIMING stream writer: 5000 chunks in {round_trips} round trips")
    assert round_trips < 500
    # Of the progress reports between two writes only the last is written; the key has the last one.
    assert sum(1 for _, fields in entries if fields[b"k"] == b"p") <= round_trips
    assert json.loads(client.get(keys.progress("svc", held.request_id)) or b"{}")["message"] == "4990"
    # Its end: the done entry, and the stream expires queue.stream.ttl_seconds later.
    writer.end([(held, Outcome(b"", 200))])
    last = client.xrevrange(keys.chunks("svc", held.request_id), count=1)[0][1]
    assert (last[b"k"], json.loads(last[b"v"])) == (b"d", {"statusCode": 200})
    assert 0 < client.pttl(keys.chunks("svc", held.request_id)) <= 600_000


def test_a_chunk_after_a_quiet_spell_is_written_at_once(fresh_redis_url: str) -> None:
    client = redis.Redis.from_url(fresh_redis_url)
    writer = _writer(fresh_redis_url, flush_ms=500)  # a long gap: only the first chunk may go at once
    held = item("quiet")
    started = time.monotonic()
    writer.open(held).add("t", b"first")
    while not client.exists(keys.chunks("svc", held.request_id)):
        assert time.monotonic() - started < 0.4, "the first chunk waited for the flush interval"
        time.sleep(0.002)


def test_a_new_delivery_restarts_the_stream_and_an_earlier_one_is_refused(fresh_redis_url: str) -> None:
    client = redis.Redis.from_url(fresh_redis_url)
    runner = scripts.Scripts(client)
    chunks = keys.chunks("svc", "rid")

    def append(delivery: int, value: bytes) -> bool:
        call = scripts.chunks_append("svc", "rid", delivery=delivery, entries=[("c", "t", value)], ttl_ms=60_000)
        return runner.run(call)

    assert append(1, b"a") and append(1, b"b")
    assert append(2, b"again")  # the request was handed over: a restart, and only the new delivery is kept
    assert [(f[b"k"], f.get(b"v")) for _, f in client.xrange(chunks)] == [(b"r", None), (b"c", b"again")]
    assert not append(1, b"stale")  # the worker that lost the item writes nothing more
    assert len(client.xrange(chunks)) == 2


def test_tokens_yields_n_chunks_d_ms_apart_reporting_progress_i_over_n() -> None:
    from workers.processor import load_processor
    from workers.runner import run_item_async

    reports: list[Progress] = []

    class Reports:
        def chunk(self, value: object) -> None: ...

        def progress(self, report: Progress) -> None:
            reports.append(report)

    tokens = load_processor("workers.examples:Tokens")
    started = time.monotonic()
    outcome = asyncio.run(tokens.process_async(b"4 20", RequestContext("rid", "svc", 1, stream=Reports())))
    assert outcome.body == b"t0 t1 t2 t3 " and time.monotonic() - started >= 0.06  # 3 gaps of 20 ms
    assert [(r.fraction, r.message) for r in reports] == [(0.25, "1/4"), (0.5, "2/4"), (0.75, "3/4"), (1.0, "4/4")]
    bad = item()
    bad.data = b"many"
    failed = asyncio.run(run_item_async(tokens, bad))
    assert failed.status == 400 and "Tokens expects" in failed.message
