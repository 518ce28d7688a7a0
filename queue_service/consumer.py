"""Taking input items under a renewable lease and finishing them: the worker's side of the queues.

Sync redis-py (rq workers are synchronous). The lease is the stream's own pending-entry idle
time: the holder renews it (XCLAIM JUSTID) while it works, so an hour-long request is never
handed out again while its worker lives, and a killed worker's item lapses and is taken by
another worker (take.lua) after `queue.lease_seconds`.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from redis import Redis

from queue_service import keys, timings
from queue_service.config import ServiceConfig
from queue_service.keys import WORKER_GROUP
from queue_service.scripts import Scripts

SINK_FULL = "sink-full"
# What a lease renewal finds.
HELD, CANCELLED, HANDED_OVER = "held", "cancelled", "handed-over"
# How long a sync reply waits for its caller to pick it up (the caller is already waiting).
REPLY_TTL_MS = 60_000
# A release makes an item claimable at once (its idle time jumps past any lease).
RELEASE_IDLE_MS = 10**12
# The idle time take.lua asks for right after a Redis restart, when leases cannot be trusted to have
# lapsed (idle times include the downtime): only released items are that idle.
RELEASED_ONLY_MS = RELEASE_IDLE_MS // 2


@dataclass(slots=True)
class TakenItem:
    """One input item held by this consumer."""

    service: str
    stream: str
    entry_id: str
    index: int
    request_id: str
    data: bytes
    tags: dict[str, str]
    put_ms: int
    sync_reply: bool
    deliveries: int
    taken_at: float = field(default_factory=time.time)

    @property
    def queue_wait(self) -> float:
        return max(0.0, self.taken_at - self.put_ms / 1000)


@dataclass(frozen=True, slots=True)
class Outcome:
    """What to publish for a finished item."""

    body: bytes
    status: int = 200
    content_type: str = "application/octet-stream"
    message: str = ""


def _decode(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def item_from_entry(service: str, stream: bytes | str, entry_id: bytes | str, flat: Sequence, deliveries: int):
    fields = {_decode(flat[i]): flat[i + 1] for i in range(0, len(flat), 2)}
    return TakenItem(
        service=service,
        stream=_decode(stream),
        entry_id=_decode(entry_id),
        index=keys.index_of(entry_id),
        request_id=_decode(fields.get("rid", b"")),
        data=bytes(fields.get("data", b"")),
        tags=json.loads(fields.get("tags", b"{}")),
        put_ms=int(fields.get("ts", 0)),
        sync_reply=bool(fields.get("reply")),
        deliveries=int(deliveries),
    )


@dataclass(frozen=True, slots=True)
class Reply:
    """A sync answer as the API reads it, with the worker's timings for the request's log line."""

    outcome: Outcome
    queue_wait: float = 0.0
    processing: float = 0.0


def encode_reply(outcome: Outcome, queue_wait: float = 0.0, processing: float = 0.0) -> bytes:
    """A sync answer as one list element: status, content type, timings (s), body."""
    head = f"{outcome.status}\n{outcome.content_type}\n{queue_wait:.6f} {processing:.6f}\n"
    return head.encode() + outcome.body


def decode_reply(raw: bytes) -> Reply:
    status, content_type, timings, body = raw.split(b"\n", 3)
    queue_wait, processing = (float(part) for part in timings.split())
    return Reply(Outcome(body=body, status=int(status), content_type=content_type.decode()), queue_wait, processing)


class InputConsumer:
    """One worker's hold on the input queues of its services."""

    def __init__(self, redis: Redis, name: str) -> None:
        self.redis = redis
        self.name = name
        self.scripts = Scripts.register(redis)

    def last_indexes(self, services: Iterable[ServiceConfig]) -> dict[str, int]:
        names = [service.name for service in services]
        values = self.redis.mget([keys.input_queue(name).seq for name in names])
        return {name: int(value or 0) for name, value in zip(names, values, strict=True)}

    def take(self, service: ServiceConfig) -> TakenItem | str | None:
        """One item of `service`, SINK_FULL when its sink is full (back-pressure), or None."""
        qi, qs = keys.input_queue(service.name), keys.sink_queue(service.name)
        taken = self.scripts.take(
            keys=[qi.high, qi.normal, qi.ids, qs.high, qs.normal, qs.seq, qs.ids],
            args=[
                WORKER_GROUP,
                self.name,
                int(service.queue.lease_seconds * 1000),
                service.queue.max_delivery,
                service.queue.sink.max_length,
                1,
                int(time.time() * 1000),
                keys.sync_reply(service.name, ""),
                RELEASED_ONLY_MS,
            ],
        )
        if not taken:
            return None
        if taken[0] == SINK_FULL.encode():
            return SINK_FULL
        stream, entry_id, flat, deliveries = taken[0]
        return item_from_entry(service.name, stream, entry_id, flat, deliveries)

    def wait_for_new(self, after: dict[str, int], seconds: float) -> None:
        """Block until a new item is put in any of these input queues, or `seconds` pass."""
        streams: dict[str, str] = {}
        for name, index in after.items():
            qi = keys.input_queue(name)
            streams[qi.high] = streams[qi.normal] = keys.stream_id(index)
        self.redis.xread(streams, count=1, block=max(1, int(seconds * 1000)))

    def renew(self, item: TakenItem) -> str:
        """Extend the lease: HELD, CANCELLED (deleted while running) or HANDED_OVER (lease lapsed)."""
        held, gone = self.scripts.lease(keys=[item.stream], args=[WORKER_GROUP, self.name, 0, item.entry_id])
        if int(held):
            return HELD
        return CANCELLED if int(gone) else HANDED_OVER

    def release(self, item: TakenItem) -> None:
        """Give the item back unfinished: another worker may take it at once."""
        self.scripts.lease(keys=[item.stream], args=[WORKER_GROUP, self.name, RELEASE_IDLE_MS, item.entry_id])

    def finish(
        self, item: TakenItem, outcome: Outcome, processing_seconds: float = 0.0, *, held: bool = True
    ) -> int | None:
        """Publish the outcome and remove the item; None when the item was no longer ours.

        A sync request's answer goes to its reply list, never to the sink. An async result
        with an empty body writes nothing (users who deliver results elsewhere do this).
        `held=False` publishes without holding the item: the terminal answer of a cancelled one.
        """
        qi, qs = keys.input_queue(item.service), keys.sink_queue(item.service)
        if item.sync_reply:
            mode, payload = "reply", encode_reply(outcome, item.queue_wait, processing_seconds)
        elif outcome.body or outcome.status != 200:
            mode, payload = "sink", outcome.body
        else:
            mode, payload = "none", b""
        tags = dict(item.tags, requestId=item.request_id)
        if outcome.status != 200:
            tags["lastCode"] = str(outcome.status)
        written = self.scripts.finish(
            keys=[
                item.stream,
                qi.ids,
                qs.normal,
                qs.seq,
                qs.ids,
                keys.sync_reply(item.service, item.request_id),
                keys.timings(item.service),
            ],
            args=[
                WORKER_GROUP if held else "",
                self.name,
                item.entry_id,
                mode,
                payload,
                json.dumps(tags, ensure_ascii=False),
                item.request_id,
                int(time.time() * 1000),
                REPLY_TTL_MS,
                outcome.message,
                *timings.increments(item.queue_wait, processing_seconds, time.time() - item.put_ms / 1000),
            ],
        )
        return None if int(written) < 0 else int(written)

    def heartbeat(self, services: Iterable[ServiceConfig], ttl: float) -> None:
        """Count this worker as live for each service for the next `ttl` seconds."""
        now = time.time()
        with self.redis.pipeline(transaction=False) as pipe:
            for service in services:
                key = keys.live_workers(service.name)
                pipe.zadd(key, {self.name: now + ttl})
                pipe.zremrangebyscore(key, "-inf", now - 3600)  # forget long-dead workers
            pipe.execute()

    def leave(self, services: Iterable[ServiceConfig]) -> None:
        with self.redis.pipeline(transaction=False) as pipe:
            for service in services:
                pipe.zrem(keys.live_workers(service.name), self.name)
            pipe.execute()
