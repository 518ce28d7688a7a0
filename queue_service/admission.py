"""The rate limit (429) shared by the async and sync paths; the queue bound (450) is in put.lua.

`metadata.rpc.rate_limit` requests per second per service, counted in Redis (rate.lua) so the
limit holds across uvicorn workers and API replicas. The excess is refused at once, never queued.
"""

from __future__ import annotations

import math

from redis.asyncio import Redis

from queue_service import keys
from queue_service.config import ServiceConfig
from queue_service.errors import ApiError
from queue_service.scripts import Scripts

TOO_MANY_REQUESTS = 429


class RateLimiter:
    def __init__(self, redis: Redis, scripts: Scripts) -> None:
        self.redis = redis
        self.scripts = scripts

    async def admit(self, service: ServiceConfig) -> None:
        """Raise ApiError(429) with Retry-After when the service is over its rate."""
        rate = service.rpc.rate_limit
        if not rate:
            return
        wait_ms = int(await self.scripts.rate(keys=[keys.rate_limit(service.name)], args=[rate]))
        if wait_ms > 0:
            raise ApiError(
                TOO_MANY_REQUESTS,
                f"rate limit of {rate:g} requests/s for service {service.name!r} exceeded",
                {"Retry-After": str(max(1, math.ceil(wait_ms / 1000)))},
            )
