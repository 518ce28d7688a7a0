"""The API's app factory: the Redis clients, the routes, the error mapping and the request log.

Queue semantics live in the store, the operations in `queue_routes.py` and the modules it names; here is
only the wiring, and which exception becomes which status code.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import redis.asyncio
import redis.exceptions
from fastapi import FastAPI
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.docs import get_swagger_ui_html
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.middleware.errors import ServerErrorMiddleware
from starlette.middleware.exceptions import ExceptionMiddleware
from starlette.requests import Request
from starlette.responses import HTMLResponse, Response
from starlette.routing import Route
from starlette.staticfiles import StaticFiles
from starlette.types import ASGIApp, Receive, Scope, Send
from swagger_ui_bundle import swagger_ui_path

from queue_service.api import dashboard, health, openapi, queue_routes
from queue_service.api.context import App
from queue_service.api.deadlines import DeadlineSweeper
from queue_service.api.errors import ApiError, error_response
from queue_service.api.metrics import Metrics
from queue_service.api.registry import ApiRegistry
from queue_service.api.request_log import RequestLog
from queue_service.api.waiters import BLOCK_MS
from queue_service.config import ServicesFile, Settings
from queue_service.logs import configure_logging
from queue_service.protocol import QUEUE_FULL, REQUEST_ID_HEADER, TOO_MANY_REQUESTS
from queue_service.store import connection
from queue_service.store.model import NoLiveWorker, NotReplicated, QueueEnded, QueueFull, TooManyGroups

log = logging.getLogger("queue_service.api")
# The paths the short middleware stack serves (see Api).
QUEUE_PATHS = "/api/predict/"


async def on_api_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, ApiError)
    return error_response(exc.status, exc.detail, exc.headers)


async def on_http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, StarletteHTTPException)
    if exc.status_code == 404:
        detail = f"no such path: {request.url.path}"
    elif exc.status_code == 405:
        detail = f"method {request.method} is not allowed on {request.url.path}"
    else:
        detail = str(exc.detail)
    return error_response(exc.status_code, detail, exc.headers)


async def on_validation_error(request: Request, exc: Exception) -> Response:
    return error_response(400, f"malformed request: {exc}")


async def on_queue_full(request: Request, exc: Exception) -> Response:
    # One mapping for both paths: an async put and a sync request compete for the same bound.
    return error_response(QUEUE_FULL, str(exc))


async def on_queue_ended(request: Request, exc: Exception) -> Response:
    return error_response(400, str(exc))


async def on_no_worker(request: Request, exc: Exception) -> Response:
    return error_response(503, f"no healthy upstream: {exc}")


async def on_too_many_groups(request: Request, exc: Exception) -> Response:
    return error_response(TOO_MANY_REQUESTS, str(exc), {"Retry-After": "15"})


async def on_not_replicated(request: Request, exc: Exception) -> Response:
    # Stored on the primary, unconfirmed by a replica: not acknowledged (a failover could lose it).
    log.warning("write not confirmed by a replica: %s", exc)
    return error_response(
        503, f"not confirmed by a replica (queue.durability: replicated): {exc}; retry later", {"Retry-After": "1"}
    )


async def on_cluster_busy(request: Request, exc: Exception) -> Response:
    # A slot moving (TRYAGAIN or redirections past the client's retries) or a shard failing over (CLUSTERDOWN):
    # transient, and the command did not run.
    log.warning("redis cluster busy: %s", exc)
    return error_response(503, "queue storage (Redis Cluster) is reconfiguring; retry later", {"Retry-After": "1"})


async def on_redis_down(request: Request, exc: Exception) -> Response:
    log.warning("redis unavailable: %s", exc)
    return error_response(503, "queue storage (Redis) is unreachable; retry later", {"Retry-After": "1"})


async def on_internal_error(request: Request, exc: Exception) -> Response:
    request_id = getattr(request.state, "request_id", "")
    log.exception("internal error in %s %s request_id=%s", request.method, request.url.path, request_id)
    # Starlette runs this handler outside every middleware, RequestLog included: set the header here.
    return error_response(
        500,
        f"internal error; request id {request_id} identifies it in the server log",
        {REQUEST_ID_HEADER: request_id},
    )


def _count(app_metrics: Metrics, services: ServicesFile, record: dict) -> None:
    # Only known services get a label: unknown names in URLs must not grow the metric set.
    if record["service"] in services.by_name:
        app_metrics.observe_request(
            record["service"], record["operation"], record["status"], record["duration_ms"] / 1000
        )


async def docs(request: Request) -> HTMLResponse:
    # Swagger UI from the swagger-ui-bundle package, served here: /docs works with no internet access.
    return get_swagger_ui_html(
        openapi_url="/openapi.json",
        title="queue-service API",
        swagger_js_url="/docs-assets/swagger-ui-bundle.js",
        swagger_css_url="/docs-assets/swagger-ui.css",
        swagger_favicon_url="/docs-assets/favicon-32x32.png",
    )


class Api(FastAPI):
    """FastAPI, with the queue paths served through a shorter middleware stack.

    The queue paths (`/api/predict/...`, plain Starlette routes) need none of what FastAPI adds around its own
    routes: its telemetry (an environment lookup per request), its app-wide body limit (none is set: each
    service has its own, `read_body`) and the exit stack its dependencies close files with. Under a burst of
    puts those cost ~9 % of the API's CPU (py-spy, issue 17). The short stack has the same error handlers,
    the same middleware (the request log) and the same router: the same answers, byte for byte.
    """

    _short_stack: ASGIApp | None = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["path"].startswith(QUEUE_PATHS) and not self.root_path:
            if self._short_stack is None:
                self._short_stack = self._build_short_stack()
            scope["app"] = self
            await self._short_stack(scope, receive, send)
            return
        await super().__call__(scope, receive, send)

    def _build_short_stack(self) -> ASGIApp:
        error_handler = None
        handlers = {}
        for key, value in self.exception_handlers.items():
            if key in (500, Exception):
                error_handler = value
            else:
                handlers[key] = value
        app: ASGIApp = ExceptionMiddleware(self.router, handlers=handlers, debug=self.debug)
        for cls, args, kwargs in reversed(self.user_middleware):
            app = cls(app, *args, **kwargs)
        return ServerErrorMiddleware(app, handler=error_handler, debug=self.debug)


def create_app(
    settings: Settings | None = None,
    *,
    services: ServicesFile | None = None,
    redis_client: redis.asyncio.Redis | None = None,
) -> FastAPI:
    settings = settings or Settings()
    services = services or settings.load_services()
    configure_logging()
    app_metrics = Metrics()

    @asynccontextmanager
    async def lifespan(fastapi_app: FastAPI) -> AsyncIterator[None]:
        client = redis_client or connection.api_client(settings.redis_url, settings.redis_pool_size)
        reader = redis_client or connection.blocking_client(settings.redis_url, BLOCK_MS / 1000)
        state = App(settings, services, client, reader, app_metrics)
        fastapi_app.state.qs = state
        answer_counts = dashboard.AnswerCounts(app_metrics, state.store)
        answer_counts.start()
        sweeper = DeadlineSweeper(state.store, services)
        sweeper.start()
        registry = ApiRegistry(state.store, list(services.by_name), settings.advertise, state.channel)
        await registry.start()
        try:
            yield
        finally:
            await registry.close()
            await sweeper.stop()
            await answer_counts.stop()
            await state.waiters.close()
            if redis_client is None:
                await client.aclose()
                await reader.aclose()

    # No slash redirects: Starlette builds them from the client's Host header.
    app = Api(title="queue-service", lifespan=lifespan, redirect_slashes=False, docs_url=None, redoc_url=None)
    app.router.routes.extend(queue_routes.routes())
    app.router.routes.extend(dashboard.routes())
    app.add_api_route("/healthz", health.healthz, methods=["GET"], summary="the process is alive")
    app.add_api_route(
        "/readyz", health.readyz, methods=["GET"], summary="every service (or ?service=, ?scope=api) can serve"
    )
    app.add_api_route("/metrics", health.metrics, methods=["GET"], summary="Prometheus metrics")
    app.router.routes.append(Route("/docs", docs, methods=["GET"], include_in_schema=False))
    app.mount("/docs-assets", StaticFiles(directory=str(swagger_ui_path)), name="docs-assets")
    openapi.install(app)
    app.add_exception_handler(ApiError, on_api_error)
    app.add_exception_handler(QueueFull, on_queue_full)
    app.add_exception_handler(QueueEnded, on_queue_ended)
    app.add_exception_handler(NoLiveWorker, on_no_worker)
    app.add_exception_handler(TooManyGroups, on_too_many_groups)
    app.add_exception_handler(StarletteHTTPException, on_http_error)
    app.add_exception_handler(RequestValidationError, on_validation_error)
    app.add_exception_handler(NotReplicated, on_not_replicated)
    app.add_exception_handler(redis.exceptions.TryAgainError, on_cluster_busy)
    # ClusterError: CLUSTERDOWN, and "TTL exhausted" (more redirections than the client follows while a slot moves).
    app.add_exception_handler(redis.exceptions.ClusterError, on_cluster_busy)
    app.add_exception_handler(redis.exceptions.ConnectionError, on_redis_down)
    app.add_exception_handler(redis.exceptions.TimeoutError, on_redis_down)
    app.add_exception_handler(Exception, on_internal_error)
    app.add_middleware(RequestLog, on_done=lambda r: _count(app_metrics, services, r))
    return app
