"""The store's counters recounted from the streams: after any operation they must say what the streams say.

The scripts keep `keys.counts(service)` in the same atomic step as the streams, so that hot paths read
counters instead of scanning. A drift is silent in production (a stalled take, a sink that looks full), so
the tests recount after each operation that changes a queue.
"""

from __future__ import annotations

import redis

from queue_service.store import keys
from queue_service.store.keys import WORKER_GROUP

COUNTERS = ("waiting", "waiting_high", "sink_used", "sink_bytes")


def _held_ids(client: redis.Redis, stream: str) -> set[bytes]:
    """Entries pending in the workers' group of `stream` (none when the stream or the group does not exist)."""
    try:
        rows = client.xpending_range(stream, WORKER_GROUP, min="-", max="+", count=1_000_000)
    except redis.ResponseError:
        return set()
    return {row["message_id"] for row in rows}


def recount(client: redis.Redis, service: str) -> dict[str, int]:
    """The counters as the streams say they should be.

    waiting: input items not pending in the workers' group; sink_used: results in the sink plus the async
    input items workers hold (each will write one); sink_bytes: bytes of result data in the sink.
    """
    qi, qs = keys.input_queue(service), keys.sink_queue(service)
    waiting: dict[str, int] = {}
    held_async = 0
    for stream in qi.streams:
        entries = dict(client.xrange(stream))
        held = _held_ids(client, stream) & entries.keys()
        waiting[stream] = len(entries) - len(held)
        held_async += sum(1 for entry_id in held if b"reply" not in entries[entry_id])
    results = [fields for stream in qs.streams for _, fields in client.xrange(stream)]
    return {
        "waiting": waiting[qi.high] + waiting[qi.normal],
        "waiting_high": waiting[qi.high],
        "sink_used": len(results) + held_async,
        "sink_bytes": sum(len(fields.get(b"data", b"")) for fields in results),
    }


def counters(client: redis.Redis, service: str) -> dict[str, int]:
    raw = client.hgetall(keys.counts(service))
    found = {name.decode(): int(value) for name, value in raw.items()}
    return {name: found.get(name, 0) for name in COUNTERS}


def assert_counts_true(client: redis.Redis, service: str = "echo") -> None:
    """Fail, naming each counter that drifted, unless the counters hash agrees with the streams."""
    kept, true = counters(client, service), recount(client, service)
    drift = [f"{name} is {kept[name]}, the streams say {true[name]}" for name in COUNTERS if kept[name] != true[name]]
    assert not drift, f"counters of {service!r} drifted: " + "; ".join(drift)
