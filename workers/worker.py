"""QueueWorker: the rq worker class that serves queue-service input queues.

Start it with rq's own command:

    QS_SERVICES=services.yaml QS_REDIS_URL=redis://host:6379/0 rq worker -w workers.worker.QueueWorker [service ...]

The positional names are services of the services file (none, or rq's `default`, means all of them).
`QS_REDIS_URL`, when set, is the Redis of everything the worker does (rq's own bookkeeping included), so one
setting names it for the API and the workers; else rq's `--url` is. RQ gives the process its life cycle:
registration (`rq info` lists it), SIGTERM = finish the item in hand then exit, a second SIGTERM = stop now.
We replace where work comes from: items are taken from the services' Redis streams under a renewable lease
(`queue_service.store.consumer`) instead of RQ's lists, and run in this process, with no fork per item,
because a model is loaded once per process and GPU contexts do not survive fork.

A SIGTERM while the processors load (imports, `initialize()`) stops the loading and exits 0 at once: rq
installs its handlers only after bootstrap, and a process with no handler, as PID 1 in a container, would
ignore the signal until it is killed. A processor that cannot load is one line on stderr and exit 78.
"""

from __future__ import annotations

import contextlib
import faulthandler
import math
import signal
import sys
import time
from typing import Any

import redis
from rq.exceptions import StopRequested
from rq.job import Job
from rq.queue import Queue
from rq.timeouts import UnixSignalDeathPenalty
from rq.utils import now as rq_now
from rq.worker import SimpleWorker, WorkerStatus

from queue_service.config import ConfigError, ServiceConfig, Settings, durability
from queue_service.store import connection
from queue_service.store.connection import REDIS_DOWN
from queue_service.store.consumer import TakeRules, WorkerStore
from queue_service.store.model import CANCELLED, Item, ItemGone, NotHolder, Outcome
from queue_service.timings import TimingCounts
from workers.lease_keeper import SHUTDOWN, Interrupted, LeaseKeeper
from workers.processor import LoadedProcessor, ProcessorLoadError, load_processor
from workers.runner import ProcessingTimeout, given_up, run_item

# Exit code of a worker whose services file or processor cannot be used (sysexits' EX_CONFIG).
EXIT_CONFIG = 78
# Longest single wait for new work: bounds how late a stop is noticed by an idle worker.
IDLE_POLL_SECONDS = 1.0
# How often a worker also takes items whose lease lapsed (their holder died); at most a quarter lease.
CLAIM_INTERVAL_SECONDS = 1.0
# Extra time past queue.max_processing_seconds before the watchdog ends a process stuck in C code.
WATCHDOG_EXTRA_SECONDS = 10.0
# How long a finished item's result is retried while Redis is away, before giving it up to the lease.
FINISH_RETRY_SECONDS = 300.0
SINK_FULL_WARNING_INTERVAL = 30.0
BROKEN_SERVICE_BACKOFF_SECONDS = 5.0
# rq heartbeats after every job and again before the next: round trips per item for a key that lives
# worker_ttl + 60 s. A plain heartbeat this soon after the last one is skipped; rq's suspension check
# (a round trip each loop) runs at most this often.
RQ_HEARTBEAT_MIN_INTERVAL_SECONDS = 5.0
SUSPENSION_CHECK_SECONDS = 1.0
# rq's state IDLE is written once the worker has had nothing to do this long: a worker that is busy most of
# the time writes no state per item (`rq info` shows it busy up to this long after it went idle).
IDLE_STATE_AFTER_SECONDS = 1.0


class StartupStopped(BaseException):
    """SIGTERM or SIGINT arrived while the worker was still loading: stop loading, exit 0."""


def _stop_loading(signum: int, frame: object) -> None:
    raise StartupStopped()


def _fail_start(message: str) -> None:
    print(f"error: {message}", file=sys.stderr, flush=True)
    raise SystemExit(EXIT_CONFIG)


def take_rules(service: ServiceConfig) -> TakeRules:
    return TakeRules(
        lease_ms=int(service.queue.lease_seconds * 1000),
        max_delivery=service.queue.max_delivery,
        sink_max_items=service.queue.sink.max_length,
        sink_max_bytes=service.queue.sink.max_bytes,
    )


class QueueWorker(SimpleWorker):
    """An rq worker whose work comes from queue-service input queues."""

    def __init__(self, queues: Any, *args: Any, **kwargs: Any) -> None:
        signal.signal(signal.SIGTERM, _stop_loading)
        signal.signal(signal.SIGINT, _stop_loading)
        try:
            settings = Settings()
            services_file = settings.load_services()
        except ConfigError as exc:
            _fail_start(str(exc))
        if "redis_url" in settings.model_fields_set:
            kwargs["connection"] = connection.worker_client(settings.redis_url)
        elif kwargs.get("connection") is not None:
            kwargs["connection"] = connection.worker_client_like(kwargs["connection"])
        super().__init__(queues, *args, **kwargs)
        wanted = [q.name for q in self.queues]
        if wanted in ([], ["default"]):
            self.services: list[ServiceConfig] = list(services_file.services)
        else:
            unknown = [name for name in wanted if name not in services_file.by_name]
            if unknown:
                _fail_start(
                    f"no such service in the services file: {', '.join(unknown)} "
                    f"(known: {', '.join(services_file.by_name)})"
                )
            self.services = [services_file.by_name[name] for name in wanted]
        self._by_name = {service.name: service for service in self.services}
        self._rules = {service.name: take_rules(service) for service in self.services}
        self.processors: dict[str, LoadedProcessor] = {}
        for service in self.services:
            try:
                self.processors[service.name] = load_processor(service.processor)
            except ProcessorLoadError as exc:
                _fail_start(f"service {service.name!r}: {exc}")
        self.store = WorkerStore(self.connection, self.name, durability(self.services))
        self.timings = TimingCounts()
        self._stop_asked_at: float | None = None
        self.keeper = LeaseKeeper(
            self.store, self.services, lambda: self._stop_asked_at, settings.shutdown_grace_seconds, self.timings
        )
        self._next_service = 0
        self._next_claim = dict.fromkeys(self._by_name, 0.0)
        # A service whose last finish saw nothing waiting: its last index, to wait after without a take.
        self._known_empty: dict[str, int] = {}
        self._last_item_at = 0.0
        self._sink_full_warned = 0.0
        self._skip_until: dict[str, float] = {}
        self._last_suspension_check = 0.0

    def service(self, name: str) -> ServiceConfig:
        return self._by_name[name]

    # --- life cycle ---------------------------------------------------------------------

    def bootstrap(self, *args: Any, **kwargs: Any) -> None:
        try:
            super().bootstrap(*args, **kwargs)
            # Load models once per process, before the first request and before counting as live.
            for name, processor in self.processors.items():
                started = time.monotonic()
                try:
                    processor.initialize()
                except Exception as exc:
                    self._teardown_quietly()
                    _fail_start(f"service {name!r}: processor {processor.path!r} failed to initialize: {exc!r}")
                self.log.info("Worker %s: processor of %s ready in %.2fs", self.name, name, time.monotonic() - started)
        except StartupStopped:
            self.log.info("Worker %s: stopped while loading; exiting", self.name)
            self._teardown_quietly()
            raise SystemExit(0) from None
        self.keeper.install_interrupt_handler()
        self.keeper.start()

    def _teardown_quietly(self) -> None:
        with contextlib.suppress(Exception):
            super().teardown()

    def request_stop(self, signum: Any, frame: Any) -> None:
        # Warm stop: finish the item in hand, within the grace period (the keeper enforces it).
        if self._stop_asked_at is None:
            self._stop_asked_at = time.monotonic()
        super().request_stop(signum, frame)

    def _shutdown(self) -> None:
        # rq raises StopRequested from the signal handler when the worker is idle, wherever the main
        # thread is: in the middle of take.lua that leaves an item taken and never released (it then
        # waits out a whole lease, one delivery spent). The wait for work looks at the flag every second.
        self._stop_requested = True
        with contextlib.suppress(*REDIS_DOWN):
            self.set_shutdown_requested_date()

    def teardown(self) -> None:
        self.keeper.stopping.set()
        with contextlib.suppress(redis.RedisError):
            self.keeper.flush()
        with contextlib.suppress(redis.RedisError):
            self.store.leave(self._by_name)
        with contextlib.suppress(redis.RedisError):
            super().teardown()

    # rq's own bookkeeping must not end the worker while Redis is away, nor cost round trips per item.
    def heartbeat(self, *args: Any, **kwargs: Any) -> None:
        last = self.last_heartbeat
        recent = last is not None and (rq_now() - last).total_seconds() < RQ_HEARTBEAT_MIN_INTERVAL_SECONDS
        if recent and not args and not kwargs:
            return
        with contextlib.suppress(*REDIS_DOWN):
            super().heartbeat(*args, **kwargs)

    _state_in_redis: str | None = None  # the state this worker last wrote itself; None = unknown

    def set_state(self, state: str, pipeline: Any = None) -> None:
        # Written only when it changes: under a steady load the worker stays BUSY and writes nothing per item
        # (IDLE is written once it has been idle a while, see `_write_idle`).
        if pipeline is None and state == self._state_in_redis:
            self._state = state
            return
        if pipeline is None and state == WorkerStatus.IDLE and self._state_in_redis == WorkerStatus.BUSY:
            self._state = state
            return
        self._state_in_redis = None
        with contextlib.suppress(*REDIS_DOWN):
            super().set_state(state, pipeline)
            if pipeline is None:
                self._state_in_redis = state

    def _write_idle(self) -> None:
        busy = self._state_in_redis == WorkerStatus.BUSY
        if busy and time.monotonic() - self._last_item_at < IDLE_STATE_AFTER_SECONDS:
            return
        if self._state_in_redis != WorkerStatus.IDLE:
            self._state_in_redis = None
            with contextlib.suppress(*REDIS_DOWN):
                super().set_state(WorkerStatus.IDLE)
                self._state_in_redis = WorkerStatus.IDLE

    def check_for_suspension(self, burst: bool) -> None:
        if time.monotonic() - self._last_suspension_check < SUSPENSION_CHECK_SECONDS:
            return
        self._last_suspension_check = time.monotonic()
        with contextlib.suppress(*REDIS_DOWN):
            super().check_for_suspension(burst)

    def run_maintenance_tasks(self) -> None:
        with contextlib.suppress(*REDIS_DOWN):
            super().run_maintenance_tasks()

    # --- taking work --------------------------------------------------------------------

    def dequeue_job_and_maintain_ttl(
        self, timeout: int | None, max_idle_time: int | None = None
    ) -> tuple[Job, Queue] | None:
        self.procline("Listening on " + ",".join(self.queue_names()))
        idle_since = time.monotonic()

        def log_outage(state: Any) -> None:
            self.log.error("Worker %s: Redis unreachable (%s); retrying", self.name, state.outcome.exception())

        # rq's loop quits on any error: Redis being away is waited out here (until a stop is asked).
        try:
            for attempt in connection.outage_retry(math.inf, log_outage, give_up=lambda: self._stop_requested):
                with attempt:
                    return self._next_job(timeout, max_idle_time, idle_since)
        except REDIS_DOWN:
            pass
        raise StopRequested()

    def _next_job(self, timeout: int | None, max_idle_time: int | None, idle_since: float) -> tuple[Job, Queue] | None:
        while True:
            if self._stop_requested:
                raise StopRequested()
            self.heartbeat()  # throttled by heartbeat() itself
            item, last = self._take_next()
            if item is not None:
                return self._job_for(item), self._queue_for(item)
            if timeout is None:  # burst mode: nothing left, quit
                return None
            if max_idle_time is not None and time.monotonic() - idle_since > max_idle_time:
                return None
            self._write_idle()
            self.store.wait_for_new(last, IDLE_POLL_SECONDS)

    def _take_next(self) -> tuple[Item | None, dict[str, int]]:
        """One item, trying services round-robin so that one busy service cannot starve another; else the
        last index of each service, to wait for what comes after it."""
        count = len(self.services)
        last: dict[str, int] = {}
        for offset in range(count):
            service = self.services[(self._next_service + offset) % count]
            now = time.monotonic()
            if self._skip_until.get(service.name, 0.0) > now:
                continue
            claim = now >= self._next_claim[service.name]
            if claim:
                self._next_claim[service.name] = now + min(CLAIM_INTERVAL_SECONDS, service.queue.lease_seconds / 4)
            elif service.name in self._known_empty:
                # The last finish saw nothing waiting: wait after its last index (an item put since wakes us).
                last[service.name] = self._known_empty.pop(service.name)
                continue
            try:
                taken = self.store.take(service.name, self._rules[service.name], claim=claim)
            except redis.ResponseError as exc:
                # One service's broken keys must not stop the worker serving the others.
                self._skip_until[service.name] = time.monotonic() + BROKEN_SERVICE_BACKOFF_SECONDS
                self.log.error("Worker %s: cannot take from %s: %s", self.name, service.name, exc)
                continue
            if taken.items:
                self._next_service = (self._next_service + offset + 1) % count
                return taken.items[0], last
            last[service.name] = taken.last_index
            if taken.sink_full and time.monotonic() - self._sink_full_warned > SINK_FULL_WARNING_INTERVAL:
                self._sink_full_warned = time.monotonic()
                self.log.warning("Worker %s: sink of %s is full; not taking its input", self.name, service.name)
        return None, last

    def _job_for(self, item: Item) -> Job:
        # An in-memory job for rq's loop; never saved: the item lives in its stream.
        job = Job.create(run_item, id=item.request_id, connection=self.connection, description=item.service)
        job.meta["item"] = item
        return job

    def _queue_for(self, item: Item) -> Queue:
        return next((q for q in self.queues if q.name == item.service), self.queues[0])

    # --- running one item ---------------------------------------------------------------

    def execute_job(self, job: Job, queue: Queue) -> None:
        item: Item = job.meta["item"]
        self.set_state(WorkerStatus.BUSY)
        self.procline(f"Processing {item.service} #{item.index}")
        self.keeper.hold(item)
        started = time.monotonic()
        try:
            if item.exhausted:
                outcome = given_up(item)
            else:
                try:
                    outcome = self._run_with_limit(item, self.service(item.service))
                except Interrupted as exc:
                    self._interrupted(item, exc.reason)
                    return
            processing = time.monotonic() - started
            written = self._publish(item, outcome, processing)
        except BaseException:
            # Stopped mid-item (cold shutdown): hand the item back so another worker takes it now.
            self._release_quietly(item)
            raise
        finally:
            self.keeper.hold(None)
        if written:
            self.timings.add(item.service, item.queue_wait, processing, time.time() - item.put_ms / 1000)
        self.log.info(
            "Worker %s: %s #%d request_id=%s status=%d queue_wait=%.3fs processing=%.3fs%s",
            self.name,
            item.service,
            item.index,
            item.request_id,
            outcome.status,
            item.queue_wait,
            processing,
            "" if written else " (result dropped: another worker took the item over)",
        )

    def _publish(self, item: Item, outcome: Outcome, processing: float) -> bool:
        """Write the outcome; False when the item was no longer ours (its lease lapsed and another took it)."""
        self._last_item_at = time.monotonic()
        try:
            finished = self._with_redis_retry(lambda: self.store.finish(item, outcome, processing))
            if finished.waiting <= 0:
                self._known_empty[item.service] = finished.last_index
        except ItemGone:
            if not self.keeper.lease_was_ours_when_gone(item):
                return False
            # Removed while it ran and finished before the keeper saw it: the request was cancelled.
            self._finish_cancelled(item)
        except NotHolder:
            return False
        return True

    def _run_with_limit(self, item: Item, service: ServiceConfig) -> Outcome:
        processor = self.processors[item.service]
        limit = service.queue.max_processing_seconds
        self.keeper.processing = True
        try:
            if not limit:
                return run_item(processor, item)
            # SIGALRM stops Python code at the limit; the faulthandler watchdog (a C thread that
            # needs no GIL) ends the process if the processor is stuck in C code, so that the
            # supervisor replaces it and the lease hands the item to another worker.
            faulthandler.dump_traceback_later(limit + WATCHDOG_EXTRA_SECONDS, exit=True)
            with UnixSignalDeathPenalty(math.ceil(limit), ProcessingTimeout):
                return run_item(processor, item)
        except ProcessingTimeout:
            return Outcome.failure(408, f"processing took longer than queue.max_processing_seconds={limit:g}")
        finally:
            # No interrupt comes once `processing` is off; then both timers are disarmed here, even
            # when an interrupt (a cancel, the grace period) cut the death penalty's own exit short:
            # a stray SIGALRM would end the worker's loop, a stray watchdog the process.
            self.keeper.processing = False
            signal.alarm(0)
            faulthandler.cancel_dump_traceback_later()

    def _finish_cancelled(self, item: Item) -> None:
        outcome = Outcome.failure(499, "cancelled: the item was deleted from the input queue while it ran")
        self._with_redis_retry(lambda: self.store.finish(item, outcome, held=False))

    def _interrupted(self, item: Item, reason: str) -> None:
        if reason == CANCELLED:
            self._finish_cancelled(item)
            self.log.info(
                "Worker %s: %s #%d request_id=%s cancelled", self.name, item.service, item.index, item.request_id
            )
        elif reason == SHUTDOWN:
            self._release_quietly(item)
            self.log.warning("Worker %s: grace period over; %s #%d handed back", self.name, item.service, item.index)
            raise StopRequested()
        else:
            self.log.warning(
                "Worker %s: %s #%d was taken over by another worker; stopped it", self.name, item.service, item.index
            )

    def _with_redis_retry(self, call: Any) -> Any:
        """Retry while Redis is away (a restart): the result is not thrown away for a blip."""

        def log_outage(state: Any) -> None:
            self.log.error(
                "Worker %s: Redis unreachable (%s) while finishing; retrying", self.name, state.outcome.exception()
            )

        return connection.outage_retry(FINISH_RETRY_SECONDS, log_outage)(call)

    def _release_quietly(self, item: Item) -> None:
        with contextlib.suppress(redis.RedisError):
            self.store.release(item)
