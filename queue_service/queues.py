"""Queue operations on Redis streams for the API: put, get, delete, truncate, attributes, search.

Knows Redis, knows nothing of HTTP. Each operation that must be atomic is one Lua script
(`scripts.py`); this module builds keys and arguments and shapes the answers.
"""

from __future__ import annotations

import contextlib
import json
import time
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from redis.asyncio import Redis
from redis.exceptions import ResponseError

from queue_service import keys
from queue_service.config import ServiceConfig
from queue_service.keys import WORKER_GROUP, QueueKeys, QueueName
from queue_service.scripts import Scripts
from queue_service.wire import DataFrame

# Longest single blocking wait on Redis; long polls loop on it so a lost connection is noticed.
MAX_BLOCK_SECONDS = 5.0


class QueueFull(Exception):
    """The queue's bound is reached (450)."""


@dataclass(frozen=True, slots=True)
class PutResult:
    index: int
    request_id: str


@dataclass(frozen=True, slots=True)
class QueueState:
    """A queue at one moment: what attributes and metrics report."""

    length: int  # items in both streams
    in_flight: int  # items held by workers (input queue only)
    first_index: int  # 0 when empty
    last_index: int
    last_given: int  # the last index ever given out
    oldest_put: float | None  # unix time the first item was put
    live_workers: int

    @property
    def waiting(self) -> int:
        # max: length and in_flight are read one after the other, and a take may fall between.
        return max(0, self.length - self.in_flight)

    @property
    def backlog_per_worker(self) -> float:
        """Waiting items per live worker; all of them when none is live."""
        return self.waiting / self.live_workers if self.live_workers else float(self.waiting)


@dataclass(frozen=True, slots=True)
class Position:
    """Where an item stands (the `search` answer)."""

    consumer_id: str
    is_pending: bool
    wait_count: int


def new_request_id() -> str:
    # uuid4 takes 122 bits from os.urandom: unguessable, and the format the platform's clients expect.
    return str(uuid.uuid4())


def frame_from_entry(entry_id: bytes | str, flat: Sequence[bytes]) -> DataFrame:
    fields = {flat[i].decode(): flat[i + 1] for i in range(0, len(flat), 2)}
    tags: dict[str, str] = json.loads(fields.get("tags", b"{}"))
    request_id = fields.get("rid", b"").decode()
    if request_id:
        tags.setdefault("requestId", request_id)
    return DataFrame(
        index=keys.index_of(entry_id),
        tags=tags,
        data=bytes(fields.get("data", b"")),
        message=fields.get("message", b"").decode(),
    )


def queue_keys(service: str, queue: QueueName) -> QueueKeys:
    return keys.input_queue(service) if queue == "input" else keys.sink_queue(service)


class Queues:
    """The queues of every service, over one asyncio Redis client."""

    def __init__(self, redis: Redis) -> None:
        self.redis = redis
        self.scripts = Scripts.register(redis)

    async def put(
        self,
        service: ServiceConfig,
        queue: QueueName,
        data: bytes,
        tags: Mapping[str, str],
        *,
        priority: bool = False,
        sync_reply: bool = False,
    ) -> PutResult:
        """Append one item; raises QueueFull when the bound is reached (checked atomically)."""
        request_id = new_request_id()
        qk = queue_keys(service.name, queue)
        if queue == "input":
            bound, mode, counted = service.rpc.max_queue_size, "waiting", "waiting"
        else:
            bound, mode, counted = service.queue.sink.max_length, "length", "items"
        index = await self.scripts.put(
            keys=[qk.high, qk.normal, qk.seq, qk.ids],
            args=[
                data,
                json.dumps(dict(tags), ensure_ascii=False),
                request_id,
                int(time.time() * 1000),
                "1" if priority else "0",
                bound,
                mode,
                WORKER_GROUP,
                "1" if sync_reply else "",
            ],
        )
        if int(index) < 0:
            raise QueueFull(f"queue {service.name}/{queue} is full ({bound} {counted})")
        return PutResult(int(index), request_id)

    async def read(
        self,
        service: str,
        queue: QueueName,
        *,
        start: int = 0,
        length: int = 1,
        request_id: str = "",
        delete: bool = False,
        tags: Mapping[str, str] | None = None,
        timeout: float = 0.0,
    ) -> list[DataFrame]:
        """Items from index `start` (or the item of `request_id`), waiting up to `timeout` s for one."""
        qk = queue_keys(service, queue)
        deadline = time.monotonic() + timeout
        tag_filter = json.dumps(dict(tags), ensure_ascii=False) if tags else ""
        while True:
            last_index, entries = await self.scripts.read(
                keys=[qk.high, qk.normal, qk.ids, qk.seq],
                args=[start, length, request_id, "1" if delete else "0", tag_filter],
            )
            if entries:
                return [frame_from_entry(entry_id, flat) for entry_id, flat in entries]
            left = deadline - time.monotonic()
            if left <= 0:
                return []
            await self.wait_for_new(qk, int(last_index), left)

    async def wait_for_new(self, qk: QueueKeys, last_index: int, seconds: float) -> None:
        """Block until an item with an index above `last_index` is put, or `seconds` pass."""
        block_ms = max(1, int(min(seconds, MAX_BLOCK_SECONDS) * 1000))
        after = keys.stream_id(last_index)
        await self.redis.xread({qk.high: after, qk.normal: after}, count=1, block=block_ms)

    async def remove(self, service: str, queue: QueueName, indexes: Sequence[int]) -> int:
        """Delete (or commit) items by index; returns how many were there."""
        qk = queue_keys(service, queue)
        return int(
            await self.scripts.remove(keys=[qk.high, qk.normal, qk.ids], args=["indexes", WORKER_GROUP, *indexes])
        )

    async def withdraw(self, service: str, index: int) -> bool:
        """Remove an input item only if no worker has taken it yet; True when withdrawn."""
        qk = keys.input_queue(service)
        removed = await self.scripts.remove(keys=[qk.high, qk.normal, qk.ids], args=["waiting", WORKER_GROUP, index])
        return int(removed) > 0

    async def truncate(self, service: str, queue: QueueName, below: int) -> int:
        """Remove every item whose index is below `below`."""
        qk = queue_keys(service, queue)
        return int(await self.scripts.remove(keys=[qk.high, qk.normal, qk.ids], args=["below", WORKER_GROUP, below]))

    async def search(self, service: str, queue: QueueName, index: int, group: str = WORKER_GROUP) -> Position | None:
        """Where an item stands for one consumer group (the workers' group by default)."""
        qk = queue_keys(service, queue)
        found = await self.scripts.search(keys=[qk.high, qk.normal], args=[index, group])
        if not found:
            return None
        consumer, pending, ahead = found
        return Position(consumer.decode() if consumer else "", bool(int(pending)), int(ahead))

    async def live_workers(self, service: str) -> int:
        return int(await self.redis.zcount(keys.live_workers(service), time.time(), "+inf"))

    async def state(self, service: str, queue: QueueName) -> QueueState:
        """One snapshot of a queue, read in one pipeline (plus the workers' pending counts)."""
        qk = queue_keys(service, queue)
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.xlen(qk.high)
            pipe.xlen(qk.normal)
            pipe.xrange(qk.high, count=1)
            pipe.xrange(qk.normal, count=1)
            pipe.xrevrange(qk.high, count=1)
            pipe.xrevrange(qk.normal, count=1)
            pipe.get(qk.seq)
            pipe.zcount(keys.live_workers(service), time.time(), "+inf")
            high_len, normal_len, first_high, first_normal, last_high, last_normal, seq, workers = await pipe.execute()
        firsts = [e[0] for e in (first_high, first_normal) if e]
        lasts = [keys.index_of(e[0][0]) for e in (last_high, last_normal) if e]
        put_times = [int(fields[b"ts"]) / 1000 for _, fields in firsts if b"ts" in fields]
        return QueueState(
            length=int(high_len) + int(normal_len),
            in_flight=await self._pending(qk) if queue == "input" else 0,
            first_index=min(keys.index_of(entry_id) for entry_id, _ in firsts) if firsts else 0,
            last_index=max(lasts) if lasts else 0,
            last_given=int(seq or 0),
            oldest_put=min(put_times) if put_times else None,
            live_workers=int(workers),
        )

    async def attributes(self, service: ServiceConfig, queue: QueueName) -> dict[str, str]:
        """The queue's attributes, as the platform names them (all values are strings)."""
        state = await self.state(service.name, queue)
        workers = state.live_workers
        bound = service.rpc.max_queue_size if queue == "input" else service.queue.sink.max_length
        attrs = {
            "meta.name": f"{service.name}" if queue == "input" else f"{service.name}/sink",
            "meta.state": "Normal",
            "meta.maxPayloadBytes": str(service.max_payload_bytes),
            "meta.header.user": "X-EAS-QueueService-Redis-Uid",
            "meta.header.group": "X-EAS-QueueService-Redis-Gid",
            "meta.header.priority": "_priority_",
            "stream.length": str(state.length),
            "stream.approxMaxLength": str(bound),
            "stream.firstEntry": str(state.first_index),
            "stream.lastEntry": str(state.last_index),
            "stream.lastIndex": str(state.last_given),
            "consumers.stats.total": str(workers),
        }
        if queue == "input":
            attrs |= {
                "stream.waiting": str(state.waiting),
                "stream.inFlight": str(state.in_flight),
                "workers.live": str(workers),
                # The autoscaling signal: backlog per live worker (all of it when none serve).
                "workers.backlogPerWorker": f"{state.backlog_per_worker:.2f}" if workers else str(state.waiting),
            }
            if workers == 0:
                attrs["meta.state"] = "NoWorker"
        return attrs

    async def _pending(self, qk: QueueKeys) -> int:
        total = 0
        for stream in qk.streams:
            with contextlib.suppress(ResponseError):  # no stream or no group yet: nothing in flight
                total += int((await self.redis.xpending(stream, WORKER_GROUP))["pending"])
        return total
