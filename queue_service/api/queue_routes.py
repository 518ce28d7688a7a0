"""The queue paths and their verbs: one Route per path, each verb an operation of the platform's protocol.

`/api/predict/{service}` (input queue), `/api/predict/{service}/sink`, `/api/predict/{service}/sync`, and the
sub-paths the official clients post to (`/api/predict/{service}/<path>`, `/sync/<path>`): the sub-path is kept
with the item and handed to the processor. One Starlette Route per path with its methods, so a wrong verb gets
Starlette's own 405 with `Allow`. They are plain Starlette routes, not FastAPI ones: FastAPI's dependency
solving cost ~47 µs a request here (measured), a sixth of a put's whole API time; `openapi.py` describes them.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from urllib.parse import parse_qs

from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import BaseRoute, Route, WebSocketRoute
from starlette.types import Receive, Scope, Send
from starlette.websockets import WebSocket

from queue_service.api import inspect, put_options, put_wait, reads, registry, stream, sync, watch
from queue_service.api.errors import ApiError
from queue_service.api.params import Params
from queue_service.api.preamble import QueueCall, identity, queue_call
from queue_service.faults import checkpoint
from queue_service.protocol import PRIORITY_PARAMETER, REQUEST_ID_HEADER
from queue_service.store.keys import QueueName

SERVICE_PATH = "/api/predict/{service_name}"
Handler = Callable[[Request], Awaitable[Response]]
# A negative commit's code and reason: short words, as the clients' codes are (`Shutdown`, `422`).
MAX_CODE_CHARS, MAX_REASON_CHARS = 64, 2048


async def put(request: Request, queue: QueueName, path: str = "") -> Response:
    if "_eos_" in request.query_params:
        return await end_stream(request, queue)
    request.state.operation = "put"
    allowed = {PRIORITY_PARAMETER, *put_options.CONTROLS} if queue == "input" else {PRIORITY_PARAMETER}
    call = await queue_call(request, queue, allowed=allowed, with_body=True, check=Params.item_tags)
    tags = call.params.item_tags()
    priority = call.params.priority(request.headers) > 0
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
        path=path,
        ttl_ms=options.ttl_ms,
        hooks=options.hooks,
        idempotency_digest=options.idempotency_digest,
    )
    checkpoint("put.stored")
    request.state.request_id = result.request_id
    if options.wait_seconds is not None:
        return await put_wait.answer_when_done(request, call, result, options.wait_seconds)
    return PlainTextResponse(str(result.index), headers={REQUEST_ID_HEADER: result.request_id})


async def end_stream(request: Request, queue: QueueName) -> Response:
    """`POST ?_eos_=true[&_force_=true]`: the queue's stream ends after the last index given out (the answer)."""
    request.state.operation = "end"
    call = await queue_call(request, queue, allowed={"_eos_", "_force_"})
    if not call.params.flag("_eos_"):
        raise ApiError(400, "_eos_ must be true to end the stream (a put carries no _eos_)")
    end = await call.app.store.end_stream(call.qk, force=call.params.flag("_force_"))
    call.app.waiters.of(call.qk).ended(queue)
    return PlainTextResponse(str(end))


async def get(request: Request, queue: QueueName) -> Response:
    request.state.operation = "get"
    call = await queue_call(request, queue)
    params = call.params
    for flag, operation, answer in (
        ("_attrs_", "attrs", inspect.attributes),
        ("_search_", "search", inspect.search),
        ("_status_", "status", inspect.status),
        ("_count_", "count", count),
        ("_watch_", "watch", watch.http_watch),
        ("_stream_", "stream", stream.sink_stream),
    ):
        if params.flag(flag):
            request.state.operation = operation
            return await answer(request, call)
    return await reads.get_items(request, call)


async def count(request: Request, call: QueueCall) -> Response:
    """`_count_=true[&_priority_=N][&tag=v…]`: how many items the queue holds, as a plain integer."""
    priority_only = call.params.priority({}) > 0
    return PlainTextResponse(
        str(await call.app.store.count(call.qk, priority_only=priority_only, tags=call.params.tags()))
    )


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
    if "_negative_" in request.query_params:
        return await refuse(request, queue)
    request.state.operation = "commit"
    call = await queue_call(request, queue, allowed={"_indexes_"})
    group = _group(request)
    await call.app.store.remove(call.qk, call.params.indexes(), group)
    call.app.waiters.of(call.qk).committed(queue, group)
    return PlainTextResponse("OK")


async def refuse(request: Request, queue: QueueName) -> Response:
    """Negative commit: `PUT ?_indexes_=N&_negative_=true`, form body `_code_=…&_reason_=…`.

    The caller's group gets the items back (another consumer takes them), or, delivered `queue.max_delivery`
    times, the items end: an input item with a terminal result carrying the code and reason (negative.lua)."""
    request.state.operation = "negative"
    call = await queue_call(request, queue, allowed={"_indexes_", "_negative_"}, with_body=True)
    indexes = call.params.indexes()
    group = _group(request)
    if not call.params.flag("_negative_"):
        await call.app.store.remove(call.qk, indexes, group)
        call.app.waiters.of(call.qk).committed(queue, group)
        return PlainTextResponse("OK")
    code, reason = _refusal(call.body)
    refused = await call.app.store.refuse(
        call.qk,
        indexes,
        group,
        max_delivery=call.service.queue.max_delivery,
        last_code=int(code) if code.isdigit() and 100 <= int(code) <= 599 else 500,
        message=": ".join(part for part in (code, reason) if part) or "refused by a consumer",
    )
    request.state.log_extra = {"released": refused.released, "ended": refused.ended}
    call.app.waiters.of(call.qk).released(queue, group)
    return PlainTextResponse("OK")


def _refusal(body: bytes) -> tuple[str, str]:
    """The code and reason of a negative commit's form body (both optional)."""
    try:
        form = parse_qs(body.decode("utf-8"), keep_blank_values=True, strict_parsing=False)
    except UnicodeDecodeError:
        raise ApiError(400, "a negative commit's body must be a UTF-8 form: _code_=...&_reason_=...") from None
    code, reason = (form.get(name, [""])[0].strip() for name in ("_code_", "_reason_"))
    if len(code) > MAX_CODE_CHARS or not all(c.isascii() and (c.isalnum() or c in "._-") for c in code):
        raise ApiError(
            400, f"_code_ must be at most {MAX_CODE_CHARS} of A-Z a-z 0-9 . _ - (e.g. Shutdown), got {code!r}"
        )
    if len(reason) > MAX_REASON_CHARS:
        raise ApiError(400, f"_reason_ is over {MAX_REASON_CHARS} characters")
    return code, reason


def _group(request: Request) -> str:
    return identity(request)[0]


class Endpoint:
    """A handler served as a bare ASGI app, not through Starlette's `request_response`.

    That wrapper adds an exception-handling layer per request (and one more hop to every message sent) with
    the same handlers the app's ExceptionMiddleware applies anyway: ~5 % of a put's CPU (issue 17). An
    error raised here reaches that middleware unchanged, and gets the same answer."""

    __slots__ = ("handler",)

    def __init__(self, handler: Handler) -> None:
        self.handler = handler

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        response = await self.handler(Request(scope, receive, send))
        await response(scope, receive, send)


def queue_route(queue: QueueName) -> Route:
    operations = {"POST": put, "GET": get, "HEAD": get, "DELETE": delete, "PUT": commit}

    async def endpoint(request: Request) -> Response:
        return await operations[request.method](request, queue)

    path = SERVICE_PATH + ("/sink" if queue == "sink" else "")
    return Route(path, Endpoint(endpoint), methods=["POST", "GET", "DELETE", "PUT"], name=f"{queue}_queue")


def watch_route(queue: QueueName) -> WebSocketRoute:
    async def endpoint(websocket: WebSocket) -> None:
        await watch.watch(websocket, queue)

    path = SERVICE_PATH + ("/sink" if queue == "sink" else "")
    return WebSocketRoute(path, endpoint, name=f"{queue}_watch")


async def sub_path_put(request: Request) -> Response:
    """`POST /api/predict/{service}/<path>` (Go `PutWithPath`): a put into the input queue, the path kept.

    Other verbs on such a path are 405; a path under `sink` is no sub-path (404), one under `sync` is the sync
    route's (only a verb it does not take comes here: 405)."""
    path = request.path_params["sub_path"].strip("/")
    first = path.split("/", 1)[0]
    if not path or first == "sink":
        raise ApiError(404, f"no such path: {request.url.path}")
    if request.method != "POST" or first == "sync":
        raise ApiError(405, f"method {request.method} is not allowed on {request.url.path}", {"Allow": "POST"})
    return await put(request, "input", path)


async def sync_endpoint(request: Request) -> Response:
    request.state.operation = "sync"
    call: QueueCall = await queue_call(request, "input", allowed=(), with_body=True)
    path = request.path_params.get("sub_path", "").strip("/")
    if stream.wants_stream(request):
        return await stream.sync_stream(request, call, path=path)
    return await sync.call(request, call, path=path)


def routes() -> list[BaseRoute]:
    return [
        queue_route("input"),
        watch_route("input"),
        queue_route("sink"),
        watch_route("sink"),
        Route(SERVICE_PATH + "/sync", Endpoint(sync_endpoint), methods=["POST"], name="sync"),
        Route(SERVICE_PATH + "/sync/{sub_path:path}", Endpoint(sync_endpoint), methods=["POST"], name="sync_sub_path"),
        Route(
            SERVICE_PATH + "/{sub_path:path}",
            Endpoint(sub_path_put),
            methods=["POST", "GET", "PUT", "DELETE"],
            name="sub_path",
        ),
        # The clients' direct mode: Python's path, then Go's.
        Route("/api/v1/servicediscovery/upstreams/{service_name}", registry.upstreams, methods=["GET"]),
        Route("/exported/apis/eas.alibaba-inc.k8s.io/v1/upstreams/{service_name}", registry.upstreams, methods=["GET"]),
    ]
