"""LeaseKeeper: the worker's background thread for liveness, leases, timings, maintenance and interrupts.

A thread, so that a processor busy for an hour keeps its leases; if the whole process stops (killed, or stuck
in C code holding the GIL) renewals stop and its items lapse to other workers. A worker may hold several
items at once (a batch, or concurrent requests): the keeper renews all of them in one round trip per
service every lease/3, and stops each one that was cancelled (removed while it ran), handed over (its lease
lapsed while this process stalled), or that a stop's grace period caught. The main thread's items (one item
or a batch of a sync processor) are interrupted with SIGUSR1, whose handler raises `Interrupted` there, once
all of them are gone or the grace period ends; one gone item of a batch is only marked, and its result
dropped when the batch returns. Concurrent items are stopped one by one (`Held.on_interrupt`: their task
is cancelled). Once per tick it also says which services the worker is live for (a processor that is not
`healthy()`, such as an upstream that is down, makes it not live there) and publishes what it holds
(`qs:{s}:running`).
"""

from __future__ import annotations

import json
import logging
import signal
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

import redis

from queue_service.config import ServiceConfig
from queue_service.store.consumer import Tick, WorkerStore
from queue_service.store.model import CANCELLED, HANDED_OVER, HELD, Item
from queue_service.timings import TimingCounts

# A worker counts as live this long after its last heartbeat (sync requests get 503 without one).
LIVENESS_TTL_SECONDS = 5.0
HEARTBEAT_INTERVAL_SECONDS = 1.0
# How often the in-process histogram counts go to Redis, and how often a service's maintenance runs
# (in one worker of the service at a time).
TIMINGS_FLUSH_SECONDS = 2.0
MAINTENANCE_SECONDS = 60.0
# An item taken ahead (the reserve of a busy worker, see QueueWorker) waits at most this long, or a quarter of
# its lease, behind the item in hand before it is handed back: an item that turns out long does not keep the
# next one from a worker that is free.
RESERVE_MAX_WAIT_SECONDS = 1.0
SHUTDOWN = "shutdown"

log = logging.getLogger("rq.worker")


class Interrupted(BaseException):
    """The processor was stopped: `reason` is CANCELLED, HANDED_OVER or SHUTDOWN.

    A BaseException, like KeyboardInterrupt, so a processor's `except Exception` cannot swallow it.
    """

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass(eq=False)
class Held:
    """One item this worker holds, and what became of it while it ran (`reason`: None while all is well)."""

    item: Item
    lease_seconds: float
    main: bool  # run by the main thread (interrupted by SIGUSR1), else concurrent (by `on_interrupt`)
    on_interrupt: Callable[[Held], None] | None = None
    held_at: float = field(default_factory=time.monotonic)  # when it was last known to be ours
    started_ms: int = field(default_factory=lambda: int(time.time() * 1000))
    reason: str | None = None

    def lease_was_ours_when_gone(self) -> bool:
        """An item that vanished while its lease was still ours was removed (cancelled); after it had lapsed
        (this process stalled), the worker that took it over may have finished it."""
        return time.monotonic() - self.held_at < self.lease_seconds

    def running_entry(self) -> dict[str, int | str]:
        item = self.item
        return {
            "index": item.index,
            "requestId": item.request_id,
            "startedAt": self.started_ms,
            "deliveries": item.deliveries,
        }


class LeaseKeeper(threading.Thread):
    def __init__(
        self,
        store: WorkerStore,
        services: Sequence[ServiceConfig],
        shutdown_requested_at: Callable[[], float | None],
        grace_seconds: float,
        timings: TimingCounts,
        live: Callable[[str], bool] = lambda service: True,
    ) -> None:
        super().__init__(name="lease-keeper", daemon=True)
        self.store = store
        self.names = [s.name for s in services]
        self._lease_of = {s.name: s.queue.lease_seconds for s in services}
        # Each lease is renewed every lease/3: a tick of 1 s would let a 1-2 s lease lapse between two.
        self._tick = min([HEARTBEAT_INTERVAL_SECONDS, *(lease / 3 for lease in self._lease_of.values())])
        self.shutdown_requested_at = shutdown_requested_at
        self.grace_seconds = grace_seconds
        self.timings = timings
        self.live = live
        self.stopping = threading.Event()
        self._lock = threading.Lock()
        self._held: dict[int, Held] = {}  # id(held) -> held
        self._main: list[Held] = []
        self.processing = False  # True only while the main thread runs the processor: the only time to interrupt
        self.reason: str | None = None  # why the main thread's processor is to stop
        self._main_thread = threading.main_thread().ident
        self._published: set[str] = set()  # services whose `running` field this worker wrote last tick
        self._last_renew = dict.fromkeys(self.names, 0.0)
        self._reserve: list[tuple[Item, float]] = []  # items taken ahead, not running yet: (item, hand back at)
        # Run each tick after the reserve's due items go back (the worker's late deferred results, see Publisher).
        self.each_tick: Callable[[], None] = lambda: None

    def install_interrupt_handler(self) -> None:
        signal.signal(signal.SIGUSR1, self._on_interrupt)

    # --- what the worker holds ------------------------------------------------------------------

    def hold(
        self, items: Iterable[Item], *, main: bool = True, on_interrupt: Callable[[Held], None] | None = None
    ) -> list[Held]:
        """Keep the leases of these items from now on; `main`: the main thread runs them (one unit at a time)."""
        helds = [Held(item, self._lease_of[item.service], main, on_interrupt) for item in items]
        with self._lock:
            for held in helds:
                self._held[id(held)] = held
            if main:
                if not self._main:  # a new unit of the main thread (a batch being filled adds to its own)
                    self.reason = None
                self._main = [*self._main, *helds]
        return helds

    def drop(self, helds: Iterable[Held]) -> None:
        """No longer ours to keep: finished, released or given up."""
        with self._lock:
            gone = {id(held) for held in helds}
            for key in gone:
                self._held.pop(key, None)
            self._leave_main(gone)

    def unmain(self, helds: Iterable[Held]) -> None:
        """Still ours to renew (their finish is being written), but no longer the main thread's unit: the next
        unit's interrupts do not wait on them."""
        with self._lock:
            self._leave_main({id(held) for held in helds})

    def _leave_main(self, gone: set[int]) -> None:  # with self._lock held
        self._main = [held for held in self._main if id(held) not in gone]

    # --- the reserve: items taken ahead of the one in hand ---------------------------------------

    def reserve(self, items: Iterable[Item]) -> None:
        now = time.monotonic()
        with self._lock:
            self._reserve += [
                (item, now + min(RESERVE_MAX_WAIT_SECONDS, self._lease_of[item.service] / 4)) for item in items
            ]

    def take_reserved(self) -> Item | None:
        """The next item taken ahead, now the caller's to run (None: there is none)."""
        with self._lock:
            return self._reserve.pop(0)[0] if self._reserve else None

    def has_reserved(self) -> bool:
        with self._lock:
            return bool(self._reserve)

    def give_back_reserved(self, *, due_only: bool = False) -> None:
        """Release items taken ahead (all of them, or those that waited their longest): another worker takes
        them at once."""
        now = time.monotonic()
        with self._lock:
            back = [item for item, until in self._reserve if not due_only or until <= now]
            self._reserve = [(item, until) for item, until in self._reserve if due_only and until > now]
        if back:
            self.store.release_many(back)

    def held(self) -> list[Held]:
        with self._lock:
            return list(self._held.values())

    def count(self, service: str) -> int:
        with self._lock:
            return sum(1 for held in self._held.values() if held.item.service == service)

    # --- the thread -----------------------------------------------------------------------------

    def run(self) -> None:
        last_flush = 0.0
        last_maintenance = time.monotonic()
        while not self.stopping.wait(self._tick):
            try:
                self.store.tick(self._tick_state(), LIVENESS_TTL_SECONDS)
                now = time.monotonic()
                if now - last_flush >= TIMINGS_FLUSH_SECONDS:
                    last_flush = now
                    self._flush_timings()
                if now - last_maintenance >= MAINTENANCE_SECONDS:
                    last_maintenance = now
                    for name in self.names:
                        self.store.maintain(name, MAINTENANCE_SECONDS * 0.9)
                self.give_back_reserved(due_only=True)
                self.each_tick()
                if self._grace_over():
                    for held in self.held():
                        if held.reason is None:
                            self._interrupt(held, SHUTDOWN)
                    continue
                self._renew_due(now)
            except redis.RedisError as exc:  # Redis away: the main loop reports it; keep trying
                log.debug("lease keeper: %s", exc)

    def _tick_state(self) -> Tick:
        live = [name for name in self.names if self.live(name)]
        by_service: dict[str, list[dict[str, int | str]]] = {}
        for held in self.held():
            by_service.setdefault(held.item.service, []).append(held.running_entry())
        running: dict[str, str | None] = {
            service: json.dumps(entries, separators=(",", ":")) for service, entries in by_service.items()
        }
        for service in self._published - running.keys():
            running[service] = None  # it held items at the last tick and holds none now: the field goes
        self._published = set(by_service)
        return Tick(live, [name for name in self.names if name not in live], running)

    def _renew_due(self, now: float) -> None:
        for service in self.names:
            if now - self._last_renew[service] < self._lease_of[service] / 3:
                continue
            helds = [h for h in self.held() if h.item.service == service and h.reason is None]
            if not helds:
                continue
            self._last_renew[service] = now
            states = self.store.renew_many([h.item for h in helds])
            renewed_at = time.monotonic()
            for held, state in zip(helds, states, strict=True):
                if state == HELD:
                    held.held_at = renewed_at
                elif self._still_held(held):
                    self._interrupt(held, self._why_gone(state, held))

    def _still_held(self, held: Held) -> bool:
        with self._lock:
            return id(held) in self._held

    def flush(self) -> None:
        """Send what is counted now (at exit)."""
        self._flush_timings()

    def _flush_timings(self) -> None:
        counts = self.timings.drain()
        if not counts:
            return
        try:
            self.store.add_timings(counts)
        except redis.RedisError:
            self.timings.put_back(counts)
            raise

    def _why_gone(self, found: str, held: Held) -> str:
        # Only a removal seen while the lease was still ours is a cancellation, else its 'cancelled' item
        # would be the request's second result.
        if found == CANCELLED and not held.lease_was_ours_when_gone():
            return HANDED_OVER
        return found

    def _grace_over(self) -> bool:
        asked = self.shutdown_requested_at()
        return asked is not None and time.monotonic() - asked > self.grace_seconds

    # --- stopping what runs -------------------------------------------------------------------

    def _interrupt(self, held: Held, reason: str) -> None:
        held.reason = reason
        if not held.main:
            if held.on_interrupt is not None:
                held.on_interrupt(held)
            return
        with self._lock:
            main = list(self._main)
        # One gone item of a batch only drops its result; the call stops when none of its items is left.
        if reason == SHUTDOWN or all(h.reason for h in main):
            self.reason = reason
            if self.processing and self._main_thread is not None:
                signal.pthread_kill(self._main_thread, signal.SIGUSR1)

    def _on_interrupt(self, signum: int, frame: object) -> None:
        if self.processing and self.reason:
            raise Interrupted(self.reason)
