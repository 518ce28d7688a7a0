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
import logging
import math
import threading
import time
from typing import Any

import redis
from rq.exceptions import StopRequested
from rq.job import Job
from rq.queue import Queue
from rq.timeouts import UnixSignalDeathPenalty
from rq.worker import SimpleWorker, WorkerStatus

from queue_service.config import ServiceConfig, Settings
from queue_service.consumer import SINK_FULL, InputConsumer, Outcome, TakenItem
from workers.processor import LoadedProcessor, load_processor
from workers.runner import ProcessingTimeout, run_item

# Longest single wait for new work: bounds how late a lapsed lease of a dead sibling is noticed.
IDLE_POLL_SECONDS = 1.0
# A worker counts as live this long after its last heartbeat (sync requests get 503 without one).
LIVENESS_TTL_SECONDS = 5.0
HEARTBEAT_INTERVAL_SECONDS = 1.0


class LeaseKeeper(threading.Thread):
    """Background heartbeat of the worker and renewal of the lease on the item in hand.

    A thread, so that a processor busy for an hour keeps its lease; if the whole process
    stops (killed, or stuck in C code holding the GIL), renewals stop and the item lapses.
    """

    def __init__(self, worker: QueueWorker) -> None:
        super().__init__(name="lease-keeper", daemon=True)
        self.worker = worker
        self.stopping = threading.Event()
        self.item: TakenItem | None = None
        self.lost = threading.Event()

    def hold(self, item: TakenItem | None) -> None:
        self.item = item
        self.lost.clear()

    def run(self) -> None:
        consumer = self.worker.consumer
        last_renew = 0.0
        while not self.stopping.wait(HEARTBEAT_INTERVAL_SECONDS):
            try:
                consumer.heartbeat(self.worker.services, LIVENESS_TTL_SECONDS)
                item = self.item
                if item is None:
                    continue
                lease = self.worker.service(item.service).queue.lease_seconds
                if time.monotonic() - last_renew >= lease / 3 and item is self.item:
                    last_renew = time.monotonic()
                    if not consumer.renew(item):
                        self.lost.set()
            except redis.RedisError as exc:  # Redis away: the main loop reports it; keep trying
                logging.getLogger("rq.worker").debug("lease keeper: %s", exc)


class QueueWorker(SimpleWorker):
    """An rq worker whose work comes from queue-service input queues."""

    def __init__(self, queues: Any, *args: Any, **kwargs: Any) -> None:
        super().__init__(queues, *args, **kwargs)
        services_file = Settings().load_services()
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
        self.keeper = LeaseKeeper(self)
        self._next_service = 0

    def service(self, name: str) -> ServiceConfig:
        return self._by_name[name]

    def bootstrap(self, *args: Any, **kwargs: Any) -> None:
        super().bootstrap(*args, **kwargs)
        # Load models once per process, before the first request and before counting as live.
        for name, processor in self.processors.items():
            started = time.monotonic()
            processor.initialize()
            self.log.info("Worker %s: processor of %s ready in %.2fs", self.name, name, time.monotonic() - started)
        self.keeper.start()

    def teardown(self) -> None:
        self.keeper.stopping.set()
        with contextlib.suppress(redis.RedisError):
            self.consumer.leave(self.services)
        super().teardown()

    def dequeue_job_and_maintain_ttl(
        self, timeout: int | None, max_idle_time: int | None = None
    ) -> tuple[Job, Queue] | None:
        self.set_state(WorkerStatus.IDLE)
        self.procline("Listening on " + ",".join(self.queue_names()))
        idle_since = time.monotonic()
        backoff = 1.0
        last_rq_heartbeat = 0.0
        while True:
            if self._stop_requested:
                raise StopRequested()
            try:
                if time.monotonic() - last_rq_heartbeat > 10:
                    self.heartbeat()
                    last_rq_heartbeat = time.monotonic()
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
            except (redis.ConnectionError, redis.TimeoutError) as exc:
                self.log.error("Worker %s: Redis unreachable (%s), retrying in %.0fs", self.name, exc, backoff)
                time.sleep(backoff)
                backoff = min(backoff * 2, 30.0)

    def _take_next(self) -> TakenItem | None:
        """One item, trying services round-robin so that one busy service cannot starve another."""
        count = len(self.services)
        for offset in range(count):
            service = self.services[(self._next_service + offset) % count]
            taken = self.consumer.take(service)
            if taken == SINK_FULL:
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
        return next(q for q in self.queues if q.name == item.service) if len(self.queues) > 1 else self.queues[0]

    def execute_job(self, job: Job, queue: Queue) -> None:
        item: TakenItem = job.meta["item"]
        service = self.service(item.service)
        self.set_state(WorkerStatus.BUSY)
        self.procline(f"Processing {item.service} #{item.index}")
        self.keeper.hold(item)
        started = time.monotonic()
        try:
            outcome = self._run_with_limit(item, service)
            written = self.consumer.finish(item, outcome, time.monotonic() - started)
        except BaseException:
            # Stopped mid-item (cold shutdown): hand the item back so another worker takes it now.
            self._release_quietly(item)
            raise
        finally:
            self.keeper.hold(None)
        elapsed = time.monotonic() - started
        if written is None:
            self.log.warning(
                "Worker %s: %s #%d was cancelled or taken over; result dropped",
                self.name,
                item.service,
                item.index,
            )
        self.log.info(
            "Worker %s: %s #%d request_id=%s status=%d queue_wait=%.3fs processing=%.3fs",
            self.name,
            item.service,
            item.index,
            item.request_id,
            outcome.status,
            item.queue_wait,
            elapsed,
        )
        self.set_state(WorkerStatus.IDLE)

    def _run_with_limit(self, item: TakenItem, service: ServiceConfig) -> Outcome:
        processor = self.processors[item.service]
        limit = service.queue.max_processing_seconds
        if not limit:
            return run_item(processor, item)
        try:
            with UnixSignalDeathPenalty(math.ceil(limit), ProcessingTimeout):
                return run_item(processor, item)
        except ProcessingTimeout:
            message = f"processing took longer than queue.max_processing_seconds={limit:g}"
            return Outcome(body=message.encode(), status=408, content_type="text/plain; charset=utf-8", message=message)

    def _release_quietly(self, item: TakenItem) -> None:
        with contextlib.suppress(redis.RedisError):
            self.consumer.release(item)
