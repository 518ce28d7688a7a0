"""The queues as a worker uses them (sync redis-py: rq workers are synchronous): take, renew, finish.

The lease on a taken item is the stream's own pending-entry idle time: the holder renews it (XCLAIM JUSTID)
while it works, so an hour-long request is never handed out again while its worker lives, and a killed
worker's item lapses and is taken by another worker after `queue.lease_seconds` (take.lua).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent import futures
from dataclasses import dataclass, field
from functools import partial
from typing import Any

from redis import Redis, RedisCluster
from redis.crc import key_slot
from redis.exceptions import NoScriptError, ResponseError

from queue_service.store import keys, scripts
from queue_service.store.durability import Durability
from queue_service.store.keys import WORKER_GROUP
from queue_service.store.model import (
    CANCELLED,
    HANDED_OVER,
    HELD,
    Finished,
    Item,
    LeaseState,
    Outcome,
    StoreError,
    Taken,
)

# Consumed results are remembered (`-<ms>` in the sink's request-id index) this long, so a client asking
# later hears "finished, and its result was read" instead of "unknown".
REMOVED_RESULT_MEMORY_SECONDS = 24 * 3600
# A worker consumer with nothing pending and unseen this long is dropped from the workers' group.
DEAD_CONSUMER_SECONDS = 3600
# On a cluster: threads for a worker's per-slot waits, and how long past its `seconds` a wait waits for them.
SLOT_WAIT_THREADS = 64
SLOT_WAIT_MARGIN_SECONDS = 0.5


@dataclass(frozen=True, slots=True)
class TakeRules:
    """A service's settings that a take obeys."""

    lease_ms: int
    max_delivery: int
    sink_max_items: int
    sink_max_bytes: int


@dataclass(frozen=True, slots=True)
class Finish:
    """One outcome to publish (see `WorkerStore.finish`)."""

    item: Item
    outcome: Outcome
    processing_seconds: float = 0.0
    held: bool = True


@dataclass(frozen=True, slots=True)
class Tick:
    """What a worker's lease keeper sends each tick, in one round trip: its liveness per service, and what it
    holds (service -> JSON list; None: it holds nothing there now, the field goes)."""

    live: Sequence[str]
    not_live: Sequence[str] = ()
    running: Mapping[str, str | None] = field(default_factory=dict)


_LEASE_STATES: dict[int, LeaseState] = {
    scripts.LEASE_HELD: HELD,
    scripts.LEASE_GONE: CANCELLED,
    scripts.LEASE_HANDED_OVER: HANDED_OVER,
}


class WorkerStore:
    """One worker's view of the queues of its services."""

    def __init__(
        self,
        redis: Redis,
        name: str,
        *,
        durability: Durability | None = None,
        webhook_inline_bytes: Mapping[str, int] | None = None,
        lease_seconds: Mapping[str, float] | None = None,
    ) -> None:
        self.redis = redis
        self.name = name
        self._cluster = isinstance(redis, RedisCluster)
        self._wait_pool: futures.ThreadPoolExecutor | None = None
        self.scripts = scripts.Scripts(redis)
        # Services whose results a replica must confirm: their finishes end with a WAIT (see Scripts.run_many).
        self.durability = dict(durability or {})
        # Per service: results up to this size go into their webhook deliveries (larger ones: a link).
        self.webhook_inline_bytes = dict(webhook_inline_bytes or {})
        # Per service: its lease. An item finished within half of it from its take skips the holder check.
        self.lease_seconds = dict(lease_seconds or {})

    def take(self, service: str, rules: TakeRules, *, want: int = 1, claim: bool = False) -> Taken:
        """Up to `want` items; `claim` also takes items whose lease lapsed (asked periodically, not per take)."""
        return self.scripts.run(self._take_call(service, rules, want, claim))

    def _take_call(self, service: str, rules: TakeRules, want: int, claim: bool) -> scripts.Call[Taken]:
        return scripts.take(
            service,
            consumer=self.name,
            want=want,
            lease_ms=rules.lease_ms if claim else 0,
            max_delivery=rules.max_delivery,
            sink_max_items=rules.sink_max_items,
            sink_max_bytes=rules.sink_max_bytes,
        )

    def wait_for_work(self, services: Sequence[str], seconds: float) -> None:
        """An idle worker's wait: until one of these services' bells rings (a put), or `seconds` pass.

        One XREADGROUP of the bells in the workers' group (NOACK: a ring needs no acknowledgement): each ring
        wakes one idle worker, where an XREAD of the input streams woke every idle worker for each put, and all
        but one of them took nothing. A ring put while no worker waited is read by the next worker that waits:
        an item put after a worker last looked never goes unnoticed. On a cluster, one wait per slot
        (`_block_per_slot`)."""
        by_slot: dict[int, dict[Any, Any]] = {}
        for service in services:
            bell = keys.bell(service)
            by_slot.setdefault(key_slot(bell.encode()) if self._cluster else 0, {})[bell] = ">"
        block_ms = max(1, int(seconds * 1000))
        self._block_per_slot([partial(self._wait_for_bells, bells, block_ms) for bells in by_slot.values()], seconds)

    def _wait_for_bells(self, bells: dict[Any, Any], block_ms: int) -> None:
        try:
            self.redis.xreadgroup(WORKER_GROUP, self.name, bells, count=1, block=block_ms, noack=True)
        except ResponseError as exc:
            if "NOGROUP" not in str(exc):
                raise
            self._make_bell_groups(bells)
            self.redis.xreadgroup(WORKER_GROUP, self.name, bells, count=1, block=block_ms, noack=True)

    def _make_bell_groups(self, bells: dict[Any, Any]) -> None:
        """A service's first wait (or a Redis that lost its data): the group reads from the first entry, so that a
        ring put before the group existed still wakes the worker."""
        for bell in bells:
            try:
                self.redis.xgroup_create(bell, WORKER_GROUP, id="0", mkstream=True)
            except ResponseError as exc:
                if "BUSYGROUP" not in str(exc):  # another worker made it meanwhile: fine
                    raise

    def wait_then_take(
        self, service: str, seconds: float, rules: TakeRules, *, want: int = 1, claim: bool = False
    ) -> Taken:
        """`wait_for_work` for one service with the next take queued behind the wait in the same pipeline: Redis
        runs the take as soon as a ring (or the timeout) ends the wait, so a woken worker holds its item
        without another round trip. What the take took (nothing after a timeout or a ring another took)."""
        bells: dict[Any, Any] = {keys.bell(service): ">"}
        call = self._take_call(service, rules, want, claim)
        with self.redis.pipeline(transaction=False) as pipe:
            pipe.xreadgroup(WORKER_GROUP, self.name, bells, count=1, block=max(1, int(seconds * 1000)), noack=True)
            pipe.execute_command("EVALSHA", self.scripts.sha(call.script), len(call.keys), *call.keys, *call.args)
            rang, taken = pipe.execute(raise_on_error=False)
        if isinstance(rang, ResponseError) and "NOGROUP" in str(rang):
            self._make_bell_groups(bells)  # the take ran all the same: what it took is the answer
        elif isinstance(rang, Exception):
            raise rang
        if isinstance(taken, NoScriptError):  # Redis restarted: the take did not run; take now (redis-py loads it)
            return self.scripts.run(call)
        if isinstance(taken, Exception):
            raise taken
        return call.decode(taken)

    def wait_for_new(self, after: Mapping[str, int], seconds: float) -> None:
        """Block until an item is put in these services' input queues after the given index, or `seconds` pass.

        One XREAD of every stream on one Redis; on a cluster an XREAD may name one slot only (CROSSSLOT), so
        each slot gets a blocking read of its own (`_block_per_slot`)."""
        by_slot: dict[int, dict[Any, Any]] = {}
        for service, index in after.items():
            qi = keys.input_queue(service)
            streams = by_slot.setdefault(key_slot(qi.normal.encode()) if self._cluster else 0, {})
            streams[qi.high] = streams[qi.normal] = keys.stream_id(index)
        block_ms = max(1, int(seconds * 1000))
        self._block_per_slot(
            [partial(self.redis.xread, streams, count=1, block=block_ms) for streams in by_slot.values()], seconds
        )

    def _block_per_slot(self, waits: Sequence[Callable[[], Any]], seconds: float) -> None:
        """Run blocking reads, one per slot: in this thread when there is one (a single Redis: always), else all
        at once in threads, the first to end ending the wait (the others end by themselves within `seconds`;
        what they read is dropped). A read that failed (Redis away) fails the wait, as the one read would."""
        if len(waits) <= 1:
            for wait in waits:
                wait()
            return
        running = [self._waits().submit(wait) for wait in waits]
        done, _ = futures.wait(running, timeout=seconds + SLOT_WAIT_MARGIN_SECONDS, return_when=futures.FIRST_COMPLETED)
        for read in done:
            read.result()

    def _waits(self) -> futures.ThreadPoolExecutor:
        """Threads for the per-slot waits (a cluster only): a wait's reads that lost the race still block for up
        to its `seconds` while the next wait starts, hence room for several waits' reads."""
        if self._wait_pool is None:
            self._wait_pool = futures.ThreadPoolExecutor(SLOT_WAIT_THREADS, thread_name_prefix="qs-slot-wait")
        return self._wait_pool

    def renew(self, item: Item) -> LeaseState:
        """Extend the lease: HELD, CANCELLED (removed while held) or HANDED_OVER (the lease lapsed)."""
        return self.renew_many([item])[0]

    def renew_many(self, items: Sequence[Item]) -> list[LeaseState]:
        """Extend the leases of several items in one round trip; one state per item, in order."""
        return self._lease_many(items, release=False)

    def release(self, item: Item) -> None:
        """Give the item back unfinished: another worker may take it at once."""
        self.release_many([item])

    def release_many(self, items: Sequence[Item]) -> None:
        if items:
            self._lease_many(items, release=True)

    def _lease_many(self, items: Sequence[Item], *, release: bool) -> list[LeaseState]:
        by_stream: dict[str, list[int]] = {}
        for i, item in enumerate(items):
            by_stream.setdefault(item.stream, []).append(i)
        calls = [
            scripts.lease(
                stream, [items[i].entry_id for i in held], group=WORKER_GROUP, consumer=self.name, release=release
            )
            for stream, held in by_stream.items()
        ]
        states: list[LeaseState] = [HELD] * len(items)
        answers: list[list[int] | StoreError] = self.scripts.run_many(calls, self.redis)
        for held, answer in zip(by_stream.values(), answers, strict=True):
            assert isinstance(answer, list)  # lease.lua has no failure answer
            for i, state in zip(held, answer, strict=True):
                states[i] = _LEASE_STATES[state]
        return states

    def finish(self, item: Item, outcome: Outcome, processing_seconds: float = 0.0, *, held: bool = True) -> Finished:
        """Publish the outcome and remove the item; NotHolder when it is not ours any more."""
        [answer] = self.finish_many([Finish(item, outcome, processing_seconds, held)])
        if isinstance(answer, StoreError):
            raise answer
        return answer

    def finish_many(self, finishes: Sequence[Finish]) -> list[Finished | StoreError]:
        """Publish several outcomes in one round trip; per item its Finished, or NotHolder / ItemGone."""
        calls = self._finish_calls(finishes)
        answers = self.scripts.run_many(calls, self.redis, wait=self._wait_for(finishes)) if calls else []
        return _per_item(calls, answers)

    def finish_then_take(
        self, finishes: Sequence[Finish], service: str, rules: TakeRules, *, want: int = 1, claim: bool = False
    ) -> tuple[list[Finished | StoreError], Taken]:
        """`finish_many`, and the next take of `service` in the same round trip: a worker with a backlog
        spends one round trip per item instead of two. The finishes run first (a take never waits on them)."""
        finish_calls = self._finish_calls(finishes)
        calls: list[scripts.Call[Any]] = [*finish_calls, self._take_call(service, rules, want, claim)]
        *finished, taken = self.scripts.run_many(calls, self.redis, wait=self._wait_for(finishes))
        if isinstance(taken, StoreError):  # take.lua has no refusal; a decode that fails is a bug, not an answer
            raise taken
        return _per_item(finish_calls, finished), taken

    def _finish_calls(self, finishes: Sequence[Finish]) -> list[scripts.Call[list[Finished | StoreError]]]:
        """Finish calls for these, in order: items in a row with the same keys (a chain's) share one call, and
        only the last call of each service tells how many items wait."""
        now_ms, now = int(time.time() * 1000), time.monotonic()
        runs: list[list[scripts.FinishPart]] = []
        for f in finishes:
            part = scripts.finish_part(
                f.item,
                f.outcome,
                consumer=self.name,
                now_ms=now_ms,
                processing_seconds=f.processing_seconds,
                held=f.held,
                fresh=now - f.item.taken_monotonic < self.lease_seconds.get(f.item.service, 0.0) / 2,
                inline_bytes=self.webhook_inline_bytes.get(f.item.service, 0),
            )
            if runs and runs[-1][0].keys == part.keys:
                runs[-1].append(part)
            else:
                runs.append([part])
        last_of = {run[0].service: i for i, run in enumerate(runs)}
        return [scripts.finish(run, count_waiting=last_of[run[0].service] == i) for i, run in enumerate(runs)]

    def _wait_for(self, finishes: Sequence[Finish]) -> tuple[int, int] | None:
        """The WAIT (replicas, timeout ms) that ends a pipeline of these finishes, if their services want one."""
        rules = [rule for f in finishes if (rule := self.durability.get(f.item.service)) is not None]
        return (max(r.replicas for r in rules), max(r.timeout_ms for r in rules)) if rules else None

    def write_streams(self, calls: Sequence[scripts.Call[bool]]) -> list[bool | StoreError]:
        """What requests streamed (`scripts.chunks_append` / `chunks_end` calls), all in one round trip."""
        return self.scripts.run_many(calls, self.redis) if calls else []

    def heartbeat(self, services: Iterable[str], ttl: float) -> None:
        """Count this worker as live for each service for the next `ttl` seconds."""
        self.tick(Tick(list(services)), ttl)

    def tick(self, tick: Tick, ttl: float) -> None:
        """Liveness (live for `ttl` seconds, or not live now) and what the worker holds, in one round trip."""
        until = time.time() + ttl
        with self.redis.pipeline(transaction=False) as pipe:
            for service in tick.live:
                pipe.zadd(keys.live_workers(service), {self.name: until})
            for service in tick.not_live:
                pipe.zrem(keys.live_workers(service), self.name)
            for service, held in tick.running.items():
                if held is None:
                    pipe.hdel(keys.running(service), self.name)
                else:
                    pipe.hset(keys.running(service), self.name, held)
            pipe.execute()

    def leave(self, services: Iterable[str]) -> None:
        with self.redis.pipeline(transaction=False) as pipe:
            for service in services:
                pipe.zrem(keys.live_workers(service), self.name)
                pipe.hdel(keys.running(service), self.name)
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
        self._drop_running_of_dead_workers(service)
        now = time.time()
        self.redis.zremrangebyscore(keys.live_workers(service), "-inf", now - DEAD_CONSUMER_SECONDS)
        return True

    def _drop_running_of_dead_workers(self, service: str) -> None:
        """A killed worker's field in `running` stays behind: drop fields of workers not live now (a live one
        that holds items writes its field again at its next tick)."""
        names: list[Any] = self.redis.hkeys(keys.running(service))
        if not names:
            return
        lapse = self.redis.zmscore(keys.live_workers(service), names)
        now = time.time()
        dead = [name for name, until in zip(names, lapse, strict=True) if until is None or until < now]
        if dead:
            self.redis.hdel(keys.running(service), *dead)

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
        for stream in [*keys.input_queue(service).streams, keys.bell(service)]:
            try:
                consumers: Sequence[dict] = self.redis.xinfo_consumers(stream, WORKER_GROUP)
            except Exception:  # no stream or group yet
                continue
            for consumer in consumers:
                # A consumer with pending entries keeps them: dropping it would drop them from the group.
                if int(consumer["pending"]) == 0 and int(consumer["idle"]) > idle_ms:
                    self.redis.xgroup_delconsumer(stream, WORKER_GROUP, consumer["name"])


def _per_item(
    calls: Sequence[scripts.Call[list[Finished | StoreError]]],
    answers: Sequence[list[Finished | StoreError] | StoreError],
) -> list[Finished | StoreError]:
    """One answer per finished item, from the answers of calls that each finished one or several."""
    per_item: list[Finished | StoreError] = []
    for call, answer in zip(calls, answers, strict=True):
        if isinstance(answer, StoreError):  # the whole call was refused: each of its items is
            per_item += [answer] * ((len(call.args) - 1) // scripts.FINISH_ARGS_PER_ITEM)
        else:
            per_item += answer
    return per_item
