"""This API process in Redis, and the service discovery answer built from every process registered there.

Each API process heartbeats into each service's list of API processes (`<host:port>/<channel>`), like workers
do into theirs: the watch consumers' rows tell by it whether the process serving their connection lives, and the
official clients' direct mode (`ENDPOINT_TYPE_DIRECT` in Python, `EndpointTypeDirect` in Go) asks for the
addresses to spread their calls over the replicas without a load balancer. A process without an address to
advertise (`QS_ADVERTISE` unset and not run by `queue-service api`) is registered but not handed out.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

import redis.exceptions
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from queue_service import tasks
from queue_service.api.context import app_of
from queue_service.store.queues import QueueStore

log = logging.getLogger("queue_service.api.registry")

HEARTBEAT_SECONDS = 3.0
# A process that stopped heartbeating is out of the discovery answer this long after its last heartbeat.
LIVENESS_SECONDS = 10.0
# Every this many heartbeats, processes gone a while are dropped from the lists too.
PRUNE_EVERY = 20
# Every replica gets the same share: the clients balance by weighted round robin.
WEIGHT = 100


class ApiRegistry:
    """Registers this process under `address` (`host:port`, or "") for `services` while it runs."""

    def __init__(self, store: QueueStore, services: list[str], address: str, channel: str) -> None:
        self.store = store
        self.services = services
        self.member = f"{address}/{channel}"
        self._task: asyncio.Task[None] | None = None
        self._beats = 0

    async def start(self) -> None:
        await self._beat()
        self._task = asyncio.create_task(self._run(), name="api-registry")

    async def _beat(self) -> None:
        self._beats += 1
        try:
            prune = self._beats % PRUNE_EVERY == 1
            await self.store.heartbeat_api(self.services, self.member, LIVENESS_SECONDS, prune=prune)
        except redis.exceptions.RedisError as exc:  # Redis is away: /readyz says so; the next beat retries
            log.debug("api heartbeat: %s", exc)

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(HEARTBEAT_SECONDS)
            await self._beat()

    async def close(self) -> None:
        await tasks.stop(self._task)
        with contextlib.suppress(redis.exceptions.RedisError):
            await self.store.leave_api(self.services, self.member)


def endpoint_of(member: str) -> dict[str, object] | None:
    """`{"ip", "port", "weight"}` of a registered member, or None when it advertises no address."""
    address = member.rpartition("/")[0]
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit():
        return None
    return {"ip": host.strip("[]"), "port": int(port), "weight": WEIGHT}


async def upstreams(request: Request) -> Response:
    """The platform's service discovery answer: `{"endpoints": {"items": [{"ip", "port", "weight"}]}}`.

    Open, like the platform's: the clients ask without a token (`?internal=true` changes nothing here).
    """
    app = app_of(request)
    service = app.service(request.path_params["service_name"])
    seen: dict[tuple[object, object], dict[str, object]] = {}
    for member in await app.store.live_apis(service.name):
        endpoint = endpoint_of(member)
        if endpoint is not None:
            seen.setdefault((endpoint["ip"], endpoint["port"]), endpoint)
    items = sorted(seen.values(), key=lambda e: (str(e["ip"]), int(str(e["port"]))))
    return JSONResponse({"endpoints": {"items": items}})
