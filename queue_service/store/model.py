"""The types the API and the workers share through the store: items, outcomes, states and the store's errors."""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field, replace
from typing import Final, Literal

import redis.exceptions

TEXT_PLAIN = "text/plain; charset=utf-8"
OCTET_STREAM = "application/octet-stream"

# The terminal answer of a request whose deadline passed before it ran (lastCode 408).
EXPIRED_MESSAGE = "expired before it started"
# A release makes an item claimable at once (its idle time jumps past any lease).
RELEASE_IDLE_MS = 10**12
# The lapse a claim asks for right after a Redis restart, when idle times include the downtime and
# cannot be trusted: only released items are that idle.
RELEASED_ONLY_MS = RELEASE_IDLE_MS // 2
# How long a sync answer waits in its API process's reply stream (that process is already waiting), and how
# long the stream lives after that process's last heartbeat (every 3 s) renewed it.
REPLY_TTL_MS = 60_000
# What a lease renewal finds.
LeaseState = Literal["held", "cancelled", "handed-over"]
HELD: Final = "held"
CANCELLED: Final = "cancelled"
HANDED_OVER: Final = "handed-over"


class StoreError(Exception):
    """A store operation the caller must hear about; each subclass is one answer of a script."""


class QueueFull(StoreError):
    """The queue's bound is reached (450)."""


class QueueEnded(StoreError):
    """The queue's stream has ended (end of stream): it takes no more puts until a truncate past the end."""


class NoLiveWorker(StoreError):
    """A sync request for a service that no live worker serves (503)."""


class NotHolder(StoreError):
    """The caller no longer holds the item: its lease lapsed and another consumer took it, or it is gone."""


class ItemGone(NotHolder):
    """The item is no longer in the queue: removed while held (cancelled), or finished by a worker that took it over."""


class TooManyGroups(StoreError):
    """A new consumer group would exceed the queue's bound, and every group has live consumers."""


class NotReplicated(redis.exceptions.ConnectionError):
    """A write of a service with `queue.durability: replicated` that no replica confirmed in time (WAIT).

    The write is on the primary and may still reach a replica, or be lost in a failover: the API answers 503
    (the client may retry). A connection error, so that every caller's handling
    of a Redis outage (503, the worker's outage retry) applies as it is."""

    def __init__(self, acknowledged: int, wanted: int, timeout_ms: int) -> None:
        super().__init__(f"{acknowledged} of {wanted} replica(s) confirmed the write within {timeout_ms} ms")


@dataclass(slots=True)
class DataFrame:
    """One queue item as clients see it: its index, tags, payload and an optional message."""

    index: int
    tags: dict[str, str]
    data: bytes
    message: str = ""


@dataclass(frozen=True, slots=True)
class Outcome:
    """What a finished item publishes: the body (empty writes nothing to the sink), status and type."""

    body: bytes
    status: int = 200
    content_type: str = OCTET_STREAM
    message: str = ""

    @classmethod
    def failure(cls, status: int, message: str) -> Outcome:
        return cls(message.encode(), status, TEXT_PLAIN, message)


@dataclass(slots=True)
class Item:
    """One input item held by a worker."""

    service: str
    stream: str
    entry_id: str
    index: int
    request_id: str
    data: bytes
    tags: dict[str, str]
    put_ms: int
    reply_channel: str  # the API process waiting for a sync answer; "" for an async request
    deliveries: int
    exhausted: bool = False  # delivered queue.max_delivery times already: to be given up, not run
    expired: bool = False  # its deadline (`_ttl_`, queue.request_ttl) passed before it ran: ended, never run
    path: str = ""  # the request's sub-path (POST /api/predict/<service>/<path>), passed to the processor
    content_type: str = ""  # the put's Content-Type, as the client sent it ("" when it sent none)
    hooks: str = ""  # its webhook targets (JSON, queue_service/webhooks/targets.py); "" when none
    taken_at: float = field(default_factory=time.time)
    # When this worker took it (monotonic): a finish within half a lease of it needs no holder check.
    taken_monotonic: float = field(default_factory=time.monotonic)

    @property
    def sync(self) -> bool:
        return bool(self.reply_channel)

    @property
    def high(self) -> bool:
        """Whether it came from the priority stream."""
        return self.stream.endswith(":high")

    @property
    def queue_wait(self) -> float:
        return max(0.0, self.taken_at - self.put_ms / 1000)


@dataclass(frozen=True, slots=True)
class RunningItem:
    """One item a worker holds now, as its lease keeper last published it (`qs:{s}:running`)."""

    worker: str
    index: int
    request_id: str
    started_at_ms: int
    deliveries: int


@dataclass(frozen=True, slots=True)
class Reply:
    """A sync answer as the API reads it, with the worker's timings for the request's log line."""

    request_id: str
    outcome: Outcome
    queue_wait: float = 0.0
    processing: float = 0.0


@dataclass(frozen=True, slots=True)
class PutResult:
    index: int
    request_id: str
    repeated: bool = False  # an Idempotency-Key seen before: the first put's index and request id, nothing stored


@dataclass(frozen=True, slots=True)
class Taken:
    """What one take found: the items, or why there were none (and the last index, to wait after)."""

    items: list[Item]
    sink_full: bool = False
    last_index: int = 0


@dataclass(frozen=True, slots=True)
class Finished:
    """A finish: the sink index written (0: none), and what the worker needs to know to go on without a take."""

    sink_index: int
    waiting: int | None  # items of the service still waiting for a worker (None: not asked)


@dataclass(frozen=True, slots=True)
class Read:
    """What one read found: the frames, and the last index given out (for a long poll to wait after)."""

    frames: list[DataFrame]
    last_index: int


@dataclass(frozen=True, slots=True)
class QueueState:
    """A queue at one moment: what attributes and metrics report."""

    length: int  # items in both streams
    waiting: int  # input: items no worker holds; sink: same as length
    first_index: int  # 0 when empty
    last_index: int
    last_given: int  # the last index ever given out
    oldest_put: float | None  # unix time the first item was put
    live_workers: int
    used: int = 0  # sink: results plus the results held items will write (the bound counts both)
    bytes: int = 0  # sink: bytes of result data

    @property
    def in_flight(self) -> int:
        return max(0, self.length - self.waiting)

    @property
    def backlog_per_worker(self) -> float:
        """Waiting items per live worker; all of them when none is live."""
        return self.waiting / self.live_workers if self.live_workers else float(self.waiting)


@dataclass(frozen=True, slots=True)
class EndOfStream:
    """A queue's end of stream: the last index put before it, and whether an item put before it is still there."""

    index: int
    items_left: bool

    @property
    def reached(self) -> bool:
        """Everything put before the end is gone (consumed): a watcher sees the end now."""
        return not self.items_left


@dataclass(frozen=True, slots=True)
class WatchDelivery:
    """What one delivery to a watch consumer found: the frames, and (asked for, nothing delivered) the end."""

    frames: list[DataFrame]
    end: EndOfStream | None = None


@dataclass(frozen=True, slots=True)
class Refused:
    """What a negative commit did: items back to their group, and items that ended (delivered too often)."""

    released: int
    ended: int


@dataclass(frozen=True, slots=True)
class WatchConsumer:
    """One watch consumer as its row in the queue's consumers hash records it (the attributes list it)."""

    group: str
    consumer: str
    window: int
    tags: dict[str, str] = field(default_factory=dict)
    auto_commit: bool = False
    index: int = 0  # the index it asked to start from
    api: str = ""  # the reply channel of the API process serving its connection
    connection: str = ""  # one connection of the consumer (a reconnect is a new one)
    since_ms: int = 0
    left_ms: int = 0  # when its connection closed; 0 while open

    @property
    def name(self) -> str:
        return f"{self.group}.{self.consumer}"

    def left(self, at_ms: int) -> WatchConsumer:
        return replace(self, left_ms=at_ms)

    def to_row(self) -> str:
        """`<api>|<left ms>|<JSON>`: whether it is connected can be told without parsing the JSON."""
        return f"{self.api}|{self.left_ms}|{json.dumps(asdict(self), separators=(',', ':'))}"

    @classmethod
    def from_row(cls, raw: bytes | str) -> WatchConsumer:
        text = raw.decode() if isinstance(raw, bytes) else raw
        return cls(**json.loads(text.split("|", 2)[2]))

    @staticmethod
    def row_state(raw: bytes) -> tuple[str, int]:
        """(its API process's channel, when it left: 0 while connected) of a row, without parsing it."""
        api, left, _ = raw.split(b"|", 2)
        return api.decode(), int(left)


@dataclass(frozen=True, slots=True)
class ConsumerRow:
    """A consumer of a queue now: its row, what it holds, how long since it last took something."""

    consumer: WatchConsumer
    pending: int
    idle_ms: int  # since it left; while connected, since it came
    delivered_index: int  # the last index delivered to its group
    connected: bool


@dataclass(frozen=True, slots=True)
class Consumers:
    """A queue's client groups, its consumers (connected first, at most so many), and how many are connected."""

    groups: list[str]
    rows: list[ConsumerRow]
    connected: int


@dataclass(frozen=True, slots=True)
class Position:
    """Where an item stands (the `search` answer); `held` only says whether a consumer holds it."""

    consumer_id: str
    is_pending: bool
    wait_count: int


@dataclass(frozen=True, slots=True)
class StreamEntry:
    """One entry of a request's stream (`qs:{s}:chunks:<rid>`): `kind` is chunk, progress, restart or done;
    a chunk's `encoding` is text, bytes or json; progress and done carry JSON in `value`."""

    id: str
    kind: Literal["chunk", "progress", "restart", "done"]
    delivery: int
    value: bytes = b""
    encoding: Literal["text", "bytes", "json", ""] = ""


# --- what the dashboard reads --------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Holding:
    """An input item a worker holds now (a pending entry of the workers' group)."""

    worker: str
    index: int
    request_id: str
    put_ms: int
    deliveries: int
    idle_ms: int  # since the holder last renewed its lease (renewals reset it), not since it started
    priority: bool


@dataclass(frozen=True, slots=True)
class FailedResult:
    """A result in the sink whose status is not 200 (its data is not read)."""

    index: int
    request_id: str
    finished_ms: int
    status: int
    message: str
    size: int


@dataclass(frozen=True, slots=True)
class FailureScan:
    """The failed results among the newest `scanned` sink items (the scan is bounded)."""

    scanned: int
    oldest_ms: int  # finish time of the oldest item looked at; 0 when the sink is empty
    failures: list[FailedResult]


# --- webhook deliveries ------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Delivery:
    """One webhook delivery a dispatcher holds: an event of a request for one target, and which attempt this is.

    `fields` are the facts the step that caused the event wrote (finish.lua, take.lua, remove.lua, expire.lua):
    `event`, `target`, `url` ('' = the service's webhook), `rid`, `ts`, and per event `index`, `code`, `data`...
    """

    service: str
    entry_id: str
    webhook_id: str  # the same on every attempt (receivers dedupe on it)
    attempt: int  # 1 for the first
    fields: dict[str, bytes]

    def text(self, name: str, default: str = "") -> str:
        value = self.fields.get(name)
        return value.decode("utf-8", errors="replace") if value is not None else default

    @property
    def event(self) -> str:
        return self.text("event")

    @property
    def request_id(self) -> str:
        return self.text("rid")

    @property
    def state_key(self) -> str:
        """Its key in the request's deliveries state: `<event>/<target>`."""
        return f"{self.event}/{self.text('target', '1')}"


@dataclass(frozen=True, slots=True)
class WebhookCounts:
    """A service's webhook deliveries at one moment, and its counters since the start (cluster-wide)."""

    queued: int  # not yet taken by a dispatcher
    scheduled: int  # in flight or waiting for their next attempt
    dead: int  # dead letters
    delivered: int
    failed: int  # failed attempts
    gone: int  # stopped by a 410 answer
    dead_total: int


def ended_state(status: int, ending: str = "") -> str:
    """How a finished request ended, by its status code: succeeded, failed, cancelled (499) or expired."""
    if ending == "expired":
        return "expired"
    if status == 200:
        return "succeeded"
    if status == 499:
        return "cancelled"
    return "failed"
