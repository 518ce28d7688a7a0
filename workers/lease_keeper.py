"""LeaseKeeper: the worker's background thread for liveness, leases, timings, maintenance and interrupts.

A thread, so that a processor busy for an hour keeps its lease; if the whole process stops (killed, or stuck
in C code holding the GIL) renewals stop and the item lapses to another worker. The processor runs in the
main thread; when the item is cancelled (removed while it runs), handed over (its lease lapsed while this
process stalled), or a stop's grace period ends, the keeper interrupts it with SIGUSR1, whose handler raises
`Interrupted` in the main thread.
"""

from __future__ import annotations

import logging
import signal
import threading
import time
from collections.abc import Callable, Sequence

import redis

from queue_service.config import ServiceConfig
from queue_service.store.consumer import WorkerStore
from queue_service.store.model import CANCELLED, HANDED_OVER, HELD, Item
from queue_service.timings import TimingCounts

# A worker counts as live this long after its last heartbeat (sync requests get 503 without one).
LIVENESS_TTL_SECONDS = 5.0
HEARTBEAT_INTERVAL_SECONDS = 1.0
# How often the in-process histogram counts go to Redis, and how often a service's maintenance runs
# (in one worker of the service at a time).
TIMINGS_FLUSH_SECONDS = 2.0
MAINTENANCE_SECONDS = 60.0
SHUTDOWN = "shutdown"

log = logging.getLogger("rq.worker")


class Interrupted(BaseException):
    """The processor was stopped: `reason` is CANCELLED, HANDED_OVER or SHUTDOWN.

    A BaseException, like KeyboardInterrupt, so a processor's `except Exception` cannot swallow it.
    """

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class LeaseKeeper(threading.Thread):
    def __init__(
        self,
        store: WorkerStore,
        services: Sequence[ServiceConfig],
        shutdown_requested_at: Callable[[], float | None],
        grace_seconds: float,
        timings: TimingCounts,
    ) -> None:
        super().__init__(name="lease-keeper", daemon=True)
        self.store = store
        self.services = list(services)
        self.names = [s.name for s in services]
        self._lease_of = {s.name: s.queue.lease_seconds for s in services}
        # Each lease is renewed every lease/3: a tick of 1 s would let a 1-2 s lease lapse between two.
        self._tick = min([HEARTBEAT_INTERVAL_SECONDS, *(lease / 3 for lease in self._lease_of.values())])
        self._held_at = 0.0  # when the item in hand was last known to be ours
        self.shutdown_requested_at = shutdown_requested_at
        self.grace_seconds = grace_seconds
        self.timings = timings
        self.stopping = threading.Event()
        self.item: Item | None = None
        self.processing = False  # True only while the processor runs: the only time to interrupt
        self.reason: str | None = None
        self._main_thread = threading.main_thread().ident

    def install_interrupt_handler(self) -> None:
        signal.signal(signal.SIGUSR1, self._on_interrupt)

    def hold(self, item: Item | None) -> None:
        self.reason = None
        self._held_at = time.monotonic()
        self.item = item

    def lease_was_ours_when_gone(self, item: Item) -> bool:
        """An item that vanished while its lease was still ours was removed (cancelled); after it had lapsed
        (this process stalled), the worker that took it over may have finished it."""
        return time.monotonic() - self._held_at < self._lease_of[item.service]

    def run(self) -> None:
        last_renew = last_flush = 0.0
        last_maintenance = time.monotonic()
        while not self.stopping.wait(self._tick):
            try:
                self.store.heartbeat(self.names, LIVENESS_TTL_SECONDS)
                now = time.monotonic()
                if now - last_flush >= TIMINGS_FLUSH_SECONDS:
                    last_flush = now
                    self._flush_timings()
                if now - last_maintenance >= MAINTENANCE_SECONDS:
                    last_maintenance = now
                    for name in self.names:
                        self.store.maintain(name, MAINTENANCE_SECONDS * 0.9)
                item = self.item
                if item is None or self.reason:
                    continue
                if self._grace_over():
                    self._interrupt(SHUTDOWN)
                    continue
                if now - last_renew >= self._lease_of[item.service] / 3:
                    last_renew = now
                    found = self.store.renew(item)
                    if found == HELD:
                        self._held_at = time.monotonic()
                    elif item is self.item:
                        self._interrupt(self._why_gone(found, item))
            except redis.RedisError as exc:  # Redis away: the main loop reports it; keep trying
                log.debug("lease keeper: %s", exc)

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

    def _why_gone(self, found: str, item: Item) -> str:
        # Only a removal seen while the lease was still ours is a cancellation, else its 'cancelled' item
        # would be the request's second result.
        if found == CANCELLED and not self.lease_was_ours_when_gone(item):
            return HANDED_OVER
        return found

    def _grace_over(self) -> bool:
        asked = self.shutdown_requested_at()
        return asked is not None and time.monotonic() - asked > self.grace_seconds

    def _interrupt(self, reason: str) -> None:
        self.reason = reason
        if self.processing and self._main_thread is not None:
            signal.pthread_kill(self._main_thread, signal.SIGUSR1)

    def _on_interrupt(self, signum: int, frame: object) -> None:
        if self.processing and self.reason:
            raise Interrupted(self.reason)
