"""Health, readiness and metrics routes.

`/healthz`: the process is alive (no Redis call). `/readyz`: every service can serve now (Redis reachable,
a live worker, room in the sink), else 503 naming each service that cannot and why; `?service=<name>` asks
about one service, `?scope=api` only whether this API process can take requests (Redis reachable), which is
what a load balancer or a Kubernetes readiness probe of the API wants (async puts are accepted with no worker).
"""

from __future__ import annotations

import redis.exceptions
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from queue_service.api.context import app_of
from queue_service.api.errors import ApiError
from queue_service.api.inspect import service_readiness


async def healthz(request: Request) -> JSONResponse:
    return JSONResponse({"status": "ok"})


async def readyz(request: Request) -> JSONResponse:
    app = app_of(request)
    scope = request.query_params.get("scope", "services")
    if scope not in ("services", "api"):
        raise ApiError(400, "scope must be 'services' (default) or 'api'")
    wanted = request.query_params.get("service")
    services = [app.service(wanted)] if wanted else list(app.services.services)
    try:
        await app.store.ping()
        if scope == "api":
            return JSONResponse({"status": "ready", "redis": "ok"})
        verdicts = {service.name: await service_readiness(app.store, service) for service in services}
    except redis.exceptions.RedisError as exc:
        return JSONResponse({"status": "unavailable", "redis": f"unreachable: {exc}"}, status_code=503)
    ready = all(verdict.ready for verdict in verdicts.values())
    body = {
        "status": "ready" if ready else "not ready",
        "redis": "ok",
        "services": {
            name: {"ready": verdict.ready, **({"reasons": list(verdict.reasons)} if verdict.reasons else {})}
            for name, verdict in verdicts.items()
        },
        "services_without_workers": [name for name, v in verdicts.items() if "no live worker" in v.reasons],
    }
    return JSONResponse(body, status_code=200 if ready else 503)


async def metrics(request: Request) -> Response:
    app = app_of(request)
    await app.metrics.refresh(app.store, app.services)
    body, content_type = app.metrics.render()
    return Response(body, media_type=content_type)
