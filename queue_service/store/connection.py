"""Building Redis clients: the one place that turns a URL into the API's asyncio clients and a worker's client.

Both sides get the same policy: a dropped connection is reconnected and the command retried a few times
with backoff, but a command that timed out is never resent (every script is idempotent per request id
anyway, so a resend after a lost answer stores nothing twice). Longer outages (Redis restarting) are the
caller's to ride out: `outage_retry` is the one policy for that.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

import redis
import redis.asyncio
import tenacity
from redis.backoff import ExponentialBackoff

T = TypeVar("T")
REDIS_DOWN = (redis.ConnectionError, redis.TimeoutError)
CONNECT_TIMEOUT_SECONDS = 2.0
# Short commands answer in microseconds; this bounds how long a frozen Redis can hold a caller (then 503).
COMMAND_TIMEOUT_SECONDS = 7.0
# Connections of the API for short commands: a command takes microseconds, so a few dozen serve thousands of
# concurrent requests (a caller waits for a free one), and a burst of clients cannot make the process hold
# hundreds of connections. Waits (long polls, watches, sync answers) hold none of these: they wait on one
# blocking connection per service (`blocking_client`).
API_POOL_SIZE = 64
API_POOL_WAIT_SECONDS = 5.0


def _retry() -> redis.asyncio.retry.Retry:
    return redis.asyncio.retry.Retry(ExponentialBackoff(cap=1.0, base=0.05), 3)


def _sync_retry() -> redis.retry.Retry:
    return redis.retry.Retry(ExponentialBackoff(cap=1.0, base=0.05), 3)


def _common(socket_timeout: float | None) -> dict[str, Any]:
    return {
        "socket_connect_timeout": CONNECT_TIMEOUT_SECONDS,
        "socket_timeout": socket_timeout,
        "socket_keepalive": True,
        "health_check_interval": 30,
        "retry_on_error": [redis.ConnectionError],
    }


def api_client(url: str, pool_size: int = API_POOL_SIZE) -> redis.asyncio.Redis:
    """The API's client for short commands: a bounded pool; under a burst, callers wait for a connection."""
    pool = redis.asyncio.BlockingConnectionPool.from_url(
        url,
        max_connections=pool_size,
        timeout=API_POOL_WAIT_SECONDS,
        retry=_retry(),
        **_common(COMMAND_TIMEOUT_SECONDS),
    )
    return redis.asyncio.Redis(connection_pool=pool)


def blocking_client(url: str, block_seconds: float) -> redis.asyncio.Redis:
    """A client for one long-lived blocking reader (XREAD BLOCK): its read timeout is above the block."""
    return redis.asyncio.Redis.from_url(url, retry=_retry(), **_common(block_seconds + COMMAND_TIMEOUT_SECONDS))


def worker_client(url: str) -> redis.Redis:
    """A worker's client (rq's bookkeeping and ours share it). Blocking waits are short (a second)."""
    return redis.Redis.from_url(url, retry=_sync_retry(), **_common(COMMAND_TIMEOUT_SECONDS))


def worker_client_like(client: redis.Redis) -> redis.Redis:
    """A worker's client to the server `client` talks to (the one rq built from its --url), with our policy."""
    kwargs = dict(client.connection_pool.connection_kwargs)
    kwargs.update(_common(COMMAND_TIMEOUT_SECONDS), retry=_sync_retry())
    pool = redis.ConnectionPool(connection_class=client.connection_pool.connection_class, **kwargs)
    return redis.Redis(connection_pool=pool)


def outage_retry(
    seconds: float,
    on_retry: Callable[[tenacity.RetryCallState], None] | None = None,
    give_up: Callable[[], bool] | None = None,
) -> tenacity.Retrying:
    """Keep retrying a call while Redis is unreachable, for up to `seconds` (or until `give_up()`), backing off
    to 5 s between tries: how late a caller notices Redis is back."""
    stop: tenacity.stop.stop_base = tenacity.stop_after_delay(seconds)
    if give_up is not None:
        stop = stop | tenacity.stop_when_event_set(_Flag(give_up))  # type: ignore[arg-type]
    return tenacity.Retrying(
        retry=tenacity.retry_if_exception_type(REDIS_DOWN),
        stop=stop,
        wait=tenacity.wait_exponential_jitter(initial=0.2, max=5.0),
        before_sleep=on_retry,
        reraise=True,
    )


class _Flag:
    """A callable seen as an Event by tenacity's stop_when_event_set."""

    def __init__(self, check: Callable[[], bool]) -> None:
        self.is_set = check
