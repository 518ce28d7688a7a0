"""Per-minute counts of the API's answers, cluster-wide: what the dashboard's rejections and errors charts show.

No Redis work per request: each request is counted already, in memory, by the request log's Prometheus counter
(`Metrics.requests`, labelled service / operation / status). Every few seconds a background task adds what that
counter gained since the last flush to the current minute's hash in Redis (`keys.answers`), which expires an
hour after its last addition. Every API process does the same, so the hashes are the sum of all of them.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import defaultdict

import redis.exceptions

from queue_service import tasks
from queue_service.api.metrics import Metrics
from queue_service.store.queues import QueueStore

log = logging.getLogger("queue_service.api.dashboard")
FLUSH_SECONDS = 5.0
TTL_SECONDS = 3600
# The dashboard shows this many minutes, the current one last.
MINUTES_SHOWN = 15

Counts = dict[str, dict[str, int]]


def current_minute(now: float | None = None) -> int:
    return int((time.time() if now is None else now) // 60)


class AnswerCounts:
    """This process's answer counts, added to Redis by a background task (`start` / `stop`)."""

    def __init__(self, metrics: Metrics, store: QueueStore, interval: float = FLUSH_SECONDS) -> None:
        self.metrics = metrics
        self.store = store
        self.interval = interval
        self._flushed: dict[tuple[str, str, str], float] = {}
        self._task: asyncio.Task[None] | None = None

    def _totals(self) -> dict[tuple[str, str, str], float]:
        totals = {}
        for family in self.metrics.requests.collect():
            for sample in family.samples:
                if sample.name.endswith("_total"):
                    labels = sample.labels
                    totals[(labels["service"], labels["operation"], labels["status"])] = sample.value
        return totals

    async def flush(self) -> None:
        """Add what the counter gained since the last successful flush (kept for the next one if Redis is away)."""
        totals = self._totals()
        counts: Counts = defaultdict(dict)
        for (service, operation, status), total in totals.items():
            gained = int(total - self._flushed.get((service, operation, status), 0))
            if gained > 0:
                counts[service][f"{operation}:{status}"] = gained
        if counts:
            await self.store.add_answers(counts, current_minute(), TTL_SECONDS)
        self._flushed = totals

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.interval)
            try:
                await self.flush()
            except redis.exceptions.RedisError as exc:
                log.warning("answer counts not added to Redis (kept for the next try): %s", exc)

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="dashboard-answer-counts")

    async def stop(self) -> None:
        if self._task is None:
            return
        await tasks.stop(self._task)
        self._task = None
        with contextlib.suppress(redis.exceptions.RedisError, OSError):
            await asyncio.wait_for(self.flush(), timeout=2)
