"""The sweep that ends requests whose deadline (`_ttl_`, `queue.request_ttl`) passed while they waited.

A worker's take ends the expired items it meets itself, exactly at the deadline; this ends the others, of
services no worker takes from now (none live, all busy, a sink full), within about SWEEP_SECONDS. Each API
process runs it; a short Redis lock per service lets one process per interval do the work.
"""

from __future__ import annotations

import asyncio
import logging
import uuid

import redis.exceptions

from queue_service import tasks
from queue_service.config import ServicesFile
from queue_service.store.queues import QueueStore

log = logging.getLogger("queue_service.api.deadlines")

SWEEP_SECONDS = 1.0


class DeadlineSweeper:
    def __init__(self, store: QueueStore, services: ServicesFile, interval: float = SWEEP_SECONDS) -> None:
        self.store = store
        self.services = [service.name for service in services.services]
        self.interval = interval
        self.name = uuid.uuid4().hex
        self._task: asyncio.Task[None] | None = None

    async def sweep(self) -> int:
        ended = 0
        for service in self.services:
            if await self.store.sweep_lock(service, self.name, int(self.interval * 900)):
                ended += await self.store.expire(service)
        return ended

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.interval)
            try:
                ended = await self.sweep()
            except redis.exceptions.RedisError as exc:
                log.debug("deadline sweep: %s", exc)
                continue
            if ended:
                log.info("deadline sweep: %d request(s) expired before they started", ended)

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="deadline-sweep")

    async def stop(self) -> None:
        if self._task is None:
            return
        await tasks.stop(self._task)
        self._task = None
