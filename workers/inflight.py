"""InFlight: the requests one worker process holds at once, beside its main thread.

For a processor that waits rather than computes (an async `process`, the upstream processor) or a sync one
that declares `thread_safe = True`, one process holds up to `worker_threads` requests of a service: async
ones run as tasks on one event loop (a thread of its own), thread-safe sync ones in that many threads. The
main thread only takes items and hands them over (`submit`); a finisher thread writes what ends, all that
ended together in one round trip, and frees the slots.

Per item: a cancellation, a hand-over or the end of a stop's grace period cancels the item's task (the
lease keeper calls `Held.on_interrupt`); `queue.max_processing_seconds` ends it with 408; the watchdog
covers code stuck in C. A thread cannot be stopped: for a thread-safe sync processor the item ends at once
(its result dropped, or 408), but its thread runs until the call returns and the process has one thread
fewer until then.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from collections.abc import Callable, Coroutine, Mapping, Sequence
from typing import Any, TypeVar

from queue_service.store.model import Item, Outcome
from workers.lease_keeper import SHUTDOWN, Held, LeaseKeeper
from workers.processor import LoadedProcessor
from workers.results import Done, Publisher
from workers.runner import run_item, run_item_async
from workers.watchdog import Watchdog

log = logging.getLogger("rq.worker")
T = TypeVar("T")
# How long a cold stop waits for cancelled requests to be handed back before the process exits anyway.
COLD_STOP_SECONDS = 5.0


class _Threads:
    """Daemon threads for a thread-safe sync processor: a stuck call never blocks the process's exit
    (ThreadPoolExecutor's threads are joined at exit)."""

    def __init__(self, count: int) -> None:
        self._jobs: queue.SimpleQueue[tuple[asyncio.AbstractEventLoop, asyncio.Future[Any], Callable[[], Any]]]
        self._jobs = queue.SimpleQueue()
        for n in range(count):
            threading.Thread(target=self._work, name=f"processor-{n}", daemon=True).start()

    def run(self, loop: asyncio.AbstractEventLoop, call: Callable[[], T]) -> asyncio.Future[T]:
        future: asyncio.Future[T] = loop.create_future()
        self._jobs.put((loop, future, call))
        return future

    def _work(self) -> None:
        while True:
            loop, future, call = self._jobs.get()
            try:
                result = call()
            except BaseException as exc:
                loop.call_soon_threadsafe(_settle, future, None, exc)
            else:
                loop.call_soon_threadsafe(_settle, future, result, None)


def _settle(future: asyncio.Future[Any], result: Any, exc: BaseException | None) -> None:
    if future.done():  # cancelled (or timed out) while the thread ran: nobody waits for it
        return
    if exc is not None:
        future.set_exception(exc)
    else:
        future.set_result(result)


class InFlight:
    def __init__(
        self,
        keeper: LeaseKeeper,
        publisher: Publisher,
        watchdog: Watchdog,
        capacity: Mapping[str, int],
        limits: Mapping[str, float],
    ) -> None:
        self.keeper = keeper
        self.publisher = publisher
        self.watchdog = watchdog
        self.capacity = dict(capacity)  # service -> requests held at once (services run here only)
        self.limits = dict(limits)  # service -> queue.max_processing_seconds (0: none)
        self.loop = asyncio.new_event_loop()
        self._tasks: dict[int, asyncio.Task[Any]] = {}  # id(held) -> its task (touched in the loop only)
        self._count = dict.fromkeys(self.capacity, 0)
        self._changed = threading.Condition()
        self._ended: queue.SimpleQueue[Done] = queue.SimpleQueue()
        self._threads: dict[str, _Threads] = {}
        self._started = False

    def start(self) -> None:
        if self._started:
            return
        self._started = True
        threading.Thread(target=self.loop.run_forever, name="inflight-loop", daemon=True).start()
        threading.Thread(target=self._finish_ended, name="inflight-finisher", daemon=True).start()

    # --- the main thread's side ---------------------------------------------------------------

    def free(self, service: str) -> int:
        with self._changed:
            return self.capacity.get(service, 0) - self._count.get(service, 0)

    def total(self) -> int:
        with self._changed:
            return sum(self._count.values())

    def submit(self, processor: LoadedProcessor, items: Sequence[Item]) -> None:
        """Start each item in its own task; it ends in the finisher, which frees its slot."""
        self.start()
        if not items:
            return
        service = items[0].service
        with self._changed:
            self._count[service] += len(items)
        helds = self.keeper.hold(items, main=False, on_interrupt=self._interrupt)
        if not processor.is_async and service not in self._threads:
            self._threads[service] = _Threads(self.capacity[service])
        for held in helds:
            asyncio.run_coroutine_threadsafe(self._run(held, processor), self.loop)

    def wait_for_change(self, timeout: float) -> None:
        """Block until a slot frees (or `timeout` passes)."""
        with self._changed:
            self._changed.wait(timeout)

    def drain(self, timeout: float | None = None) -> bool:
        """Wait until nothing is in flight (the lease keeper ends what the grace period catches); True if so."""
        with self._changed:
            return self._changed.wait_for(lambda: sum(self._count.values()) == 0, timeout)

    def stop_now(self) -> None:
        """Cold stop: stop every request in flight and hand it back."""
        for held in self.keeper.held():
            if not held.main and held.reason is None:
                held.reason = SHUTDOWN
                self._interrupt(held)
        self.drain(COLD_STOP_SECONDS)

    def run_coroutine(self, coroutine: Coroutine[Any, Any, T]) -> T:
        """Run a coroutine on the loop and wait for it (an async `process_batch`, from the main thread);
        an interrupt of the main thread while it waits cancels it."""
        self.start()
        future = asyncio.run_coroutine_threadsafe(coroutine, self.loop)
        try:
            return future.result()
        except BaseException:
            future.cancel()
            raise

    # --- the loop's side ----------------------------------------------------------------------

    def _interrupt(self, held: Held) -> None:
        # From the lease keeper's thread: the task lives in the loop.
        self.loop.call_soon_threadsafe(self._cancel, id(held))

    def _cancel(self, key: int) -> None:
        task = self._tasks.get(key)
        if task is not None:
            task.cancel()

    async def _run(self, held: Held, processor: LoadedProcessor) -> None:
        key = id(held)
        task = asyncio.current_task()
        assert task is not None
        self._tasks[key] = task
        item = held.item
        limit = self.limits.get(item.service, 0.0)
        started = time.monotonic()
        outcome: Outcome | None = None
        try:
            if held.reason is None:  # else it was interrupted before it started
                work = self._work(held, processor, limit)
                outcome = await (asyncio.wait_for(work, limit) if limit else work)
        except TimeoutError:
            outcome = Outcome.failure(408, f"processing took longer than queue.max_processing_seconds={limit:g}")
        except asyncio.CancelledError:
            outcome = None  # held.reason says why (a cancel, a hand-over, the end of the grace period)
        except Exception as exc:  # a bug of ours; the item must still end
            log.exception("request %s failed in the worker", item.request_id)
            outcome = Outcome.failure(500, f"worker error: {type(exc).__name__}: {exc}")
        finally:
            self._tasks.pop(key, None)
        self._ended.put(Done(held, outcome, time.monotonic() - started))

    async def _work(self, held: Held, processor: LoadedProcessor, limit: float) -> Outcome:
        token = self.watchdog.arm(limit) if limit else 0
        if processor.is_async:
            try:
                return await run_item_async(processor, held.item)
            finally:
                if token:
                    self.watchdog.disarm(token)

        def call() -> Outcome:
            try:
                return run_item(processor, held.item)
            finally:  # when the thread returns, not when its item ended: a thread stuck past its limit
                if token:  # ends the process (the watchdog), which frees what it holds
                    self.watchdog.disarm(token)

        return await self._threads[held.item.service].run(self.loop, call)

    # --- the finisher's side ------------------------------------------------------------------

    def _finish_ended(self) -> None:
        while True:
            ended = [self._ended.get()]
            while True:  # everything that ended meanwhile goes in the same round trip
                try:
                    ended.append(self._ended.get_nowait())
                except queue.Empty:
                    break
            try:
                self.publisher.publish(ended)
            except Exception:  # Redis away past the retries: the leases lapse to other workers
                log.exception("could not write %d result(s)", len(ended))
            finally:
                with self._changed:
                    for done in ended:
                        self._count[done.held.item.service] -= 1
                    self._changed.notify_all()
