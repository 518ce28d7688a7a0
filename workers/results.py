"""Publisher: writes what became of the items a worker ran, many at once in one round trip.

Each item ends one way: its outcome is written (to its sink entry, or to the reply stream of a sync
request) and the input item removed; or, cancelled while it ran, the sink says so (499); or, handed over
to another worker after its lease lapsed, nothing is written (that worker answers); or, caught by the end
of a stop's grace period, it is released for another worker to take at once. A batch, or the requests a
process holds at once that end together, are written in one pipeline: one round trip for all of them.
Results may also be deferred (`defer`): a worker running a chain of very short items writes their results
together with the chain's last one; every later publish writes what was deferred first.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import redis

from queue_service.store import connection
from queue_service.store.consumer import Finish, TakeRules, WorkerStore
from queue_service.store.model import CANCELLED, HANDED_OVER, Finished, Item, ItemGone, Outcome, StoreError, Taken
from queue_service.timings import TimingCounts
from workers import streaming
from workers.lease_keeper import SHUTDOWN, Held, LeaseKeeper

log = logging.getLogger("rq.worker")

# How long finished items' results are retried while Redis is away, before giving them up to the lease.
FINISH_RETRY_SECONDS = 300.0
CANCELLED_MESSAGE = "cancelled: the item was deleted from the input queue while it ran"


@dataclass(frozen=True, slots=True)
class NextTake:
    """A take to make in the same round trip as a finish (a worker with a backlog): see `Publisher.publish`."""

    service: str
    rules: TakeRules
    want: int
    claim: bool


@dataclass(frozen=True, slots=True)
class Done:
    """One item the processor is done with: its outcome (None: stopped before it had one)."""

    held: Held
    outcome: Outcome | None
    processing_seconds: float = 0.0


class Publisher:
    def __init__(
        self,
        store: WorkerStore,
        keeper: LeaseKeeper,
        timings: TimingCounts,
        worker_name: str,
        on_finished: Callable[[str, Finished], None] = lambda service, finished: None,
        give_up: Callable[[], bool] = lambda: False,
    ) -> None:
        self.store = store
        self.keeper = keeper
        self.timings = timings
        self.worker_name = worker_name
        self.on_finished = on_finished  # what a finish says of the service's queue (nothing waiting...)
        self.give_up = give_up  # a cold stop: results not written yet are left to their leases
        self._lock = threading.Lock()
        self._deferred: list[Done] = []
        self._deferred_since = 0.0

    def publish(self, done: Sequence[Done], then: NextTake | None = None) -> Taken | None:
        """Write every item's end (what was deferred first), then stop keeping their leases. With `then`, the
        next take rides in the finish's round trip: what it took (None when no finish was written, and so no
        take made)."""
        done = [*self._take_deferred(), *done]
        streams = streaming.installed()
        try:
            if streams is not None:  # what they streamed goes before their results
                streams.drain(d.held.item for d in done)
            return self._publish(done, then)
        finally:
            self.keeper.drop(d.held for d in done)
            streaming.forget_all(d.held.item for d in done)

    def defer(self, done: Sequence[Done]) -> None:
        """Keep these results to be written with the next publish (their leases are still kept meanwhile)."""
        with self._lock:
            if not self._deferred:
                self._deferred_since = time.monotonic()
            self._deferred += done

    def deferred_for(self) -> float:
        """How long the oldest deferred result has waited (0: none waits)."""
        with self._lock:
            return time.monotonic() - self._deferred_since if self._deferred else 0.0

    def write_deferred(self) -> None:
        """Write what was deferred, now: before a stop, a wait for work, or when the item behind it runs long."""
        with self._lock:
            waiting = bool(self._deferred)
        if waiting:
            self.publish([])

    def _take_deferred(self) -> list[Done]:
        with self._lock:
            deferred, self._deferred = self._deferred, []
        return deferred

    def release(self, helds: Sequence[Held]) -> None:
        """Hand items back unfinished (a stop): another worker may take them at once."""
        try:
            with contextlib.suppress(redis.RedisError):
                self.store.release_many([h.item for h in helds])
        finally:
            self.keeper.drop(helds)
            streaming.forget_all(h.item for h in helds)

    def _publish(self, done: Sequence[Done], then: NextTake | None = None) -> Taken | None:
        finishes: list[tuple[Done, Finish]] = []
        releases: list[Held] = []
        for d in done:
            reason = d.held.reason
            if reason == HANDED_OVER:
                self._log(d, None, "taken over by another worker; stopped it, result dropped")
            elif reason == CANCELLED:
                finishes.append((d, self._cancelled(d)))
            elif reason == SHUTDOWN or d.outcome is None:
                releases.append(d.held)
                self._log(d, None, "grace period over; handed back")
            else:
                finishes.append((d, Finish(d.held.item, d.outcome, d.processing_seconds)))
        if releases:
            with contextlib.suppress(redis.RedisError):
                self.store.release_many([h.item for h in releases])
        gone, taken = self._write(finishes, then)
        # Removed while it ran, and finished before the keeper saw it: the request was cancelled.
        if gone:
            self._write([(d, self._cancelled(d)) for d in gone])
        return taken

    def _cancelled(self, d: Done) -> Finish:
        return Finish(d.held.item, Outcome.failure(499, CANCELLED_MESSAGE), d.processing_seconds, held=False)

    def _write(
        self, finishes: Sequence[tuple[Done, Finish]], then: NextTake | None = None
    ) -> tuple[list[Done], Taken | None]:
        """Write in one round trip (with `then`'s take, if any); the items found gone while their lease was ours
        (to be told cancelled), and what the take took."""
        if not finishes:
            return [], None
        ends = [f for _, f in finishes]
        taken: Taken | None = None
        if then is None:
            answers = self._with_redis_retry(lambda: self.store.finish_many(ends))
        else:
            answers, taken = self._with_redis_retry(
                lambda: self.store.finish_then_take(ends, then.service, then.rules, want=then.want, claim=then.claim)
            )
        gone: list[Done] = []
        ended: list[tuple[Item, Outcome]] = []  # written: their streams (if any) get their done entry
        for (d, finish), answer in zip(finishes, answers, strict=True):
            item = d.held.item
            if isinstance(answer, StoreError):
                if isinstance(answer, ItemGone) and finish.held and d.held.lease_was_ours_when_gone():
                    gone.append(d)
                else:
                    self._log(d, finish.outcome, "result dropped: another worker took the item over")
                continue
            ended.append((item, finish.outcome))
            if finish.held:
                self.on_finished(item.service, answer)
            if finish.outcome.status == 499 and not finish.held:
                self._log(d, finish.outcome, "cancelled")
                continue
            self.timings.add(item.service, item.queue_wait, d.processing_seconds, time.time() - item.put_ms / 1000)
            self._log(d, finish.outcome, "")
        streams = streaming.installed()
        if ended and streams is not None:
            streams.end(ended)
        return gone, taken

    def _log(self, d: Done, outcome: Outcome | None, note: str) -> None:
        item = d.held.item
        status = f" status={outcome.status}" if outcome is not None else ""
        log.info(
            "Worker %s: %s #%d request_id=%s%s queue_wait=%.3fs processing=%.3fs%s",
            self.worker_name,
            item.service,
            item.index,
            item.request_id,
            status,
            item.queue_wait,
            d.processing_seconds,
            f" ({note})" if note else "",
        )

    def _with_redis_retry(self, call: Callable[[], Any]) -> Any:
        """Retry while Redis is away (a restart): results are not thrown away for a blip."""

        def log_outage(state: Any) -> None:
            log.error(
                "Worker %s: Redis unreachable (%s) while finishing; retrying",
                self.worker_name,
                state.outcome.exception(),
            )

        return connection.riding_outages(call, FINISH_RETRY_SECONDS, log_outage, give_up=self.give_up)
