"""The HTTP front end: FastAPI app factory and routes, HTTP <-> queue operations and status codes.

Nothing else lives here: queue semantics are in `queues.py`/`watch.py`, the sync path's waiting
in `sync.py`, auth in `auth.py`, encodings in `wire.py`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import redis.exceptions
from fastapi import APIRouter, FastAPI, Request, WebSocket
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from redis.asyncio import BlockingConnectionPool, Redis
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialBackoff
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match

from queue_service.admission import RateLimiter
from queue_service.auth import check_authorization
from queue_service.config import ServiceConfig, ServicesFile, Settings
from queue_service.errors import ApiError, error_response
from queue_service.faults import checkpoint
from queue_service.keys import WORKER_GROUP, QueueName
from queue_service.logs import configure_logging
from queue_service.metrics import Metrics
from queue_service.params import MAX_LENGTH, MAX_WINDOW, Params
from queue_service.queues import MAX_BLOCK_SECONDS, QueueFull, Queues, queue_keys
from queue_service.request_log import REQUEST_ID_HEADER, RequestLog
from queue_service.sync import SyncCaller
from queue_service.watch import Watcher, WatchRequest
from queue_service.wire import (
    PROTOBUF_MEDIA_TYPE,
    encode_attributes,
    encode_frame,
    encode_frame_list,
    frames_to_json,
    wants_protobuf,
)

log = logging.getLogger("queue_service.api")

UID_HEADER = "X-EAS-QueueService-Redis-Uid"
GID_HEADER = "X-EAS-QueueService-Redis-Gid"
DEFAULT_GROUP = "eas"
QUEUE_FULL = 450
HTTP_METHODS = ("GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS")
# How long a closing watch waits for its sender to stop before releasing what it holds.
WATCH_STOP_WAIT_SECONDS = 2.0


class App:
    """What the routes share: settings, services, the Redis client and the queue operations."""

    def __init__(self, settings: Settings, services: ServicesFile, redis: Redis, metrics: Metrics) -> None:
        self.settings = settings
        self.metrics = metrics
        self.services = services
        self.redis = redis
        self.queues = Queues(redis)
        self.sync = SyncCaller(redis, self.queues)
        self.rate = RateLimiter(redis, self.queues.scripts)

    def service(self, name: str) -> ServiceConfig:
        try:
            return self.services.by_name[name]
        except KeyError:
            raise ApiError(404, f"service {name!r} not found") from None

    def authorize(self, request: Request | WebSocket, service: ServiceConfig, body: bytes = b"") -> None:
        problem = check_authorization(
            service.token,
            request.headers,
            method=request.scope.get("method", "GET"),
            path=request.url.path,
            body=body,
            max_skew_seconds=self.settings.max_clock_skew_seconds,
        )
        if problem:
            raise ApiError(401, problem)


def state(request: Request | WebSocket) -> App:
    return request.app.state.qs


async def read_body(request: Request, limit: int) -> bytes:
    """The request body, refused with 413 as soon as it is known to exceed `limit` bytes."""
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > limit:
        raise ApiError(413, f"body of {declared} bytes is over this service's limit of {limit} bytes")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise ApiError(413, f"body is over this service's limit of {limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


# --- queue routes -------------------------------------------------------------------------


async def put(request: Request, service_name: str, queue: QueueName) -> Response:
    app = state(request)
    request.state.operation = "put"
    service = app.service(service_name)
    body = await read_body(request, service.max_payload_bytes)
    app.authorize(request, service, body)
    params = Params(request.query_params, allowed={"_priority_"})
    if queue == "input":
        await app.rate.admit(service)
    checkpoint("put.admitted")
    result = await app.queues.put(service, queue, body, params.tags(), priority=params.flag("_priority_"))
    checkpoint("put.stored")
    request.state.request_id = result.request_id
    return PlainTextResponse(str(result.index), headers={REQUEST_ID_HEADER: result.request_id})


async def get(request: Request, service_name: str, queue: QueueName) -> Response:
    app = state(request)
    service = app.service(service_name)
    app.authorize(request, service)
    params = Params(request.query_params)
    request.state.operation = "get"
    if params.flag("_attrs_"):
        request.state.operation = "attrs"
        attrs = await app.queues.attributes(service, queue)
        if wants_protobuf(request.headers.get("accept")):
            return Response(encode_attributes(attrs), media_type=PROTOBUF_MEDIA_TYPE)
        return JSONResponse(attrs)
    if params.flag("_search_"):
        request.state.operation = "search"
        index = params.integer("_index_", 0, minimum=1)
        # The input queue's position is the workers'; the sink's is that of the caller's group.
        group = WORKER_GROUP if queue == "input" else request.headers.get(GID_HEADER) or DEFAULT_GROUP
        position = await app.queues.search(service.name, queue, index, group)
        if position is None:
            raise ApiError(404, "no data in stream")
        return JSONResponse(
            {
                "ConsumerId": position.consumer_id,
                "IsPending": position.is_pending,
                "WaitCount": position.wait_count,
            }
        )
    raw = params.flag("_raw_")
    frames = await app.queues.read(
        service.name,
        queue,
        start=params.integer("_index_", 0),
        length=1 if raw else params.integer("_length_", 1, minimum=1, maximum=MAX_LENGTH),
        request_id=request.query_params.get("requestId", ""),
        delete=params.flag("_auto_delete_"),
        tags=params.tags(),
        timeout=params.duration("_timeout_", 0.0),
    )
    if not frames:
        return Response(status_code=204)
    if raw:
        frame = frames[0]
        headers = {
            REQUEST_ID_HEADER: frame.tags.get("requestId", ""),
            "X-Eas-Queueservice-Index": str(frame.index),
        }
        if "lastCode" in frame.tags:
            headers["X-Eas-Queueservice-Last-Code"] = frame.tags["lastCode"]
        return Response(frame.data, media_type="application/octet-stream", headers=headers)
    if wants_protobuf(request.headers.get("accept")):
        return Response(encode_frame_list(frames), media_type=PROTOBUF_MEDIA_TYPE)
    return JSONResponse(frames_to_json(frames))


async def delete(request: Request, service_name: str, queue: QueueName) -> Response:
    app = state(request)
    service = app.service(service_name)
    app.authorize(request, service)
    params = Params(request.query_params, allowed={"_indexes_", "_index_", "_trunc_"})
    request.state.operation = "delete"
    if params.flag("_trunc_"):
        if "_index_" not in request.query_params:
            raise ApiError(400, "_trunc_=true needs _index_: items below that index are removed")
        await app.queues.truncate(service.name, queue, params.integer("_index_", 0, minimum=1))
    else:
        await app.queues.remove(service.name, queue, params.indexes())
    return PlainTextResponse("OK")


async def commit(request: Request, service_name: str, queue: QueueName) -> Response:
    app = state(request)
    service = app.service(service_name)
    app.authorize(request, service)
    params = Params(request.query_params, allowed={"_indexes_"})
    request.state.operation = "commit"
    await app.queues.remove(service.name, queue, params.indexes())
    return PlainTextResponse("OK")


async def sync_predict(request: Request, service_name: str) -> Response:
    app = state(request)
    request.state.operation = "sync"
    service = app.service(service_name)
    body = await read_body(request, service.max_payload_bytes)
    app.authorize(request, service, body)
    Params(request.query_params, allowed=())
    await app.rate.admit(service)
    return await app.sync.call(request, service, body)


async def watch(websocket: WebSocket, service_name: str, queue: QueueName) -> None:
    app = state(websocket)
    try:
        service = app.service(service_name)
        app.authorize(websocket, service)
        params = Params(websocket.query_params)
        if not params.flag("_watch_"):
            raise ApiError(400, "a WebSocket on a queue path needs _watch_=true")
        req = WatchRequest(
            queue=queue_keys(service.name, queue),
            group=websocket.headers.get(GID_HEADER) or DEFAULT_GROUP,
            consumer=websocket.headers.get(UID_HEADER) or str(uuid.uuid4()),
            window=params.integer("_window_", 1, minimum=1, maximum=MAX_WINDOW),
            start_index=params.integer("_index_", 0),
            auto_commit=params.flag("_auto_commit_"),
            index_only=params.flag("_index_only_"),
            tags=params.tags(),
        )
    except ApiError as exc:
        # Refuse the handshake: the client sees the HTTP status and the JSON reason.
        await websocket.send_denial_response(error_response(exc.status, exc.detail))
        return
    await websocket.accept()
    watcher = Watcher(app.redis, app.queues.scripts, req)

    async def send_frames() -> None:
        async for frame in watcher.frames():
            await websocket.send_bytes(encode_frame(frame))
            await watcher.sent(frame)

    async def until_disconnect() -> None:
        while (await websocket.receive())["type"] != "websocket.disconnect":
            pass

    sender, receiver = asyncio.create_task(send_frames()), asyncio.create_task(until_disconnect())
    try:
        done, _ = await asyncio.wait({sender, receiver}, return_when=asyncio.FIRST_COMPLETED)
        for task in done:
            if task is sender and not task.cancelled() and task.exception():
                log.warning("watch of %s/%s ended: %r", service.name, queue, task.exception())
    finally:
        for task in (sender, receiver):
            task.cancel()

        async def release() -> None:
            # The sender stops first: an item it took meanwhile would stay held until its lease lapsed.
            # Bounded: a sender that missed its cancellation must not keep the items from being released.
            await asyncio.wait({sender, receiver}, timeout=WATCH_STOP_WAIT_SECONDS)
            await watcher.release()

        with contextlib.suppress(Exception):
            await asyncio.shield(release())
        with contextlib.suppress(Exception):
            await websocket.close()


def queue_routes() -> APIRouter:
    router = APIRouter()
    for suffix, queue in (("", "input"), ("/sink", "sink")):
        path = "/api/predict/{service_name}" + suffix

        def bind(handler, queue: QueueName = queue):  # type: ignore[no-untyped-def]
            async def route(request: Request, service_name: str) -> Response:
                return await handler(request, service_name, queue)

            route.__name__ = f"{handler.__name__}_{queue}"
            return route

        router.add_api_route(path, bind(put), methods=["POST"], include_in_schema=True)
        router.add_api_route(path, bind(get), methods=["GET"])
        router.add_api_route(path, bind(delete), methods=["DELETE"])
        router.add_api_route(path, bind(commit), methods=["PUT"])

        async def ws_route(websocket: WebSocket, service_name: str, queue: QueueName = queue) -> None:
            await watch(websocket, service_name, queue)

        router.add_api_websocket_route(path, ws_route)
    router.add_api_route("/api/predict/{service_name}/sync", sync_predict, methods=["POST"])
    return router


# --- health -------------------------------------------------------------------------------


async def healthz() -> JSONResponse:
    return JSONResponse({"status": "ok"})


async def metrics(request: Request) -> Response:
    app = state(request)
    await app.metrics.refresh(app.queues, app.services)
    body, content_type = app.metrics.render()
    return Response(body, media_type=content_type)


async def readyz(request: Request) -> JSONResponse:
    app = state(request)
    try:
        await app.redis.ping()
        without = [s.name for s in app.services.services if await app.queues.live_workers(s.name) == 0]
    except redis.exceptions.RedisError as exc:
        return JSONResponse({"status": "unavailable", "redis": f"unreachable: {exc}"}, status_code=503)
    return JSONResponse({"status": "ready", "redis": "ok", "services_without_workers": without})


# --- errors -------------------------------------------------------------------------------


async def on_api_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, ApiError)
    return error_response(exc.status, exc.detail, exc.headers)


async def on_http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, StarletteHTTPException)
    if exc.status_code == 404:
        detail = f"no such path: {request.url.path}"
    elif exc.status_code == 405:
        detail = f"method {request.method} is not allowed on {request.url.path}"
        return error_response(405, detail, {**(exc.headers or {}), "Allow": ", ".join(allowed_methods(request))})
    else:
        detail = str(exc.detail)
    return error_response(exc.status_code, detail, exc.headers)


def allowed_methods(request: Request) -> list[str]:
    # Each verb of a queue path is its own route, and Starlette's own Allow names only the first.
    routes = request.app.router.routes
    return [
        method
        for method in HTTP_METHODS
        if any(route.matches({**request.scope, "method": method})[0] is Match.FULL for route in routes)
    ]


async def on_validation_error(request: Request, exc: Exception) -> Response:
    return error_response(400, f"malformed request: {exc}")


async def on_queue_full(request: Request, exc: Exception) -> Response:
    # One mapping for both paths: an async put and a sync request compete for the same bound.
    return error_response(QUEUE_FULL, str(exc))


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


# --- factory ------------------------------------------------------------------------------


def _count(app_metrics: Metrics, services: ServicesFile, record: dict) -> None:
    # Only known services get a label: unknown names in URLs must not grow the metric set.
    if record["service"] in services.by_name:
        app_metrics.observe_request(
            record["service"], record["operation"], record["status"], record["duration_ms"] / 1000
        )


def connect(settings: Settings) -> Redis:
    # Blocking pool: under a burst, callers wait for a connection instead of failing.
    pool = BlockingConnectionPool.from_url(
        settings.redis_url,
        max_connections=1024,
        timeout=5,
        socket_connect_timeout=2,
        # Read timeout above the longest blocking call (long polls block up to MAX_BLOCK_SECONDS):
        # a frozen Redis gets 503, never a hang.
        socket_timeout=MAX_BLOCK_SECONDS + 2,
        socket_keepalive=True,
        health_check_interval=30,
        # Reconnect on a dropped connection, but never resend on a timeout (put.lua is also
        # idempotent per request id, so a resend after a lost answer stores nothing twice).
        retry=Retry(ExponentialBackoff(cap=1.0, base=0.05), 3, supported_errors=(redis.exceptions.ConnectionError,)),
        retry_on_error=[redis.exceptions.ConnectionError],
    )
    return Redis(connection_pool=pool)


def create_app(
    settings: Settings | None = None,
    *,
    services: ServicesFile | None = None,
    redis_client: Redis | None = None,
) -> FastAPI:
    settings = settings or Settings()
    services = services or settings.load_services()
    configure_logging()
    app_metrics = Metrics()

    @asynccontextmanager
    async def lifespan(fastapi_app: FastAPI) -> AsyncIterator[None]:
        client = redis_client or connect(settings)
        fastapi_app.state.qs = App(settings, services, client, app_metrics)
        try:
            yield
        finally:
            if redis_client is None:
                await client.aclose()

    app = FastAPI(title="queue-service", lifespan=lifespan)
    app.include_router(queue_routes())
    app.add_api_route("/healthz", healthz, methods=["GET"])
    app.add_api_route("/readyz", readyz, methods=["GET"])
    app.add_api_route("/metrics", metrics, methods=["GET"])
    app.add_exception_handler(ApiError, on_api_error)
    app.add_exception_handler(QueueFull, on_queue_full)
    app.add_exception_handler(StarletteHTTPException, on_http_error)
    app.add_exception_handler(RequestValidationError, on_validation_error)
    app.add_exception_handler(redis.exceptions.ConnectionError, on_redis_down)
    app.add_exception_handler(redis.exceptions.TimeoutError, on_redis_down)
    app.add_exception_handler(Exception, on_internal_error)
    app.add_middleware(RequestLog, on_done=lambda r: _count(app_metrics, services, r))
    return app
