"""Waiting without holding a connection: per service, one blocking reader wakes every waiter of this process.

Long polls, watches and sync requests all wait for something to appear in Redis: a new item in a queue, or
a sync answer in this process's reply stream. Blocking in Redis for each of them would hold a pooled
connection per wait, so a flood of waits would starve every short operation (and Redis of connections).
Instead each service has one reader task per API process, blocked in one XREAD on the streams that have
waiters; each waiter waits on an asyncio event. A waiter registers before it reads, so nothing put after
its read can slip past: the reader reads each stream from the last index it saw.

A client streaming a request's output (`api/stream.py`) waits the same way on that request's stream
(`on_stream`): the reader adds the stream to its XREAD while someone waits on it.

Watches of a client group also need to hear when an item of their group's lease lapses (a consumer left
it) and to keep their group marked live: one ticker per service does both for every group, not each watch.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

import redis.exceptions

from queue_service import tasks
from queue_service.store import keys
from queue_service.store.keys import QueueKeys, QueueName
from queue_service.store.model import Reply
from queue_service.store.queues import Entries, NewEntries, QueueStore
from queue_service.store.scripts import decode_reply

log = logging.getLogger("queue_service.api.waiters")

BLOCK_MS = 5000
# How long a cancelled XREAD is waited for before it is left to end by itself (see `_abandon`).
ABANDON_WAIT_SECONDS = 0.05
READ_COUNT = 64
# A stream stays in the reader's XREAD this long after its last waiter left: steady traffic never makes the
# reader restart its XREAD (which costs a reconnect).
LINGER_SECONDS = 60.0
# How often the ticker looks for lapsed items of watched groups, and marks those groups live.
GROUP_TICK_SECONDS = 1.0
GROUP_SEEN_EVERY_TICKS = 5
READER_RETRY_SECONDS = 1.0

Match = Callable[[int, dict[bytes, bytes]], bool]


class Waiter:
    """One wait: its event is set when something it may want appears (the waiter then looks for itself).

    `lapsed` says the wake-up was for an item of the waiter's group whose lease lapsed (a watch claims it).
    """

    __slots__ = ("event", "lapsed", "match")

    def __init__(self, match: Match | None = None) -> None:
        self.event = asyncio.Event()
        self.match = match
        self.lapsed = False

    def wants(self, index: int, fields: dict[bytes, bytes]) -> bool:
        return self.match is None or self.match(index, fields)

    async def wait(self, seconds: float) -> bool:
        """Wait for a wake-up or `seconds`; True when woken. Clears the event for the next wait.

        asyncio.timeout, not wait_for: on Python 3.11, wait_for swallows a cancellation that comes as the event
        is set (a commit wakes a watch as its client leaves), and the cancelled watch would go on delivering."""
        try:
            async with asyncio.timeout(max(0.0, seconds)):
                await self.event.wait()
        except TimeoutError:
            return False
        finally:
            self.event.clear()
        return True


# What a stream waiter keeps of what the reader read for it (its client is slow past this: it reads again).
STREAM_BUFFER_BYTES = 1 << 20
STREAM_BUFFER_ENTRIES = 4096
RawEntries = list[tuple[bytes, dict[bytes, bytes]]]


class StreamWaiter(Waiter):
    """A wait on one request's stream that also keeps the entries the reader read of it, so that a client
    that keeps up never reads the stream itself. Bounded: past `STREAM_BUFFER_*` what it kept is dropped and
    `take` says so (None); its client then reads the stream from Redis, a page at a time."""

    __slots__ = ("entries", "overflowed", "size")

    def __init__(self) -> None:
        super().__init__()
        self.entries: RawEntries = []
        self.overflowed = False
        self.size = 0

    def keep(self, entries: RawEntries) -> None:
        if self.overflowed:
            return
        self.size += sum(len(value) for _, fields in entries for value in fields.values())
        if self.size > STREAM_BUFFER_BYTES or len(self.entries) + len(entries) > STREAM_BUFFER_ENTRIES:
            self.overflowed, self.entries, self.size = True, [], 0
            return
        self.entries.extend(entries)

    def take(self) -> RawEntries | None:
        """What was kept since the last take (None: some was dropped since the last `reset`)."""
        if self.overflowed:
            return None
        entries, self.entries, self.size = self.entries, [], 0
        return entries

    def reset(self) -> None:
        """Before reading the stream from Redis: keep from now on."""
        self.entries, self.overflowed, self.size = [], False, 0


def for_request_id(request_id: str) -> Match:
    wanted = request_id.encode()
    return lambda index, fields: fields.get(b"rid") == wanted


def from_index(start: int) -> Match:
    return lambda index, fields: index >= start


@dataclass
class _QueueWaiters:
    cursor: int | None = None  # the last index the reader saw; None until it is known
    ready: asyncio.Event = field(default_factory=asyncio.Event)
    waiters: set[Waiter] = field(default_factory=set)
    idle_since: float | None = None


@dataclass
class _StreamWaiters:
    cursor: str  # the last entry id the reader saw in the request's stream
    waiters: set[StreamWaiter] = field(default_factory=set)


@dataclass
class _GroupWaiters:
    lease_ms: int
    waiters: set[Waiter] = field(default_factory=set)


async def _abandon(read: asyncio.Future[Entries]) -> None:
    """Cancel a blocked XREAD without waiting for it: redis-py swallows a cancel that lands while the
    connection is being set up and then blocks the whole BLOCK_MS (seen with redis-py 8.1: a new stream's
    first entries came 5 s late). Its answer is never used: the next XREAD reads from the same cursors."""
    read.cancel()
    await asyncio.wait({read}, timeout=ABANDON_WAIT_SECONDS)
    if read.done():
        with contextlib.suppress(asyncio.CancelledError, redis.exceptions.RedisError):
            read.result()
    else:
        read.add_done_callback(lambda future: future.cancelled() or future.exception())


class ServiceWaiters:
    """The waiters of one service in this process, and its reader and ticker tasks."""

    def __init__(self, service: str, store: QueueStore, reader: NewEntries, channel: str) -> None:
        self.service = service
        self.store = store
        self.reader = reader
        self.reply_stream = keys.replies(service, channel)
        self.queues: dict[QueueName, _QueueWaiters] = {}
        self.groups: dict[tuple[QueueName, str], _GroupWaiters] = {}
        self.replies: dict[str, asyncio.Future[Reply]] = {}
        self.streams: dict[str, _StreamWaiters] = {}  # a request's stream key -> its waiters
        self._reply_cursor = "0-0"
        self._replies_idle_since: float | None = None
        self._changed = asyncio.Event()
        self._reader_task: asyncio.Task[None] | None = None
        self._ticker_task: asyncio.Task[None] | None = None

    # --- registering ---------------------------------------------------------------------

    @asynccontextmanager
    async def on_queue(self, queue: QueueName, match: Match | None = None) -> AsyncIterator[Waiter]:
        waiter = Waiter(match)
        entry = self.queues.get(queue)
        if entry is None:
            entry = self.queues[queue] = _QueueWaiters()
            entry.waiters.add(waiter)
            self._start_reader()
            try:
                entry.cursor = await self.store.last_index(keys.queue_keys(self.service, queue))
            except BaseException:
                del self.queues[queue]
                raise
            entry.ready.set()
            self._changed.set()
        else:
            entry.waiters.add(waiter)
            entry.idle_since = None
            await entry.ready.wait()
        try:
            yield waiter
        finally:
            entry.waiters.discard(waiter)
            if not entry.waiters:
                entry.idle_since = time.monotonic()

    @asynccontextmanager
    async def on_stream(self, request_id: str) -> AsyncIterator[StreamWaiter]:
        """Wait on one request's stream: woken (and given the entries) when the reader sees new entries in it.
        Register, then read the stream yourself: nothing written after that read is missed."""
        key = keys.chunks(self.service, request_id)
        waiter = StreamWaiter()
        entry = self.streams.get(key)
        if entry is None:
            last = await self.store.stream_last_id(self.service, request_id)
            entry = self.streams.setdefault(key, _StreamWaiters(last))
            self._start_reader()
            self._changed.set()
        entry.waiters.add(waiter)
        try:
            yield waiter
        finally:
            entry.waiters.discard(waiter)
            if not entry.waiters and self.streams.get(key) is entry:
                del self.streams[key]  # no linger: a request's stream is waited on by its own clients only

    def sees_after(self, queue: QueueName, index: int) -> bool:
        """Whether the reader will wake waiters for every item put after `index` (it has not read past it)."""
        entry = self.queues.get(queue)
        return entry is not None and entry.cursor is not None and entry.cursor <= index

    @contextlib.contextmanager
    def in_group(self, queue: QueueName, group: str, lease_ms: int, waiter: Waiter) -> Iterator[None]:
        entry = self.groups.setdefault((queue, group), _GroupWaiters(lease_ms))
        entry.waiters.add(waiter)
        if self._ticker_task is None or self._ticker_task.done():
            self._ticker_task = asyncio.create_task(self._tick(), name=f"groups-{self.service}")
        try:
            yield
        finally:
            entry.waiters.discard(waiter)
            if not entry.waiters:
                self.groups.pop((queue, group), None)

    def committed(self, queue: QueueName, group: str) -> None:
        """A commit through this process: watches of that group with a full window may go on."""
        entry = self.groups.get((queue, group))
        if entry is not None:
            for waiter in entry.waiters:
                waiter.event.set()

    def ended(self, queue: QueueName) -> None:
        """The queue's stream ended through this process: its watches look now (another process's end is seen at
        their next look: at once once nothing is left, else within a second)."""
        entry = self.queues.get(queue)
        if entry is not None:
            for waiter in entry.waiters:
                waiter.event.set()

    def released(self, queue: QueueName, group: str) -> None:
        """A negative commit through this process: watches of that group may claim the refused items now."""
        entry = self.groups.get((queue, group))
        if entry is not None:
            for waiter in entry.waiters:
                waiter.lapsed = True
                waiter.event.set()

    def expect_reply(self, request_id: str) -> asyncio.Future[Reply]:
        """Register for a sync answer; call before the put, so the answer cannot come first."""
        future: asyncio.Future[Reply] = asyncio.get_running_loop().create_future()
        first = not self.replies and self._replies_idle_since is None
        self.replies[request_id] = future
        self._replies_idle_since = None
        self._start_reader()
        if first:
            self._changed.set()
        return future

    def drop_reply(self, request_id: str) -> None:
        self.replies.pop(request_id, None)
        if not self.replies:
            self._replies_idle_since = time.monotonic()

    # --- the reader ----------------------------------------------------------------------

    def _start_reader(self) -> None:
        if self._reader_task is None or self._reader_task.done():
            self._reader_task = asyncio.create_task(self._read(), name=f"waiters-{self.service}")

    def _streams(self) -> dict[str, str]:
        now = time.monotonic()
        streams: dict[str, str] = {}
        for queue, entry in list(self.queues.items()):
            if not entry.waiters and entry.idle_since is not None and now - entry.idle_since > LINGER_SECONDS:
                del self.queues[queue]
                continue
            if entry.cursor is not None:
                qk = keys.queue_keys(self.service, queue)
                streams[qk.high] = streams[qk.normal] = keys.stream_id(entry.cursor)
        for key, waiting in self.streams.items():
            streams[key] = waiting.cursor
        if self.replies or (self._replies_idle_since is not None and now - self._replies_idle_since <= LINGER_SECONDS):
            streams[self.reply_stream] = self._reply_cursor
        elif self._replies_idle_since is not None:
            self._replies_idle_since = None
        return streams

    async def _read(self) -> None:
        while True:
            streams = self._streams()
            if not streams:
                if not self.queues and not self.streams:
                    return
                await asyncio.sleep(0.05)  # a queue whose cursor is being read: its waiter sets _changed
                continue
            self._changed.clear()
            read = asyncio.ensure_future(self.reader.after(streams, count=READ_COUNT, block_ms=BLOCK_MS))
            changed = asyncio.ensure_future(self._changed.wait())
            try:
                done, _ = await asyncio.wait({read, changed}, return_when=asyncio.FIRST_COMPLETED)
            except asyncio.CancelledError:  # closing: the XREAD in flight goes too
                await _abandon(read)
                raise
            finally:
                changed.cancel()
            if read not in done:
                # A stream was added: restart the XREAD with it (the cancelled read's connection is dropped).
                await _abandon(read)
                continue
            try:
                answer = read.result()
            except redis.exceptions.RedisError as exc:
                log.warning("waiting on %s: %s; retrying", self.service, exc)
                await asyncio.sleep(READER_RETRY_SECONDS)
                continue
            self._dispatch(answer)

    def _dispatch(self, answer: Entries) -> None:
        for name, entries in answer:
            if name == self.reply_stream:
                for entry_id, fields in entries:
                    self._reply_cursor = entry_id.decode() if isinstance(entry_id, bytes) else entry_id
                    reply = decode_reply(fields)
                    future = self.replies.get(reply.request_id)
                    if future is not None and not future.done():
                        future.set_result(reply)
                continue
            waiting = self.streams.get(name)
            if waiting is not None:
                if entries:
                    last = entries[-1][0]
                    waiting.cursor = last.decode() if isinstance(last, bytes) else last
                for stream_waiter in waiting.waiters:
                    stream_waiter.keep(entries)
                    stream_waiter.event.set()
                continue
            if name.split(":")[2] == "chunks":
                continue  # its last waiter left while the reader read it
            queue: QueueName = "sink" if name.split(":")[2] == "sink" else "input"
            entry = self.queues.get(queue)
            if entry is None:
                continue
            for entry_id, fields in entries:
                index = keys.index_of(entry_id)
                if entry.cursor is None or index > entry.cursor:
                    entry.cursor = index
                for waiter in entry.waiters:
                    if waiter.wants(index, fields):
                        waiter.event.set()

    # --- the ticker ----------------------------------------------------------------------

    async def _tick(self) -> None:
        ticks = 0
        while self.groups:
            await asyncio.sleep(GROUP_TICK_SECONDS)
            ticks += 1
            for (queue, group), entry in list(self.groups.items()):
                qk = keys.queue_keys(self.service, queue)
                try:
                    if ticks % GROUP_SEEN_EVERY_TICKS == 1:
                        await self.store.seen_groups(qk, [group])
                    if await self.store.lapsed(qk, group, entry.lease_ms):
                        for waiter in entry.waiters:
                            waiter.lapsed = True
                            waiter.event.set()
                except redis.exceptions.RedisError as exc:
                    log.debug("group tick of %s/%s: %s", self.service, group, exc)

    async def close(self) -> None:
        for task in (self._reader_task, self._ticker_task):
            await tasks.stop(task)


class Waiters:
    """Every service's waiters in this API process; `channel` names this process's reply stream."""

    def __init__(self, store: QueueStore, reader: NewEntries, channel: str) -> None:
        self.store = store
        self.reader = reader
        self.channel = channel
        self._services: dict[str, ServiceWaiters] = {}

    def service(self, name: str) -> ServiceWaiters:
        found = self._services.get(name)
        if found is None:
            found = self._services[name] = ServiceWaiters(name, self.store, self.reader, self.channel)
        return found

    def of(self, qk: QueueKeys) -> ServiceWaiters:
        return self.service(qk.service)

    async def close(self) -> None:
        for service in self._services.values():
            await service.close()
