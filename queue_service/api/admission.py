"""What the API lets in before any work: the rate limit, and the bound on waits held open (both 429).

The rate limit is `metadata.rpc.rate_limit` requests per second per service, counted in Redis (rate.lua)
so it holds across uvicorn workers and API replicas. The wait bound caps the long polls and streams one
API process holds open, in all and per service: a flood of abandoned polls on one service cannot use up
what the others need. Either excess is refused at once, never queued. (The queue bound, 450, is put.lua's.)
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager

from queue_service.api.errors import ApiError
from queue_service.config import ServiceConfig
from queue_service.protocol import TOO_MANY_REQUESTS
from queue_service.store.queues import QueueStore


class RateLimiter:
    def __init__(self, store: QueueStore) -> None:
        self.store = store

    async def admit(self, service: ServiceConfig) -> None:
        """Raise ApiError(429) with Retry-After when the service is over its rate."""
        rate = service.rpc.rate_limit
        if not rate:
            return
        wait_ms = await self.store.admit_rate(service.name, rate)
        if wait_ms > 0:
            raise ApiError(
                TOO_MANY_REQUESTS,
                f"rate limit of {rate:g} requests/s for service {service.name!r} exceeded",
                {"Retry-After": str(max(1, math.ceil(wait_ms / 1000)))},
            )


class WaitLimiter:
    """Counts the waits (long polls, streams) this process holds open; refuses those past the bounds."""

    def __init__(self, per_process: int, per_service: int) -> None:
        self.per_process = per_process
        self.per_service = per_service
        self.open: Counter[str] = Counter()

    @property
    def total(self) -> int:
        return sum(self.open.values())

    @contextmanager
    def hold(self, service: str, what: str = "long polls") -> Iterator[None]:
        if self.total >= self.per_process:
            raise self._refusal(f"this API process already holds {self.per_process} open {what} (QS_MAX_LONG_POLLS)")
        if self.open[service] >= self.per_service:
            raise self._refusal(
                f"service {service!r} already has {self.per_service} open {what} on this API process "
                "(QS_MAX_LONG_POLLS_PER_SERVICE)"
            )
        self.open[service] += 1
        try:
            yield
        finally:
            self.open[service] -= 1
            if not self.open[service]:
                del self.open[service]

    @staticmethod
    def _refusal(why: str) -> ApiError:
        return ApiError(
            TOO_MANY_REQUESTS, f"{why}; retry later, or wait with a shorter _timeout_", {"Retry-After": "1"}
        )
