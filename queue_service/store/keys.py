"""Redis key names: built here and nowhere else (docs/architecture.md lists each key and its lifetime).

Every key of a service carries the hash tag `{service}`, so one service's keys live in one Redis
Cluster slot and each Lua script touches one slot only.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

QueueName = Literal["input", "sink"]

# The consumer group our workers share on each input queue. Client groups (the official client's
# default is `eas`) are separate: each group sees every item. Names starting with this prefix are ours.
RESERVED_PREFIX = "qs-"
WORKER_GROUP = "qs-workers"
# The webhook dispatchers' consumer group on each service's deliveries stream.
WEBHOOK_GROUP = "qs-webhooks"

# A watch connection's consumer in its group is `<consumer id>#<connection>`: a client that reconnects with the
# same id (they all do) gets a new one, so a closing connection releases only what it was sent, and a new one
# never renews what an old one was sent and its client never read. `#` is never in a consumer id.
_CONNECTION_MARK = "#"


def connection_consumer(consumer_id: str, connection: str) -> str:
    """The stream consumer of one watch connection of client consumer `consumer_id`."""
    return f"{consumer_id}{_CONNECTION_MARK}{connection}"


def consumer_id_of(stream_consumer: str) -> str:
    """The client's consumer id of a stream consumer (a worker's name is its own)."""
    return stream_consumer.partition(_CONNECTION_MARK)[0]


def _service(service: str) -> str:
    return f"qs:{{{service}}}"


@dataclass(frozen=True, slots=True)
class QueueKeys:
    """The keys of one queue: the input queue or the sink of one service."""

    service: str
    queue: QueueName

    @property
    def base(self) -> str:
        return f"{_service(self.service)}:{self.queue}"

    @property
    def normal(self) -> str:
        """Stream of normal items; entry id `<index>-0`."""
        return self.base

    @property
    def high(self) -> str:
        """Stream of priority items, served before every normal item."""
        return f"{self.base}:high"

    @property
    def seq(self) -> str:
        """Counter: the last index given out in this queue (both streams share it)."""
        return f"{self.base}:seq"

    @property
    def ids(self) -> str:
        """Hash: request id -> index of an item still in the queue (sink: `-<ms>` once it was removed)."""
        return f"{self.base}:ids"

    @property
    def reserved(self) -> str:
        """Hash: index -> `<expiry ms>:<token>` of items an auto-deleting read is answering right now."""
        return f"{self.base}:reserved"

    @property
    def groups(self) -> str:
        """Sorted set: client consumer group -> when a consumer of it was last seen (ms)."""
        return f"{self.base}:groups"

    @property
    def end(self) -> str:
        """String: the last index before the queue's end of stream (`_eos_`); absent while the queue is open."""
        return f"{self.base}:eos"

    @property
    def consumers(self) -> str:
        """Hash: `<group>.<consumer>` -> JSON of a watch consumer (window, tags, auto-commit, API process, times)."""
        return f"{self.base}:consumers"

    @property
    def streams(self) -> tuple[str, str]:
        """Both streams, in the order they are served."""
        return (self.high, self.normal)

    @property
    def all(self) -> list[str]:
        return [self.high, self.normal, self.seq, self.ids, self.reserved, self.groups, self.end, self.consumers]

    def stream(self, priority: bool) -> str:
        return self.high if priority else self.normal

    @property
    def counts(self) -> str:
        return counts(self.service)


def input_queue(service: str) -> QueueKeys:
    return QueueKeys(service, "input")


def sink_queue(service: str) -> QueueKeys:
    return QueueKeys(service, "sink")


def queue_keys(service: str, queue: QueueName) -> QueueKeys:
    return QueueKeys(service, queue)


def counts(service: str) -> str:
    """Hash of the service's counters, kept by the scripts in the same step as the streams they count.

    `waiting` / `waiting_high`: input items no worker holds (all / priority stream); `sink_used`:
    results in the sink plus the results that held items will write (the sink bound counts both);
    `sink_bytes`: bytes of result data in the sink.
    """
    return f"{_service(service)}:counts"


def live_workers(service: str) -> str:
    """Sorted set: worker name -> unix time its heartbeat lapses."""
    return f"{_service(service)}:workers"


def bell(service: str) -> str:
    """Stream of at most one entry, rung (XADD) by every put of an input item. Idle workers block on it in the
    workers' group, so each ring wakes one of them, not all; a ring nobody waited for wakes the next worker to
    wait, once."""
    return f"{_service(service)}:bell"


def running(service: str) -> str:
    """Hash: worker name -> JSON list of the items it holds now (`index`, `requestId`, `startedAt` ms,
    `deliveries`), written by the worker's lease keeper once per tick; a worker holding none has no field."""
    return f"{_service(service)}:running"


def api_processes(service: str) -> str:
    """Sorted set: `<host:port>/<channel>` of each API process serving the service -> unix time its heartbeat lapses."""
    return f"{_service(service)}:apis"


def replies(service: str, channel: str) -> str:
    """Stream of sync answers for one API process (its reply channel); expires when that process is gone."""
    return f"{_service(service)}:replies:{channel}"


def rate_limit(service: str) -> str:
    """Rate limiter state (GCRA theoretical arrival time, ms); expires when the service is idle."""
    return f"{_service(service)}:rate"


def timings(service: str) -> str:
    """Hash of worker-side latency histogram counters (see queue_service/timings.py)."""
    return f"{_service(service)}:timings"


def maintenance_lock(service: str) -> str:
    """String: held by the one worker that runs the service's periodic maintenance."""
    return f"{_service(service)}:maintenance"


def answers(service: str, minute: int) -> str:
    """Hash: the API processes' answers for the service in one minute (unix time // 60), by `<operation>:<status>`.

    Each API process adds its counts every few seconds (api/dashboard/answers.py); the key expires an hour
    after the last addition."""
    return f"{_service(service)}:answers:{minute}"


def deadlines(service: str) -> str:
    """Sorted set: input index -> deadline (ms) of requests put with a TTL; the sweep pops the due ones
    (a member whose item a worker took, or that is gone, is only dropped when its deadline comes)."""
    return f"{_service(service)}:deadlines"


def idempotency(service: str, key_digest: str) -> str:
    """String `<index>:<request id>` of the put that came with an Idempotency-Key (sha256 hex of the key);
    expires 24 h after that put."""
    return f"{_service(service)}:idempotency:{key_digest}"


@dataclass(frozen=True, slots=True)
class WebhookKeys:
    """The webhook deliveries of one service (queue_service/webhooks/ makes them)."""

    service: str

    @property
    def stream(self) -> str:
        """Stream of deliveries, one entry per event and target, written in the step that causes the event;
        the dispatchers read it through the consumer group WEBHOOK_GROUP. A delivered entry is deleted."""
        return f"{_service(self.service)}:webhooks"

    @property
    def due(self) -> str:
        """Sorted set: delivery entry id -> when it is due (ms): the next attempt of a retry, or the end of
        the lease of an attempt in flight (a dispatcher that dies leaves it to lapse)."""
        return f"{self.stream}:due"

    @property
    def dead(self) -> str:
        """Sorted set: delivery entry id -> when its last attempt failed (ms): dead letters, kept (with their
        stream entries) until retried or dropped by hand, at most DEAD_LETTERS_KEPT of them."""
        return f"{self.stream}:dead"

    @property
    def requests(self) -> str:
        """Hash: request id -> JSON of its deliveries' states (`<event>/<target>` -> state, attempts, last
        status); what a request's status reports. Dropped 24 h after its last change (dispatcher maintenance)."""
        return f"{self.stream}:requests"

    @property
    def stats(self) -> str:
        """Hash of counters: `delivered`, `failed` (attempts), `dead`, `gone`; cluster-wide, for /metrics."""
        return f"{self.stream}:stats"

    @property
    def maintenance(self) -> str:
        """String: held by the one dispatcher that runs the deliveries' maintenance now; expires after 54 s."""
        return f"{self.stream}:maintenance"

    @property
    def all(self) -> list[str]:
        return [self.stream, self.due, self.dead, self.requests, self.stats, self.maintenance]


def webhooks(service: str) -> WebhookKeys:
    return WebhookKeys(service)


def expiry_lock(service: str) -> str:
    """String: held by the one API process that sweeps the service's expired requests now (about a second)."""
    return f"{_service(service)}:deadlines:sweep"


def chunks(service: str, request_id: str) -> str:
    """Stream of what one request streamed while it ran: chunks, progress, a restart per new delivery, and a
    final done entry (workers/streaming.py). Capped in bytes per delivery; expires a while after the end."""
    return f"{_service(service)}:chunks:{request_id}"


def progress(service: str, request_id: str) -> str:
    """String: the last progress one request reported (JSON `fraction`, `message`, `at`); expires with its chunks."""
    return f"{_service(service)}:progress:{request_id}"


def webhook_gate(service: str, request_id: str, event: str) -> str:
    """String: present (for about a second, PX) while a request's `progress` or `output` webhook was enqueued
    lately; chunks.lua enqueues the next one only when it can SET it NX (at most one per request per gap)."""
    return f"{_service(service)}:webhooks:gate:{event}:{request_id}"


def webhook_output(service: str, request_id: str) -> str:
    """String: the output so far of a running request whose webhooks ask for `output` (its chunks joined), while it is
    within webhook.max_result_bytes; what chunks.lua puts in an `output` delivery. Dropped at its end."""
    return f"{_service(service)}:webhooks:output:{request_id}"


def service_keys(service: str) -> list[str]:
    """Every fixed-name key of a service (not the reply streams of API processes, which expire by themselves)."""
    return [
        *input_queue(service).all,
        *sink_queue(service).all,
        counts(service),
        live_workers(service),
        running(service),
        api_processes(service),
        rate_limit(service),
        timings(service),
        maintenance_lock(service),
        deadlines(service),
        expiry_lock(service),
        *webhooks(service).all,
    ]


def stream_id(index: int) -> str:
    return f"{index}-0"


def index_of(stream_id_: bytes | str) -> int:
    text = stream_id_.decode() if isinstance(stream_id_, bytes) else stream_id_
    return int(text.split("-", 1)[0])
