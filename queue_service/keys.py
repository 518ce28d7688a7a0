"""Redis key names: built here and nowhere else (docs/architecture.md lists their lifetimes).

Every key of a service carries the hash tag `{service}` so that one service's keys live in one
Redis Cluster slot, which multi-key Lua scripts need.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

QueueName = Literal["input", "sink"]

# The consumer group our rq workers share on every input queue. Client groups (the official
# client's default is `eas`) are separate: each group sees every item.
WORKER_GROUP = "qs-workers"


@dataclass(frozen=True, slots=True)
class QueueKeys:
    """The keys of one queue (the input queue or the sink of one service)."""

    service: str
    queue: QueueName

    @property
    def base(self) -> str:
        return f"qs:{{{self.service}}}:{self.queue}"

    @property
    def normal(self) -> str:
        """Stream of normal items; entry id `<index>-0`."""
        return self.base

    @property
    def high(self) -> str:
        """Stream of `_priority_=1` items, served before every normal item."""
        return f"{self.base}:high"

    @property
    def seq(self) -> str:
        """Counter: the last index given out in this queue (shared by both streams)."""
        return f"{self.base}:seq"

    @property
    def ids(self) -> str:
        """Hash: request id -> index, for items still in the queue."""
        return f"{self.base}:ids"

    @property
    def streams(self) -> tuple[str, str]:
        """Both streams, in the order they are served."""
        return (self.high, self.normal)

    @property
    def all(self) -> list[str]:
        return [self.high, self.normal, self.seq, self.ids]


def input_queue(service: str) -> QueueKeys:
    return QueueKeys(service, "input")


def sink_queue(service: str) -> QueueKeys:
    return QueueKeys(service, "sink")


def live_workers(service: str) -> str:
    """Sorted set: worker name -> unix time its heartbeat lapses."""
    return f"qs:{{{service}}}:workers"


def sync_reply(service: str, request_id: str) -> str:
    """List the worker pushes a synchronous request's answer to; expires soon after."""
    return f"qs:{{{service}}}:reply:{request_id}"


def rate_limit(service: str) -> str:
    """Rate limiter state (GCRA theoretical arrival time, ms); expires when the service is idle."""
    return f"qs:{{{service}}}:rate"


def timings(service: str) -> str:
    """Hash of worker-side latency histogram counters (see timings.py)."""
    return f"qs:{{{service}}}:timings"


def stream_id(index: int) -> str:
    return f"{index}-0"


def index_of(stream_id_: bytes | str) -> int:
    text = stream_id_.decode() if isinstance(stream_id_, bytes) else stream_id_
    return int(text.split("-", 1)[0])
