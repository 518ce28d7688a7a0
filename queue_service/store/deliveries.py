"""Webhook deliveries as the dispatchers use them (asyncio): take, record an attempt, wait, dead letters, maintenance.

Deliveries are entries of each service's deliveries stream (`keys.webhooks`), written by the steps that cause
their events; the dispatchers read new ones through the consumer group `qs-webhooks`, and `due` schedules the
rest: the next attempt of a retry, and the lease of an attempt in flight, so a dispatcher that dies leaves
its deliveries to the others (hook_take.lua). Dead letters keep their entries until retried by hand.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from redis.asyncio import Redis

from queue_service.store import keys, scripts
from queue_service.store.model import Delivery
from queue_service.store.scripts import DeliveryBatch

# A request's delivery states are kept this long after their last change once all of them are final.
STATE_MEMORY_SECONDS = 24 * 3600
FINAL_STATES = frozenset({"delivered", "gone", "dead"})


@dataclass(frozen=True, slots=True)
class DeadLetter:
    """A delivery that failed its last attempt."""

    entry_id: str
    webhook_id: str
    request_id: str
    event: str
    url: str  # '' for the service's own webhook
    dead_at_ms: int
    attempts: int
    last_status: int
    last_error: str


class DeliveryStore:
    """The deliveries of every service, over one asyncio client (a blocking wait holds one of its connections)."""

    def __init__(self, redis: Redis) -> None:
        self.redis = redis
        self.scripts = scripts.Scripts(redis)

    async def take(self, service: str, *, consumer: str, want: int, lease_ms: int) -> DeliveryBatch:
        call = scripts.hook_take(service, consumer=consumer, want=want, lease_ms=lease_ms)
        return await self.scripts.run_async(call)

    async def done(
        self, delivery: Delivery, *, consumer: str, outcome: str, next_ms: int = 0, status: int = 0, error: str = ""
    ) -> bool:
        call = scripts.hook_done(
            delivery, consumer=consumer, outcome=outcome, next_ms=next_ms, status=status, error=error
        )
        return await self.scripts.run_async(call)

    async def wait_for_new(self, service: str, after: str, seconds: float) -> None:
        """Block until a delivery is written after entry `after`, or `seconds` pass."""
        stream = keys.webhooks(service).stream
        await self.redis.xread({stream: after}, count=1, block=max(1, int(seconds * 1000)))

    async def revive(self, service: str, entry_ids: Sequence[str] = ()) -> int:
        """Send dead letters again (these, or all of them), with the same webhook ids."""
        total = 0
        while True:
            revived = await self.scripts.run_async(scripts.hook_revive(service, entry_ids))
            total += revived
            if entry_ids or revived == 0:
                return total

    async def dead_letters(self, service: str, most: int = 100) -> list[DeadLetter]:
        """The newest `most` dead letters, newest first, with their last attempt's state."""
        hooks = keys.webhooks(service)
        raw: Any = await self.redis.zrevrange(hooks.dead, 0, most - 1, withscores=True)
        letters: list[DeadLetter] = []
        for member, score in raw:
            entry_id = _text(member)
            found: Any = await self.redis.xrange(hooks.stream, entry_id, entry_id)
            if not found:
                continue
            fields = {_text(k): bytes(v) for k, v in found[0][1].items()}
            delivery = Delivery(service, entry_id, "", 0, fields)
            state = json.loads(await self.redis.hget(hooks.requests, delivery.request_id) or b"{}")
            record = state.get(delivery.state_key, {})
            letters.append(
                DeadLetter(
                    entry_id=entry_id,
                    # As lib.lua's webhook_id: the one a receiver saw.
                    webhook_id=delivery.text("wid") or f"msg_{delivery.request_id}_{entry_id}",
                    request_id=delivery.request_id,
                    event=delivery.event,
                    url=delivery.text("url"),
                    dead_at_ms=int(score),
                    attempts=int(record.get("attempts", 0)),
                    last_status=int(record.get("lastStatus", 0)),
                    last_error=str(record.get("lastError", "")),
                )
            )
        return letters

    async def maintain(self, service: str, owner: str, lock_seconds: float) -> bool:
        """Forget delivery states final for a day, unless another dispatcher did lately; True when this one ran."""
        hooks = keys.webhooks(service)
        if not await self.redis.set(hooks.maintenance, owner, nx=True, ex=max(1, int(lock_seconds))):
            return False
        oldest_kept = (time.time() - STATE_MEMORY_SECONDS) * 1000
        async for request_id, raw in self.redis.hscan_iter(hooks.requests, count=1000):
            states = json.loads(raw).values()
            # Final states never change again (a retry by hand writes a new one): deleting races nothing.
            if all(s.get("state") in FINAL_STATES and s.get("at", 0) < oldest_kept for s in states):
                await self.redis.hdel(hooks.requests, request_id)
        return True


def _text(value: object) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)
