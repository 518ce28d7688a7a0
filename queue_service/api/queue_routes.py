"""The queue paths and their verbs: one Route per path, each verb an operation of the platform's protocol.

`/api/predict/{service}` (input queue), `/api/predict/{service}/sink`, and `/api/predict/{service}/sync`.
One Starlette Route per path with its methods, so a wrong verb gets Starlette's own 405 with `Allow`. They
are plain Starlette routes, not FastAPI ones: FastAPI's dependency solving cost ~47 µs a request here
(measured), a sixth of a put's whole API time; `openapi.py` describes them instead.
"""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import BaseRoute, Route, WebSocketRoute
from starlette.websockets import WebSocket

from queue_service.api import inspect, put_options, put_wait, reads, sync, watch
from queue_service.api.errors import ApiError
from queue_service.api.params import Params
from queue_service.api.preamble import QueueCall, identity, queue_call
from queue_service.faults import checkpoint
from queue_service.protocol import REQUEST_ID_HEADER
from queue_service.store.keys import QueueName

SERVICE_PATH = "/api/predict/{service_name}"


async def put(request: Request, queue: QueueName) -> Response:
    request.state.operation = "put"
    allowed = {"_priority_", *put_options.CONTROLS} if queue == "input" else {"_priority_"}
    call = await queue_call(request, queue, allowed=allowed, with_body=True, check=Params.item_tags)
    tags = call.params.item_tags()
    priority = call.params.flag("_priority_")
    options = put_options.PutOptions()
    if queue == "input":
        await call.app.rate.admit(call.service)
        max_items, max_bytes = call.service.rpc.max_queue_size, 0
        options = await put_options.put_options(request, call.params, call.service)
    else:
        max_items, max_bytes = call.service.queue.sink.max_length, call.service.queue.sink.max_bytes
    checkpoint("put.admitted")
    # The body's Content-Type goes with an input item: an upstream gets the body as the client sent it.
    content_type = request.headers.get("content-type", "") if queue == "input" else ""
    result = await call.app.store.put(
        call.qk,
        call.body,
        tags,
        max_items=max_items,
        max_bytes=max_bytes,
        priority=priority,
        content_type=content_type,
        ttl_ms=options.ttl_ms,
        hooks=options.hooks,
        idempotency_digest=options.idempotency_digest,
    )
    checkpoint("put.stored")
    request.state.request_id = result.request_id
    if options.wait_seconds is not None:
        return await put_wait.answer_when_done(request, call, result, options.wait_seconds)
    return PlainTextResponse(str(result.index), headers={REQUEST_ID_HEADER: result.request_id})


async def get(request: Request, queue: QueueName) -> Response:
    request.state.operation = "get"
    call = await queue_call(request, queue)
    params = call.params
    for flag, operation, answer in (
        ("_attrs_", "attrs", inspect.attributes),
        ("_search_", "search", inspect.search),
        ("_status_", "status", inspect.status),
    ):
        if params.flag(flag):
            request.state.operation = operation
            return await answer(request, call)
    return await reads.get_items(request, call)


async def delete(request: Request, queue: QueueName) -> Response:
    request.state.operation = "delete"
    call = await queue_call(request, queue, allowed={"_indexes_", "_index_", "_trunc_"})
    group = _group(request)
    if call.params.flag("_trunc_"):
        if "_index_" not in request.query_params:
            raise ApiError(400, "_trunc_=true needs _index_: items below that index are removed")
        await call.app.store.truncate(call.qk, call.params.integer("_index_", 0, minimum=1), group)
    elif queue == "input":  # a request deleted from the input queue is cancelled (its status, its webhooks)
        await call.app.store.cancel(call.service.name, call.params.indexes(), group)
    else:
        await call.app.store.remove(call.qk, call.params.indexes(), group)
    return PlainTextResponse("OK")


async def commit(request: Request, queue: QueueName) -> Response:
    request.state.operation = "commit"
    call = await queue_call(request, queue, allowed={"_indexes_"})
    group = _group(request)
    await call.app.store.remove(call.qk, call.params.indexes(), group)
    call.app.waiters.of(call.qk).committed(queue, group)
    return PlainTextResponse("OK")


def _group(request: Request) -> str:
    return identity(request)[0]


def queue_route(queue: QueueName) -> Route:
    operations = {"POST": put, "GET": get, "HEAD": get, "DELETE": delete, "PUT": commit}

    async def endpoint(request: Request) -> Response:
        return await operations[request.method](request, queue)

    path = SERVICE_PATH + ("/sink" if queue == "sink" else "")
    return Route(path, endpoint, methods=["POST", "GET", "DELETE", "PUT"], name=f"{queue}_queue")


def watch_route(queue: QueueName) -> WebSocketRoute:
    async def endpoint(websocket: WebSocket) -> None:
        await watch.watch(websocket, queue)

    path = SERVICE_PATH + ("/sink" if queue == "sink" else "")
    return WebSocketRoute(path, endpoint, name=f"{queue}_watch")


async def sync_endpoint(request: Request) -> Response:
    request.state.operation = "sync"
    call: QueueCall = await queue_call(request, "input", allowed=(), with_body=True)
    return await sync.call(request, call)


def routes() -> list[BaseRoute]:
    return [
        queue_route("input"),
        watch_route("input"),
        queue_route("sink"),
        watch_route("sink"),
        Route(SERVICE_PATH + "/sync", sync_endpoint, methods=["POST"], name="sync"),
    ]
