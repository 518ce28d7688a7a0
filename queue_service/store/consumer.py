"""The queues as a worker uses them (sync redis-py: rq workers are synchronous): take, renew, finish.

The lease on a taken item is the stream's own pending-entry idle time: the holder renews it (XCLAIM JUSTID)
while it works, so an hour-long request is never handed out again while its worker lives, and a killed
worker's item lapses and is taken by another worker after `queue.lease_seconds` (take.lua).
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from redis import Redis

from queue_service.store import keys, scripts
from queue_service.store.durability import Durability, run_replicated
from queue_service.store.keys import WORKER_GROUP
from queue_service.store.model import CANCELLED, HANDED_OVER, HELD, Finished, Item, LeaseState, Outcome, Taken

# Consumed results are remembered (`-<ms>` in the sink's request-id index) this long, so a client asking
# later hears "finished, and its result was read" instead of "unknown".
REMOVED_RESULT_MEMORY_SECONDS = 24 * 3600
# A worker consumer with nothing pending and unseen this long is dropped from the workers' group.
DEAD_CONSUMER_SECONDS = 3600


@dataclass(frozen=True, slots=True)
class TakeRules:
    """A service's settings that a take obeys."""

    lease_ms: int
    max_delivery: int
    sink_max_items: int
    sink_max_bytes: int


class WorkerStore:
    """One worker's view of the queues of its services."""

    def __init__(self, redis: Redis, name: str, durability: Durability | None = None) -> None:
        self.redis = redis
        self.name = name
        self.scripts = scripts.Scripts(redis)
        # Services whose results a replica must confirm (NotReplicated, a connection error: the finish is retried).
        self.durability = dict(durability or {})

    def take(self, service: str, rules: TakeRules, *, want: int = 1, claim: bool = False) -> Taken:
        """Up to `want` items; `claim` also takes items whose lease lapsed (asked periodically, not per take)."""
        call = scripts.take(
            service,
            consumer=self.name,
            want=want,
            lease_ms=rules.lease_ms if claim else 0,
            max_delivery=rules.max_delivery,
            sink_max_items=rules.sink_max_items,
            sink_max_bytes=rules.sink_max_bytes,
        )
        return self.scripts.run(call)

    def wait_for_new(self, after: Mapping[str, int], seconds: float) -> None:
        """Block until an item is put in these services' input queues after the given index, or `seconds` pass."""
        streams: dict[Any, Any] = {}
        for service, index in after.items():
            qi = keys.input_queue(service)
            streams[qi.high] = streams[qi.normal] = keys.stream_id(index)
        self.redis.xread(streams, count=1, block=max(1, int(seconds * 1000)))

    def renew(self, item: Item) -> LeaseState:
        """Extend the lease: HELD, CANCELLED (removed while held) or HANDED_OVER (the lease lapsed)."""
        held, gone = self.scripts.run(
            scripts.lease(item.stream, [item.entry_id], group=WORKER_GROUP, consumer=self.name)
        )
        if held:
            return HELD
        return CANCELLED if gone else HANDED_OVER

    def release(self, item: Item) -> None:
        """Give the item back unfinished: another worker may take it at once."""
        call = scripts.lease(item.stream, [item.entry_id], group=WORKER_GROUP, consumer=self.name, release=True)
        self.scripts.run(call)

    def finish(self, item: Item, outcome: Outcome, processing_seconds: float = 0.0, *, held: bool = True) -> Finished:
        """Publish the outcome and remove the item; NotHolder when it is not ours any more."""
        call = scripts.finish(
            item,
            outcome,
            consumer=self.name,
            now_ms=int(time.time() * 1000),
            processing_seconds=processing_seconds,
            held=held,
        )
        rule = self.durability.get(item.service)
        if rule is not None:
            return run_replicated(self.scripts, self.redis, call, rule)
        return self.scripts.run(call)

    def heartbeat(self, services: Iterable[str], ttl: float) -> None:
        """Count this worker as live for each service for the next `ttl` seconds."""
        until = time.time() + ttl
        with self.redis.pipeline(transaction=False) as pipe:
            for service in services:
                pipe.zadd(keys.live_workers(service), {self.name: until})
            pipe.execute()

    def leave(self, services: Iterable[str]) -> None:
        with self.redis.pipeline(transaction=False) as pipe:
            for service in services:
                pipe.zrem(keys.live_workers(service), self.name)
            pipe.execute()

    def add_timings(self, counters: Mapping[str, Mapping[str, float]]) -> None:
        """Add this worker's histogram counts (service -> field -> amount) to the shared ones."""
        with self.redis.pipeline(transaction=False) as pipe:
            for service, fields in counters.items():
                for field, amount in fields.items():
                    pipe.hincrbyfloat(keys.timings(service), field, amount)
            pipe.execute()

    # --- maintenance (one worker per service at a time) --------------------------------------

    def maintain(self, service: str, lock_seconds: float) -> bool:
        """Run the service's periodic maintenance unless another worker did lately; True when this one ran it."""
        if not self.redis.set(keys.maintenance_lock(service), self.name, nx=True, ex=max(1, int(lock_seconds))):
            return False
        self.scripts.run(scripts.reconcile(service))
        self._forget_removed_results(service)
        self._drop_lapsed_reservations(service)
        self._drop_dead_consumers(service)
        now = time.time()
        self.redis.zremrangebyscore(keys.live_workers(service), "-inf", now - DEAD_CONSUMER_SECONDS)
        return True

    def _forget_removed_results(self, service: str) -> None:
        ids = keys.sink_queue(service).ids
        oldest_kept = int((time.time() - REMOVED_RESULT_MEMORY_SECONDS) * 1000)
        for request_id, value in self.redis.hscan_iter(ids, count=1000):
            # A removed result's entry is `-<ms>:<status>` and never changes again: deleting it races nothing.
            if value.startswith(b"-") and int(value[1:].split(b":")[0] or 0) < oldest_kept:
                self.redis.hdel(ids, request_id)

    def _drop_lapsed_reservations(self, service: str) -> None:
        """Reservations of auto-deleting reads whose reader never settled them (it died, or the item went
        another way): lapsed ones no longer hide anything, so they are only clutter."""
        now_ms = int(time.time() * 1000)
        for qk in (keys.input_queue(service), keys.sink_queue(service)):
            for index, value in self.redis.hscan_iter(qk.reserved, count=1000):
                # `<expiry ms>:<token>`; a read renews a lapsed one by writing it anew, so check-then-delete
                # can at worst drop a fresh reservation, which only lets another reader see the item too.
                if int(value.split(b":")[0] or 0) < now_ms - 60_000:
                    self.redis.hdel(qk.reserved, index)

    def _drop_dead_consumers(self, service: str) -> None:
        idle_ms = DEAD_CONSUMER_SECONDS * 1000
        for stream in keys.input_queue(service).streams:
            try:
                consumers: Sequence[dict] = self.redis.xinfo_consumers(stream, WORKER_GROUP)
            except Exception:  # no stream or group yet
                continue
            for consumer in consumers:
                # A consumer with pending entries keeps them: dropping it would drop them from the group.
                if int(consumer["pending"]) == 0 and int(consumer["idle"]) > idle_ms:
                    self.redis.xgroup_delconsumer(stream, WORKER_GROUP, consumer["name"])
