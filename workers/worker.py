"""QueueWorker: the rq worker class that serves queue-service input queues.

Start it with rq's own command:

    QS_SERVICES=services.yaml QS_REDIS_URL=redis://host:6379/0 rq worker -w workers.worker.QueueWorker [service ...]

The positional names are services of the services file (none, or rq's `default`, means all of them).
`QS_REDIS_URL`, when set, is the Redis of everything the worker does (rq's own bookkeeping included), so one
setting names it for the API and the workers; else rq's `--url` is. RQ gives the process its life cycle:
registration (`rq info` lists it), SIGTERM = finish the item in hand then exit, a second SIGTERM = stop now.
We replace where work comes from: items are taken from the services' Redis streams under a renewable lease
(`queue_service.store.consumer`) instead of RQ's lists, and run in this process, with no fork per item,
because a model is loaded once per process and GPU contexts do not survive fork. One "job" of rq's loop is
one unit of work: one item, a batch (`metadata.rpc.batching`), or the items handed to the requests this
process holds at once (`workers/plan.py` says which; `workers/inflight.py` runs the last kind). How many
requests one process holds for a processor that can (async, an upstream, `thread_safe = True`): the
environment variable `QS_WORKER_THREADS`, else each service's `metadata.rpc.worker_threads`.

A SIGTERM while the processors load (imports, `initialize()`) stops the loading and exits 0 at once: rq
installs its handlers only after bootstrap, and a process with no handler, as PID 1 in a container, would
ignore the signal until it is killed. A processor that cannot load is one line on stderr and exit 78.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import signal
import sys
import time
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import redis
from rq.exceptions import StopRequested
from rq.job import Job
from rq.queue import Queue
from rq.suspension import is_suspended
from rq.timeouts import UnixSignalDeathPenalty
from rq.utils import now as rq_now
from rq.worker import SimpleWorker, WorkerStatus

from queue_service.config import ConfigError, ServiceConfig, Settings, durability
from queue_service.faults import checkpoint
from queue_service.store import connection
from queue_service.store.connection import REDIS_DOWN
from queue_service.store.consumer import TakeRules, WorkerStore
from queue_service.store.durability import refuse_on_a_cluster
from queue_service.store.model import Finished, Item, Outcome, Taken
from queue_service.timings import TimingCounts
from workers.inflight import InFlight
from workers.lease_keeper import SHUTDOWN, Held, Interrupted, LeaseKeeper
from workers.plan import ServicePlan, plan_service
from workers.processor import ProcessorLoadError
from workers.results import Done, NextTake, Publisher
from workers.runner import ProcessingTimeout, expired, given_up, run_batch, run_item
from workers.streaming import StreamWriter, install
from workers.watchdog import Watchdog

# Exit code of a worker whose services file or processor cannot be used (sysexits' EX_CONFIG).
EXIT_CONFIG = 78
# Longest single wait for new work: bounds how late a stop is noticed by an idle worker.
IDLE_POLL_SECONDS = 1.0
# How long teardown waits for the command channel's thread to end once it is unsubscribed.
PUBSUB_STOP_SECONDS = 1.0
# How often a worker also takes items whose lease lapsed (their holder died); at most a quarter lease.
CLAIM_INTERVAL_SECONDS = 1.0
# How soon a worker whose concurrent slots are all taken looks again for work of its other services.
FULL_POLL_SECONDS = 0.05
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
# On a cluster, how soon the command channel is subscribed again once its node is gone.
PUBSUB_RESUBSCRIBE_SECONDS = 1.0
# A one-at-a-time worker keeps one item in reserve and writes results behind the next item's run only when
# its last item ran between these (below, an item ends before the round trip would, so little is hidden
# behind it while the handoff to the finisher thread is paid in full; above, the round trip is noise beside the
# run) and at least this many items waited at its last finish (one to run, one left for the other workers).
PREFETCH_MIN_RUN_SECONDS = 0.001
PREFETCH_MAX_RUN_SECONDS = 0.5
PREFETCH_MIN_WAITING = 2
# Below PREFETCH_MIN_RUN_SECONDS, with a backlog, a worker takes a chain of items in one round trip (at most
# CHAIN_MAX_ITEMS, and half of what waits: the other workers get the rest), runs them one after another and
# writes their results together with the next take: one round trip per chain instead of one per item, which
# is most of the CPU a no-op item costs the worker and Redis (docs/benchmarks.md). A result waits at most
# the chain's few milliseconds; one that waits DEFERRED_MAX_WAIT_SECONDS (an item behind it runs long) is
# written by the finisher thread at the lease keeper's next tick.
CHAIN_MAX_ITEMS = 4
CHAIN_MIN_WAITING = 4
DEFERRED_MAX_WAIT_SECONDS = 0.1


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
        self.plans: dict[str, ServicePlan] = {}
        for service in self.services:
            try:
                self.plans[service.name] = plan_service(service, settings.worker_threads)
            except ProcessorLoadError as exc:
                _fail_start(f"service {service.name!r}: {exc}")
        self.processors = {name: plan.processor for name, plan in self.plans.items()}
        try:
            refuse_on_a_cluster(self.connection, durability(self.services))
        except ValueError as exc:
            _fail_start(str(exc))
        self.store = WorkerStore(
            self.connection,
            self.name,
            durability=durability(self.services),
            webhook_inline_bytes={s.name: s.webhook.max_result_bytes for s in self.services if s.webhook is not None},
            lease_seconds={s.name: s.queue.lease_seconds for s in self.services},
        )
        self.timings = TimingCounts()
        # What running requests stream (generator processors, progress) goes to Redis from one thread.
        install(StreamWriter(self.store, self.services, settings.stream_flush_ms, settings.stream_flush_chunks))
        self._stop_asked_at: float | None = None
        self._cold_stop = False
        self.keeper = LeaseKeeper(
            self.store,
            self.services,
            lambda: self._stop_asked_at,
            settings.shutdown_grace_seconds,
            self.timings,
            live=lambda name: self.processors[name].healthy(),
        )
        self.keeper.each_tick = self._write_late_results
        self.watchdog = Watchdog()
        self.publisher = Publisher(
            self.store, self.keeper, self.timings, self.name, self._finished, give_up=lambda: self._cold_stop
        )
        self.inflight = InFlight(
            self.keeper,
            self.publisher,
            self.watchdog,
            {name: plan.capacity for name, plan in self.plans.items() if plan.mode == "concurrent"},
            {service.name: service.queue.max_processing_seconds for service in self.services},
        )
        self._next_service = 0
        self._next_claim = dict.fromkeys(self._by_name, 0.0)
        # Services whose last finish or take saw nothing waiting: the worker waits for a put without a take.
        self._known_empty: set[str] = set()
        # Items waiting at a service's last finish: with a backlog, the next finish takes the next item in its
        # round trip. What a finish takes goes to the keeper's reserve (held in Redis already: run next, or
        # released at a stop, a suspension, or when it waited too long behind a long item).
        self._waiting: dict[str, int] = {}
        # Prefetch (QS_WORKER_PREFETCH): with a reserve, a result is written by the finisher thread while the
        # next item runs; `_behind` is that write, at most one at a time. The same setting turns chains on.
        self._prefetch = settings.worker_prefetch
        self._finisher = ThreadPoolExecutor(1, thread_name_prefix="finisher")  # its thread starts at first use
        self._behind: Future[None] | None = None
        self._unit_job: Job | None = None
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
                self.log.info("Worker %s: %s runs %s", self.name, name, _describe(self.plans[name]))
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
        # Warm stop: finish the items in hand, within the grace period (the keeper enforces it).
        if self._stop_asked_at is None:
            self._stop_asked_at = time.monotonic()
        super().request_stop(signum, frame)

    def request_force_stop(self, signum: Any, frame: Any) -> None:
        # Cold stop (a second signal): what runs concurrently is handed back at teardown, not waited for.
        self._cold_stop = True
        super().request_force_stop(signum, frame)

    def _shutdown(self) -> None:
        # rq raises StopRequested from the signal handler when the worker is idle, wherever the main
        # thread is: in the middle of take.lua that leaves an item taken and never released (it then
        # waits out a whole lease, one delivery spent). The wait for work looks at the flag every second.
        self._stop_requested = True
        with contextlib.suppress(*REDIS_DOWN):
            self.set_shutdown_requested_date()

    def teardown(self) -> None:
        # Requests held concurrently finish first (the keeper, still running, renews them and ends the
        # grace period); a cold stop hands them back at once.
        try:
            if self._cold_stop:
                self.inflight.stop_now()
            else:
                self.inflight.drain()
        except SystemExit:  # a second signal while they finish: hand them back, then go on stopping
            self.inflight.stop_now()
        except Exception:
            self.log.exception("Worker %s: stopping the requests in flight", self.name)
        try:
            self._release_taken_ahead()  # a result still being written behind is waited for first
        except Exception:
            self.log.exception("Worker %s: writing the last result", self.name)
        self._finisher.shutdown(wait=False)
        self.keeper.stopping.set()
        with contextlib.suppress(redis.RedisError):
            self.keeper.flush()
        with contextlib.suppress(redis.RedisError):
            self.store.leave(self._by_name)
        with contextlib.suppress(redis.RedisError):
            super().teardown()

    # rq's command channel (`rq:pubsub:<name>`, for `rq` commands sent to a worker) on a cluster: the channel's
    # subscription lives on one node; when that node dies (a shard failover), redis-py reconnects to the dead
    # address forever. A new subscription finds the node serving the channel's slot now.
    def _pubsub_exception_handler(self, exc: Exception, pubsub: Any, pubsub_thread: Any) -> None:
        if self._stop_requested:  # teardown closes the channel under the thread: it just ends
            pubsub_thread.stop()
            return
        if not (isinstance(exc, redis.ConnectionError) and connection.is_cluster(self.connection)):
            super()._pubsub_exception_handler(exc, pubsub, pubsub_thread)
            return
        pubsub_thread.stop()  # this thread ends; a new one serves the new subscription
        with contextlib.suppress(Exception):
            pubsub.close()
        while not self._stop_requested:
            time.sleep(PUBSUB_RESUBSCRIBE_SECONDS)
            try:
                super().subscribe()
                self.log.info("Worker %s: command channel subscribed again after %s", self.name, exc)
                return
            except redis.RedisError as again:
                self.log.warning("Worker %s: command channel: %s; retrying", self.name, again)

    def unsubscribe(self) -> None:
        """At teardown. rq unsubscribes, then stops its channel's thread; since redis-py 8.2 that stop waits for
        the thread, and a thread that read the unsubscribe's answer first waits up to rq's 60 s for a new
        subscription (seen: a worker whose processor failed to load took a minute to exit). The thread is
        told to end first, so the answer ends it. A channel whose connection broke (its node gone) has
        nothing left to unsubscribe."""
        thread, pubsub = self.pubsub_thread, self.pubsub
        if thread is None or pubsub is None:
            return
        self.log.info("Worker %s: unsubscribing from channel %s", self.name, self.pubsub_channel_name)
        try:
            _tell_to_end(thread)
            pubsub.unsubscribe()
            thread.join(timeout=PUBSUB_STOP_SECONDS)
        except (redis.RedisError, OSError, ValueError) as exc:
            self.log.info("Worker %s: command channel closed (%s)", self.name, exc)
        finally:
            with contextlib.suppress(Exception):
                pubsub.close()

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
            if (self._behind is not None or self.keeper.has_reserved()) and is_suspended(self.connection, self):
                self._release_taken_ahead()  # not renewed while the worker waits out `rq suspend`
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
            return connection.riding_outages(
                lambda: self._next_job(timeout, max_idle_time, idle_since),
                math.inf,
                log_outage,
                give_up=lambda: self._stop_requested,
            )
        except REDIS_DOWN:
            pass
        raise StopRequested()

    def _next_job(self, timeout: int | None, max_idle_time: int | None, idle_since: float) -> tuple[Job, Queue] | None:
        waited = False
        while True:
            if self._stop_requested:
                self._release_taken_ahead()
                raise StopRequested()
            self.heartbeat()  # throttled by heartbeat() itself
            items, idle, full = self._take_next()
            if items:
                return self._job_for(items, from_idle=waited), self._queue_for(items[0])
            if timeout is None:  # burst mode: nothing left, quit (teardown lets what runs finish)
                return None
            if max_idle_time is not None and time.monotonic() - idle_since > max_idle_time:
                return None
            if not self.inflight.total():
                self._write_idle()
            self._wait(idle, full)
            waited = True
            # rq looks at `rq suspend` between jobs only: an idle worker would take new work while suspended.
            self.check_for_suspension(False)

    def _wait(self, idle: list[str], full: bool) -> None:
        """Until new work may be there: a put in one of the `idle` services, or (`full`) a slot that frees. A
        worker of one one-at-a-time service queues its next take behind the wait: woken, it holds the item
        already (in reserve, so that a stop or a suspension noticed now hands it back)."""
        if idle and not full and len(self.services) == 1 and self.plans[self.services[0].name].mode == "one":
            plan = self.plans[self.services[0].name]
            claim = self._claim_due(plan, time.monotonic())
            taken = self.store.wait_then_take(plan.name, IDLE_POLL_SECONDS, self._rules[plan.name], claim=claim)
            if taken.items:
                self.keeper.reserve(taken.items)
            elif not taken.sink_full:
                self._known_empty.add(plan.name)  # nothing came: wait again without a take
        elif idle:
            self.store.wait_for_work(idle, FULL_POLL_SECONDS if full else IDLE_POLL_SECONDS)
        elif full:
            self.inflight.wait_for_change(IDLE_POLL_SECONDS)
        else:  # nothing may be taken now (an upstream that is down, broken keys): look again soon
            time.sleep(IDLE_POLL_SECONDS)

    def _take_next(self) -> tuple[list[Item], list[str], bool]:
        """Items of one service, trying services round-robin so that one busy service cannot starve another;
        else the services that could take but found nothing (to wait for a put in them), and whether a
        service had no free slot."""
        count = len(self.services)
        idle: list[str] = []
        full = False
        ahead = self._next_reserved()
        if ahead is not None:
            self._next_service = (self._next_service + 1) % count
            return [ahead], idle, full
        self.publisher.write_deferred()  # the chain's rest went back to the queue: its results wait no longer
        for offset in range(count):
            plan = self.plans[self.services[(self._next_service + offset) % count].name]
            name = plan.name
            now = time.monotonic()
            if self._skip_until.get(name, 0.0) > now or not plan.processor.healthy():
                continue
            want = plan.want
            if plan.mode == "concurrent":
                want = min(want, self.inflight.free(name))
                if want <= 0:
                    full = True
                    continue
            claim = self._claim_due(plan, now)
            if not claim and name in self._known_empty:
                # The last finish saw nothing waiting: wait for a put (its bell wakes us) without a take.
                self._known_empty.discard(name)
                idle.append(name)
                continue
            try:
                taken = self.store.take(name, self._rules[name], want=want, claim=claim)
            except REDIS_DOWN:
                raise  # a cluster's TRYAGAIN / CLUSTERDOWN too: waited out like an outage, not a broken service
            except redis.ResponseError as exc:
                # One service's broken keys must not stop the worker serving the others.
                self._skip_until[name] = time.monotonic() + BROKEN_SERVICE_BACKOFF_SECONDS
                self.log.error("Worker %s: cannot take from %s: %s", self.name, name, exc)
                continue
            if taken.items:
                self._next_service = (self._next_service + offset + 1) % count
                return taken.items, idle, full
            idle.append(name)
            if taken.sink_full and time.monotonic() - self._sink_full_warned > SINK_FULL_WARNING_INTERVAL:
                self._sink_full_warned = time.monotonic()
                self.log.warning("Worker %s: sink of %s is full; not taking its input", self.name, name)
        return [], idle, full

    def _claim_due(self, plan: ServicePlan, now: float) -> bool:
        """Whether this take also claims lapsed items (once per CLAIM_INTERVAL_SECONDS, at most a quarter lease)."""
        if now < self._next_claim[plan.name]:
            return False
        self._next_claim[plan.name] = now + min(CLAIM_INTERVAL_SECONDS, plan.service.queue.lease_seconds / 4)
        return True

    def _next_take_after(self, plan: ServicePlan) -> NextTake | None:
        """The take to send with this item's finish: only when the next take would be of the same service
        anyway (round-robin order), the last finish saw a backlog, and nothing asks the worker to stop."""
        if plan.mode != "one" or self._stop_requested or self._waiting.get(plan.name, 0) <= 0:
            return None
        if self.services[self._next_service % len(self.services)].name != plan.name:
            return None
        now = time.monotonic()
        if self._skip_until.get(plan.name, 0.0) > now or not plan.processor.healthy():
            return None
        return NextTake(plan.name, self._rules[plan.name], plan.want, self._claim_due(plan, now))

    def _next_reserved(self) -> Item | None:
        """The next item taken ahead, once the result written behind (which takes it) is in."""
        item = self.keeper.take_reserved()
        if item is None and self._behind is not None:
            self._collect_behind()
            item = self.keeper.take_reserved()
        return item

    def _collect_behind(self) -> None:
        """Wait for the result being written behind the item in hand (a failure to write it surfaces here)."""
        behind, self._behind = self._behind, None
        if behind is not None:
            behind.result()

    def _release_taken_ahead(self) -> None:
        """Items taken ahead that will not run here (a stop, a suspension): another worker takes them at once.
        Results written behind or deferred are written first."""
        try:
            self._collect_behind()
            self.publisher.write_deferred()
        finally:
            with contextlib.suppress(redis.RedisError):
                self.keeper.give_back_reserved()

    def _job_for(self, items: list[Item], *, from_idle: bool) -> Job:
        # An in-memory job for rq's loop, which only hands it to execute_job; never saved: the items live in
        # their stream. One, reused: building a Job per item was ~5 % of a busy worker's CPU (py-spy --gil).
        if self._unit_job is None:
            self._unit_job = Job.create(run_item, connection=self.connection)
        job = self._unit_job
        # from_idle: the worker waited for these: load is low, a batch goes at once.
        job.meta = {"items": items, "from_idle": from_idle}
        return job

    def _queue_for(self, item: Item) -> Queue:
        return next((q for q in self.queues if q.name == item.service), self.queues[0])

    # --- running a unit of work ---------------------------------------------------------

    def execute_job(self, job: Job, queue: Queue) -> None:
        items: list[Item] = job.meta["items"]
        plan = self.plans[items[0].service]
        self.set_state(WorkerStatus.BUSY)
        self._last_item_at = time.monotonic()
        runnable = self._give_up_exhausted(items)
        if not runnable:
            return
        if plan.mode == "concurrent":
            self.inflight.submit(plan.processor, runnable)
            return
        self.procline(
            f"Processing {plan.name} #{runnable[0].index}" + (f" +{len(runnable) - 1}" if len(runnable) > 1 else "")
        )
        self._run_unit(plan, runnable, from_idle=job.meta["from_idle"])

    def _give_up_exhausted(self, items: list[Item]) -> list[Item]:
        """Items delivered queue.max_delivery times, or past their deadline, end with their terminal answer
        without running; the rest, to run."""
        ended = [item for item in items if item.exhausted or item.expired]
        if ended:
            self.publisher.publish(
                [
                    Done(held, expired(held.item) if held.item.expired else given_up(held.item))
                    for held in self.keeper.hold(ended, main=False)
                ]
            )
        return [item for item in items if not (item.exhausted or item.expired)]

    def _run_unit(self, plan: ServicePlan, items: list[Item], *, from_idle: bool) -> None:
        """One item, or one batch, in the main thread."""
        helds = self.keeper.hold(items, main=True)
        settled = False
        try:
            if plan.mode == "batch" and not from_idle and len(helds) < plan.want:
                helds += self._fill_batch(plan, helds)
            helds.sort(key=lambda held: not held.item.high)  # priority items first (stable otherwise)
            started = time.monotonic()
            try:
                outcomes = self._run_with_limit(plan, [held.item for held in helds])
            except Interrupted as exc:
                settled = True
                self._collect_behind()
                self.publisher.publish([Done(held, None, time.monotonic() - started) for held in helds])
                if exc.reason == SHUTDOWN:
                    self.log.warning("Worker %s: grace period over; %d item(s) handed back", self.name, len(helds))
                    raise StopRequested() from None
                return
            settled = True
            processing = time.monotonic() - started
            done = [Done(h, o, processing) for h, o in zip(helds, outcomes, strict=True)]
            self._publish_then_take(plan, done, processing)
        except BaseException:
            # Stopped mid-unit (cold shutdown): hand the items back so another worker takes them now.
            if not settled:
                self.publisher.release(helds)
            raise

    def _publish_then_take(self, plan: ServicePlan, done: list[Done], processing: float) -> None:
        """Write the unit's results. With a backlog the next take rides in the same round trip. For short items
        (prefetch) a worker keeps one item in reserve, so that the write goes on in the finisher thread while
        the reserved item runs: the round trip leaves the path from one item to the next. For very short items
        it takes a chain of them and writes their results together, with the next take, once the chain ends."""
        self._collect_behind()
        then = self._next_take_after(plan)
        if then is not None and self._chaining(plan, processing):
            if self.keeper.has_reserved():  # the chain goes on: this result goes with its last one
                self.keeper.unmain(d.held for d in done)
                self.publisher.defer(done)
                checkpoint("worker.result_deferred")
                return
            then = dataclasses.replace(then, want=self._chain_length(plan))
        elif then is not None and self._prefetching(plan, processing):
            if self.keeper.has_reserved():
                self.keeper.unmain(d.held for d in done)
                self._behind = self._finisher.submit(self._publish_behind, done, then)
                return
            then = dataclasses.replace(then, want=2)  # one to run next, one in reserve
        elif self.keeper.has_reserved():
            then = None  # the reserve runs next; no more taken ahead
        self._reserve(self.publisher.publish(done, then=then))

    def _publish_behind(self, done: list[Done], then: NextTake) -> None:
        checkpoint("worker.finish_behind")
        self._reserve(self.publisher.publish(done, then=then))

    def _reserve(self, taken: Taken | None) -> None:
        if taken is not None and taken.items:
            self.keeper.reserve(taken.items)
            checkpoint("worker.taken_ahead")

    def _chaining(self, plan: ServicePlan, processing: float) -> bool:
        return (
            self._prefetch
            and processing < PREFETCH_MIN_RUN_SECONDS
            and self._waiting.get(plan.name, 0) >= CHAIN_MIN_WAITING
        )

    def _chain_length(self, plan: ServicePlan) -> int:
        return min(CHAIN_MAX_ITEMS, self._waiting.get(plan.name, 0) // 2)

    def _write_late_results(self) -> None:
        """From the lease keeper's tick: deferred results that waited too long (the item behind them runs
        long) are written by the finisher thread, not left until that item ends."""
        if self.publisher.deferred_for() < DEFERRED_MAX_WAIT_SECONDS:
            return
        with contextlib.suppress(RuntimeError):  # the finisher was shut down: teardown writes them
            self._finisher.submit(self.publisher.write_deferred)

    def _prefetching(self, plan: ServicePlan, processing: float) -> bool:
        return (
            self._prefetch
            and PREFETCH_MIN_RUN_SECONDS <= processing < PREFETCH_MAX_RUN_SECONDS
            and self._waiting.get(plan.name, 0) >= PREFETCH_MIN_WAITING
        )

    def _fill_batch(self, plan: ServicePlan, helds: list[Held]) -> list[Held]:
        """A busy worker's batch that is not full waits for more, up to max_batch_timeout from its first item:
        under load, fuller batches; a worker that came from idle never waits (see `_job_for`)."""
        deadline = helds[0].item.taken_at + plan.service.rpc.max_batch_timeout / 1000
        after = max(held.item.index for held in helds)
        added: list[Held] = []
        while len(helds) + len(added) < plan.want and not self._stop_requested:
            left = deadline - time.time()
            if left <= 0:
                break
            try:
                self.store.wait_for_new({plan.name: after}, left)
                taken = self.store.take(plan.name, self._rules[plan.name], want=plan.want - len(helds) - len(added))
            except (*REDIS_DOWN, redis.ResponseError):
                break  # serve what is in hand
            runnable = self._give_up_exhausted(taken.items)
            added += self.keeper.hold(runnable, main=True)
            after = max([after, taken.last_index, *(item.index for item in taken.items)])
        return added

    def _run_with_limit(self, plan: ServicePlan, items: list[Item]) -> list[Outcome]:
        limit = plan.service.queue.max_processing_seconds
        token = 0
        self.keeper.processing = True
        try:
            if not limit:
                return self._call(plan, items)
            # SIGALRM stops Python code at the limit; the watchdog ends the process if the processor is
            # stuck in C code, so that the supervisor replaces it and the leases hand the items to others.
            token = self.watchdog.arm(limit)
            with UnixSignalDeathPenalty(math.ceil(limit), ProcessingTimeout):
                return self._call(plan, items)
        except ProcessingTimeout:
            failure = Outcome.failure(408, f"processing took longer than queue.max_processing_seconds={limit:g}")
            return [failure] * len(items)
        finally:
            # No interrupt comes once `processing` is off; then both timers are disarmed here, even
            # when an interrupt (a cancel, the grace period) cut the death penalty's own exit short:
            # a stray SIGALRM would end the worker's loop, a stray watchdog the process.
            self.keeper.processing = False
            signal.alarm(0)
            if token:
                self.watchdog.disarm(token)

    def _call(self, plan: ServicePlan, items: list[Item]) -> list[Outcome]:
        if plan.mode == "batch":
            return run_batch(plan.processor, items, self.inflight.run_coroutine)
        return [run_item(plan.processor, items[0])]

    def _finished(self, service: str, finished: Finished) -> None:
        # From the main thread or the finisher thread: plain assignments, no read-modify-write.
        self._last_item_at = time.monotonic()
        if finished.waiting is None:  # not the last finish of its pipeline: that one tells
            return
        self._waiting[service] = finished.waiting
        if finished.waiting <= 0:
            self._known_empty.add(service)


def _tell_to_end(thread: Any) -> None:
    """Ask redis-py's pubsub thread to end, without waiting for it (8.2's stop waits unless given a timeout;
    earlier ones take none and never wait)."""
    try:
        thread.stop(timeout=0)
    except TypeError:
        thread.stop()


def _describe(plan: ServicePlan) -> str:
    if plan.mode == "batch":
        rpc = plan.service.rpc
        return f"batches of up to {rpc.max_batch_size} (max_batch_timeout {rpc.max_batch_timeout} ms)"
    if plan.mode == "concurrent":
        how = "on its event loop" if plan.processor.is_async else "in threads"
        return f"up to {plan.capacity} requests at once {how}"
    return "one request at a time"
