"""Watch: deliver a queue's items to one consumer of a consumer group, within a window.

Consumers of one group share the items (each item to one consumer); each group sees every
item. A consumer holds at most `window` items delivered and not committed; a commit frees a
slot. Items a consumer holds carry a lease that this watcher renews while the connection
lives; when it closes they are released at once, and a crashed API's leases lapse, so another
consumer of the group gets them (the same take.lua that rq workers use).
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field

from redis.asyncio import Redis
from redis.exceptions import ResponseError

from queue_service import keys
from queue_service.consumer import RELEASE_IDLE_MS, RELEASED_ONLY_MS
from queue_service.keys import QueueKeys
from queue_service.queues import frame_from_entry
from queue_service.scripts import Scripts
from queue_service.wire import DataFrame

LEASE_MS = 10_000
# Longest wait on Redis for new items before re-checking the window and the connection.
IDLE_WAIT_MS = 1000
# While the window is full, how often to look whether the client has committed.
COMMIT_POLL_SECONDS = (0.01, 0.2)


@dataclass
class WatchRequest:
    queue: QueueKeys
    group: str
    consumer: str
    window: int
    start_index: int = 0
    auto_commit: bool = False
    index_only: bool = False
    tags: Mapping[str, str] = field(default_factory=dict)


class Watcher:
    """The stream of frames for one watch connection."""

    def __init__(self, redis: Redis, scripts: Scripts, request: WatchRequest) -> None:
        self.redis = redis
        self.scripts = scripts
        self.req = request
        self._last_renew = time.monotonic()

    async def frames(self) -> AsyncIterator[DataFrame]:
        await self._ensure_groups()
        # Items this consumer held before it reconnected come first.
        for stream in self.req.queue.streams:
            reply = await self.redis.xreadgroup(self.req.group, self.req.consumer, {stream: "0"})
            for _, entries in reply or []:
                for entry_id, fields in entries:
                    if fields:  # a held entry deleted meanwhile comes back empty
                        yield self._frame(entry_id, fields)
        pause = COMMIT_POLL_SECONDS[0]
        while True:
            _stop_if_cancelled()
            held = 0 if self.req.auto_commit else await self._held()
            await self._renew_if_due()
            free = self.req.window - held
            if free <= 0:
                await asyncio.sleep(pause)
                pause = min(pause * 2, COMMIT_POLL_SECONDS[1])
                continue
            pause = COMMIT_POLL_SECONDS[0]
            last_index = int(await self.redis.get(self.req.queue.seq) or 0)
            taken = await self._take(free)
            for stream, entry_id, flat in taken:
                if self._matches(flat):
                    yield self._frame(entry_id, flat)
                else:  # not for this consumer's filter: this group is done with it
                    await self.redis.xack(stream, self.req.group, entry_id)
            if not taken:
                after = keys.stream_id(last_index)
                await self.redis.xread(
                    {self.req.queue.high: after, self.req.queue.normal: after}, count=1, block=IDLE_WAIT_MS
                )

    async def release(self) -> None:
        """Hand back what this consumer holds: another consumer of the group may take it now."""
        for stream in self.req.queue.streams:
            ids = await self._held_ids(stream)
            if ids:
                await self.scripts.lease(keys=[stream], args=[self.req.group, self.req.consumer, RELEASE_IDLE_MS, *ids])

    async def sent(self, frame: DataFrame) -> None:
        """Called once a frame is on the wire: with auto_commit, that is its commit."""
        if self.req.auto_commit:
            qk = self.req.queue
            await self.scripts.remove(keys=[qk.high, qk.normal, qk.ids], args=["indexes", self.req.group, frame.index])

    def _frame(self, entry_id: bytes, flat: list | dict) -> DataFrame:
        frame = frame_from_entry(entry_id, _flatten(flat))
        if self.req.index_only:
            frame.data = b""
        return frame

    def _matches(self, flat: list) -> bool:
        if not self.req.tags:
            return True
        fields = dict(zip(flat[0::2], flat[1::2], strict=True))
        tags = json.loads(fields.get(b"tags", b"{}"))
        return all(tags.get(k) == v for k, v in self.req.tags.items())

    async def _take(self, want: int) -> list[tuple[bytes, bytes, list]]:
        qk = self.req.queue
        taken = await self.scripts.take(
            keys=[qk.high, qk.normal, qk.ids, qk.high, qk.normal, qk.seq, qk.ids],
            args=[
                self.req.group,
                self.req.consumer,
                LEASE_MS,
                0,
                0,
                want,
                int(time.time() * 1000),
                "",
                RELEASED_ONLY_MS,
            ],
        )
        return [(stream, entry_id, flat) for stream, entry_id, flat, _ in taken or []]

    async def _ensure_groups(self) -> None:
        # A new group starts just before the requested index (0 = from the head).
        start = keys.stream_id(self.req.start_index - 1) if self.req.start_index > 1 else "0"
        for stream in self.req.queue.streams:
            try:
                await self.redis.xgroup_create(stream, self.req.group, id=start, mkstream=True)
            except ResponseError as exc:
                if "BUSYGROUP" not in str(exc):
                    raise

    async def _held_ids(self, stream: str) -> list[bytes]:
        pending = await self.redis.xpending_range(
            stream,
            self.req.group,
            min="-",
            max="+",
            count=max(self.req.window, 1) * 4,
            consumername=self.req.consumer,
        )
        return [p["message_id"] for p in pending]

    async def _held(self) -> int:
        return sum([len(await self._held_ids(stream)) for stream in self.req.queue.streams])

    async def _renew_if_due(self) -> None:
        if time.monotonic() - self._last_renew < LEASE_MS / 3000:
            return
        self._last_renew = time.monotonic()
        for stream in self.req.queue.streams:
            ids = await self._held_ids(stream)
            if ids:
                await self.scripts.lease(keys=[stream], args=[self.req.group, self.req.consumer, 0, *ids])


def _stop_if_cancelled() -> None:
    """Honour a cancellation that a Redis call swallowed, so a closed watch stops holding items.

    On Python 3.11, asyncio.wait_for (redis-py sends each command through it when a socket timeout
    is set, as redis-py 8 does by default) returns the result and drops the cancellation when both
    arrive together: the watch of a client that left would otherwise run, and renew, forever.
    """
    task = asyncio.current_task()
    if task is not None and task.cancelling():
        raise asyncio.CancelledError


def _flatten(fields: list | dict) -> list:
    """xreadgroup gives a dict of fields, take.lua a flat list: make both a flat list."""
    if isinstance(fields, dict):
        return [part for pair in fields.items() for part in pair]
    return fields
