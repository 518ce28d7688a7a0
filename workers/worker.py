"""QueueWorker: the rq worker class that serves queue-service input queues.

Start it with rq's own command:

    QS_SERVICES=services.yaml rq worker -w workers.worker.QueueWorker --url redis://host:6379/0 [service ...]

The positional names are services of the services file (none, or rq's `default`, means all of
them). RQ gives the process its life cycle: registration (`rq info` lists it), heartbeats,
SIGTERM = finish the item in hand then exit, a second SIGTERM = stop now. We replace where
work comes from: items are taken from the services' Redis streams under a renewable lease
(`queue_service.consumer`) instead of RQ's lists, and run in this process, with no fork per
item, because a model is loaded once per process and GPU contexts do not survive fork.
"""

from __future__ import annotations

import contextlib
import faulthandler
import math
import signal
import time
from collections.abc import Callable
from typing import Any, TypeVar

import redis
from rq.exceptions import StopRequested
from rq.job import Job
from rq.queue import Queue
from rq.timeouts import UnixSignalDeathPenalty
from rq.utils import now as rq_now
from rq.worker import SimpleWorker, WorkerStatus

from queue_service.config import ServiceConfig, Settings
from queue_service.consumer import CANCELLED, SINK_FULL, InputConsumer, Outcome, TakenItem
from workers.lease_keeper import SHUTDOWN, Interrupted, LeaseKeeper
from workers.processor import LoadedProcessor, load_processor
from workers.runner import ProcessingTimeout, run_item

T = TypeVar("T")
REDIS_DOWN = (redis.ConnectionError, redis.TimeoutError)

# Longest single wait for new work: bounds how late a lapsed lease of a dead sibling is noticed.
IDLE_POLL_SECONDS = 1.0
# Extra time past queue.max_processing_seconds before the watchdog ends a process stuck in C code.
WATCHDOG_EXTRA_SECONDS = 10.0
# How long a finished item's result is retried while Redis is away, before giving it up to the lease.
FINISH_RETRY_SECONDS = 300.0
# Longest wait between attempts to reach Redis while it is away: how late a worker notices it is back.
REDIS_RETRY_MAX_SECONDS = 5.0
SINK_FULL_WARNING_INTERVAL = 30.0
BROKEN_SERVICE_BACKOFF_SECONDS = 5.0
# rq heartbeats after every job and again before the next (check_for_suspension): three round trips per
# item for a key that lives worker_ttl + 60 s. A plain heartbeat this soon after the last one is skipped.
RQ_HEARTBEAT_MIN_INTERVAL_SECONDS = 5.0


class QueueWorker(SimpleWorker):
    """An rq worker whose work comes from queue-service input queues."""

    def __init__(self, queues: Any, *args: Any, **kwargs: Any) -> None:
        super().__init__(queues, *args, **kwargs)
        settings = Settings()
        services_file = settings.load_services()
        wanted = [q.name for q in self.queues]
        if wanted in ([], ["default"]):
            self.services: list[ServiceConfig] = list(services_file.services)
        else:
            unknown = [name for name in wanted if name not in services_file.by_name]
            if unknown:
                raise ValueError(
                    f"no such service in the services file: {', '.join(unknown)} "
                    f"(known: {', '.join(services_file.by_name)})"
                )
            self.services = [services_file.by_name[name] for name in wanted]
        self._by_name = {service.name: service for service in self.services}
        self.processors: dict[str, LoadedProcessor] = {
            service.name: load_processor(service.processor) for service in self.services
        }
        self.consumer = InputConsumer(self.connection, self.name)
        self._stop_asked_at: float | None = None
        self.keeper = LeaseKeeper(
            self.consumer, self.services, lambda: self._stop_asked_at, settings.shutdown_grace_seconds
        )
        self._next_service = 0
        self._sink_full_warned = 0.0
        self._skip_until: dict[str, float] = {}

    def service(self, name: str) -> ServiceConfig:
        return self._by_name[name]

    # --- life cycle ---------------------------------------------------------------------

    def bootstrap(self, *args: Any, **kwargs: Any) -> None:
        super().bootstrap(*args, **kwargs)
        # Load models once per process, before the first request and before counting as live.
        for name, processor in self.processors.items():
            started = time.monotonic()
            processor.initialize()
            self.log.info("Worker %s: processor of %s ready in %.2fs", self.name, name, time.monotonic() - started)
        self.keeper.install_interrupt_handler()
        self.keeper.start()

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
            self.consumer.leave(self.services)
        with contextlib.suppress(redis.RedisError):
            super().teardown()

    # rq's own bookkeeping must not end the worker while Redis is away: it reconnects instead.
    def heartbeat(self, *args: Any, **kwargs: Any) -> None:
        last = self.last_heartbeat
        recent = last is not None and (rq_now() - last).total_seconds() < RQ_HEARTBEAT_MIN_INTERVAL_SECONDS
        if recent and not args and not kwargs:
            return
        with contextlib.suppress(*REDIS_DOWN):
            super().heartbeat(*args, **kwargs)

    _state_in_redis: str | None = None  # the state this worker last wrote itself; None = unknown

    def set_state(self, state: str, pipeline: Any = None) -> None:
        # Not written again when unchanged: rq sets IDLE before each dequeue, and we after each item.
        if pipeline is None and state == self._state_in_redis:
            self._state = state
            return
        self._state_in_redis = None
        with contextlib.suppress(*REDIS_DOWN):
            super().set_state(state, pipeline)
            if pipeline is None:
                self._state_in_redis = state

    def check_for_suspension(self, burst: bool) -> None:
        with contextlib.suppress(*REDIS_DOWN):
            super().check_for_suspension(burst)

    def run_maintenance_tasks(self) -> None:
        with contextlib.suppress(*REDIS_DOWN):
            super().run_maintenance_tasks()

    # --- taking work --------------------------------------------------------------------

    def dequeue_job_and_maintain_ttl(
        self, timeout: int | None, max_idle_time: int | None = None
    ) -> tuple[Job, Queue] | None:
        self.set_state(WorkerStatus.IDLE)
        self.procline("Listening on " + ",".join(self.queue_names()))
        idle_since = time.monotonic()
        backoff = 1.0
        while True:
            if self._stop_requested:
                raise StopRequested()
            try:
                self.heartbeat()  # throttled by heartbeat() itself
                last = self.consumer.last_indexes(self.services)
                item = self._take_next()
                if item is not None:
                    return self._job_for(item), self._queue_for(item)
                if timeout is None:  # burst mode: nothing left, quit
                    return None
                if max_idle_time is not None and time.monotonic() - idle_since > max_idle_time:
                    return None
                self.consumer.wait_for_new(last, IDLE_POLL_SECONDS)
                backoff = 1.0
            except REDIS_DOWN as exc:
                self.log.error("Worker %s: Redis unreachable (%s), retrying in %.0fs", self.name, exc, backoff)
                self._sleep_unless_stopped(backoff)
                backoff = min(backoff * 2, REDIS_RETRY_MAX_SECONDS)

    def _sleep_unless_stopped(self, seconds: float) -> None:
        deadline = time.monotonic() + seconds
        while not self._stop_requested and time.monotonic() < deadline:
            time.sleep(min(0.1, deadline - time.monotonic()))

    def _take_next(self) -> TakenItem | None:
        """One item, trying services round-robin so that one busy service cannot starve another."""
        count = len(self.services)
        for offset in range(count):
            service = self.services[(self._next_service + offset) % count]
            if self._skip_until.get(service.name, 0.0) > time.monotonic():
                continue
            try:
                taken = self.consumer.take(service)
            except redis.ResponseError as exc:
                # One service's broken keys must not stop the worker serving the others.
                self._skip_until[service.name] = time.monotonic() + BROKEN_SERVICE_BACKOFF_SECONDS
                self.log.error("Worker %s: cannot take from %s: %s", self.name, service.name, exc)
                continue
            if taken == SINK_FULL:
                if time.monotonic() - self._sink_full_warned > SINK_FULL_WARNING_INTERVAL:
                    self._sink_full_warned = time.monotonic()
                    self.log.warning("Worker %s: sink of %s is full; not taking its input", self.name, service.name)
                continue
            if isinstance(taken, TakenItem):
                self._next_service = (self._next_service + offset + 1) % count
                return taken
        return None

    def _job_for(self, item: TakenItem) -> Job:
        # An in-memory job for rq's loop; never saved: the item lives in its stream.
        job = Job.create(run_item, id=item.request_id, connection=self.connection, description=item.service)
        job.meta["item"] = item
        return job

    def _queue_for(self, item: TakenItem) -> Queue:
        return next((q for q in self.queues if q.name == item.service), self.queues[0])

    # --- running one item ---------------------------------------------------------------

    def execute_job(self, job: Job, queue: Queue) -> None:
        item: TakenItem = job.meta["item"]
        self.set_state(WorkerStatus.BUSY)
        self.procline(f"Processing {item.service} #{item.index}")
        self.keeper.hold(item)
        started = time.monotonic()
        try:
            try:
                outcome = self._run_with_limit(item, self.service(item.service))
            except Interrupted as exc:
                self._interrupted(item, exc.reason)
                return
            written = self._with_redis_retry(lambda: self.consumer.finish(item, outcome, time.monotonic() - started))
        except BaseException:
            # Stopped mid-item (cold shutdown): hand the item back so another worker takes it now.
            self._release_quietly(item)
            raise
        finally:
            self.keeper.hold(None)
            self.set_state(WorkerStatus.IDLE)
        if written is None:
            self.log.warning("Worker %s: %s #%d was taken over; result dropped", self.name, item.service, item.index)
        self.log.info(
            "Worker %s: %s #%d request_id=%s status=%d queue_wait=%.3fs processing=%.3fs",
            self.name,
            item.service,
            item.index,
            item.request_id,
            outcome.status,
            item.queue_wait,
            time.monotonic() - started,
        )

    def _run_with_limit(self, item: TakenItem, service: ServiceConfig) -> Outcome:
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
            message = f"processing took longer than queue.max_processing_seconds={limit:g}"
            return Outcome(body=message.encode(), status=408, content_type="text/plain; charset=utf-8", message=message)
        finally:
            # No interrupt comes once `processing` is off; then both timers are disarmed here, even
            # when an interrupt (a cancel, the grace period) cut the death penalty's own exit short:
            # a stray SIGALRM would end the worker's loop, a stray watchdog the process.
            self.keeper.processing = False
            signal.alarm(0)
            faulthandler.cancel_dump_traceback_later()

    def _interrupted(self, item: TakenItem, reason: str) -> None:
        if reason == CANCELLED:
            message = "cancelled: the item was deleted from the input queue while it ran"
            outcome = Outcome(message.encode(), 499, "text/plain; charset=utf-8", message)
            self._with_redis_retry(lambda: self.consumer.finish(item, outcome, held=False))
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

    def _with_redis_retry(self, call: Callable[[], T]) -> T:
        """Retry while Redis is away (a restart): the result is not thrown away for a blip."""
        deadline = time.monotonic() + FINISH_RETRY_SECONDS
        backoff = 0.2
        while True:
            try:
                return call()
            except REDIS_DOWN as exc:
                if time.monotonic() > deadline:
                    raise
                self.log.error("Worker %s: Redis unreachable (%s) while finishing; retrying", self.name, exc)
                time.sleep(backoff)
                backoff = min(backoff * 2, 5.0)

    def _release_quietly(self, item: TakenItem) -> None:
        with contextlib.suppress(redis.RedisError):
            self.consumer.release(item)
