"""The dispatcher: sends every service's webhook deliveries, retries them with backoff, dead-letters the last.

Run by `queue-service up`, or alone by `queue-service webhooks`; several (on several machines) share the work
through the consumer group, as workers share input queues. Per service, one task takes what is due or new
(`DeliveryStore.take`, up to the free slots), sends each in a task of its own (at most `concurrency` per
service at once), and records how it went. Nothing is lost when a dispatcher dies: what it held lapses after
its lease (the attempt's timeout and a margin) and another sends it again, with the same webhook id.

Order: a request's deliveries go out in the order their events happened (its start, progress and output, then
its completion): an attempt waits for the request's previous attempt still in flight in this dispatcher (at most
ORDER_WAIT_SECONDS, so that it stays within its lease). A retry, or deliveries taken by two dispatchers, can
still arrive out of order; the payload's `timestamp` says when each event happened.

Retries: the n-th retry waits backoff_seconds * 2^(n-1), with jitter (0.5x to 1.5x), at most an hour, or what
the receiver's Retry-After asks (at most an hour); 410 Gone stops retrying; after `max_attempts` attempts the
delivery is a dead letter.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import os
import random
import socket
import time
import uuid
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from typing import Any

import httpx
import redis.exceptions

from queue_service.config import ServiceConfig, ServicesFile, WebhookSettings
from queue_service.store.deliveries import DeliveryStore
from queue_service.store.model import Delivery
from queue_service.webhooks import payload, sender
from queue_service.webhooks.signing import signed_headers
from queue_service.webhooks.targets import SERVICE_URL

log = logging.getLogger("queue_service.webhooks")

MAX_DELAY_SECONDS = 3600.0
# An attempt in flight stays a dispatcher's for its timeout plus this; then another may send it again.
LEASE_MARGIN_SECONDS = 5.0
IDLE_WAIT_SECONDS = 1.0
REDIS_RETRY_SECONDS = 1.0
MAINTENANCE_EVERY_SECONDS = 60.0
# Longest an attempt waits for the same request's previous attempt (kept below LEASE_MARGIN_SECONDS: the wait
# and the attempt's timeout together stay within the lease, so no other dispatcher sends it meanwhile).
ORDER_WAIT_SECONDS = LEASE_MARGIN_SECONDS / 2


def backoff_seconds(retry: int, base: float, rng: Callable[[], float] = random.random) -> float:
    """The wait before retry number `retry` (1 for the first): exponential, with jitter, bounded."""
    return min(MAX_DELAY_SECONDS, base * 2 ** (retry - 1) * (0.5 + rng()))


@dataclass(frozen=True, slots=True)
class Plan:
    """What to do after an attempt: `outcome` for hook_done, and when to try again."""

    outcome: str  # delivered | gone | retry | dead
    next_ms: int = 0


def plan_after(answer: sender.Answer, attempt: int, settings: WebhookSettings, now_ms: int) -> Plan:
    if answer.delivered:
        return Plan("delivered")
    if answer.gone:
        return Plan("gone")
    if attempt >= settings.max_attempts:
        return Plan("dead")
    delay = backoff_seconds(attempt, settings.backoff_seconds)
    if answer.retry_after is not None:
        delay = min(MAX_DELAY_SECONDS, max(delay, answer.retry_after))
    return Plan("retry", now_ms + int(delay * 1000))


def _ended(
    task: asyncio.Task[None],
    running: set[asyncio.Task[None]],
    freed: asyncio.Event,
    latest: dict[str, asyncio.Task[None]],
    request_id: str,
) -> None:
    running.discard(task)
    if latest.get(request_id) is task:
        del latest[request_id]
    freed.set()


def consumer_name() -> str:
    return f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"


class Dispatcher:
    def __init__(
        self,
        store: DeliveryStore,
        services: ServicesFile,
        *,
        concurrency: int = 16,
        public_url: str = "",
        name: str | None = None,
    ) -> None:
        self.store = store
        self.services = [s for s in services.services if s.webhook is not None]
        self.concurrency = concurrency
        self.public_url = public_url
        self.name = name or consumer_name()
        self.http = httpx.AsyncClient(follow_redirects=False, trust_env=False)
        self._stopping = asyncio.Event()

    async def run(self) -> None:
        """Serve every service with webhook settings until `stop()`; what is in flight then is left to lapse."""
        log.info("webhook dispatcher %s serving %s", self.name, ", ".join(s.name for s in self.services) or "nothing")
        try:
            async with asyncio.TaskGroup() as group:
                for service in self.services:
                    group.create_task(self._serve(service), name=f"webhooks-{service.name}")
                group.create_task(self._maintain(), name="webhooks-maintenance")
        finally:
            await self.http.aclose()

    def stop(self) -> None:
        self._stopping.set()

    async def _serve(self, service: ServiceConfig) -> None:
        settings = service.webhook
        assert settings is not None
        lease_ms = int((settings.timeout_seconds + LEASE_MARGIN_SECONDS) * 1000)
        running: set[asyncio.Task[None]] = set()
        latest: dict[str, asyncio.Task[None]] = {}  # request id -> its last attempt in flight (the order)
        freed = asyncio.Event()
        while not self._stopping.is_set():
            free = self.concurrency - len(running)
            if free <= 0:
                freed.clear()
                await self._until(freed.wait(), IDLE_WAIT_SECONDS)
                continue
            try:
                batch = await self.store.take(service.name, consumer=self.name, want=free, lease_ms=lease_ms)
            except redis.exceptions.RedisError as exc:
                log.warning("webhooks of %s: %s; retrying", service.name, exc)
                await self._until(asyncio.sleep(REDIS_RETRY_SECONDS), REDIS_RETRY_SECONDS)
                continue
            for delivery in batch.deliveries:
                rid = delivery.request_id
                task = asyncio.create_task(self._attempt(service, settings, delivery, after=latest.get(rid)))
                running.add(task)
                latest[rid] = task
                task.add_done_callback(
                    functools.partial(_ended, running=running, freed=freed, latest=latest, request_id=rid)
                )
            if batch.deliveries:
                continue
            wait = IDLE_WAIT_SECONDS
            if batch.next_due_ms is not None:
                wait = min(wait, max(0.0, batch.next_due_ms / 1000 - time.time()))
            # Nothing due or new: wait for a new delivery (a blocking read), or the next due one.
            await self._until(self.store.wait_for_new(service.name, batch.newest, wait), wait + 1)
        for task in running:
            task.cancel()

    async def _until(self, awaitable: Coroutine[Any, Any, object], seconds: float) -> None:
        """Wait for `awaitable` (or `seconds`, or a stop)."""
        stop = asyncio.ensure_future(self._stopping.wait())
        work = asyncio.ensure_future(awaitable)
        try:
            await asyncio.wait({stop, work}, timeout=seconds, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for future in (stop, work):
                future.cancel()
            with contextlib.suppress(asyncio.CancelledError, redis.exceptions.RedisError):
                await work

    async def _attempt(
        self,
        service: ServiceConfig,
        settings: WebhookSettings,
        delivery: Delivery,
        after: asyncio.Task[None] | None = None,
    ) -> None:
        if after is not None and not after.done():  # the same request's earlier event goes first
            await asyncio.wait({after}, timeout=ORDER_WAIT_SECONDS)
        url = delivery.text("url") or (settings.url or "")
        if url == SERVICE_URL:  # the service's webhook was removed from the file since
            answer = sender.Answer(error="the service has no webhook.url any more")
        else:
            body = payload.render(delivery, public_url=self.public_url)
            headers = signed_headers(settings.secret, delivery.webhook_id, body)
            answer = await sender.post(
                self.http,
                url,
                body.encode(),
                headers,
                timeout=settings.timeout_seconds,
                allow_private=settings.allow_private,
            )
        plan = plan_after(answer, delivery.attempt, settings, int(time.time() * 1000))
        log.info(
            "webhook %s %s of %s request_id=%s attempt=%d status=%s%s -> %s",
            delivery.webhook_id,
            delivery.event,
            service.name,
            delivery.request_id,
            delivery.attempt,
            answer.status or "-",
            f" error={answer.error!r}" if answer.error else "",
            plan.outcome,
        )
        try:
            await self.store.done(
                delivery,
                consumer=self.name,
                outcome=plan.outcome,
                next_ms=plan.next_ms,
                status=answer.status,
                error=answer.error,
            )
        except redis.exceptions.RedisError as exc:
            # Not recorded: the lease lapses and the delivery is sent again (at least once).
            log.warning("webhook %s: not recorded (%s); it will be sent again", delivery.webhook_id, exc)

    async def _maintain(self) -> None:
        while not self._stopping.is_set():
            for service in self.services:
                with contextlib.suppress(redis.exceptions.RedisError):
                    await self.store.maintain(service.name, self.name, MAINTENANCE_EVERY_SECONDS * 0.9)
            await self._until(asyncio.sleep(MAINTENANCE_EVERY_SECONDS), MAINTENANCE_EVERY_SECONDS)
