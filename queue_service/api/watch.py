"""Watch: deliver a queue's items to one consumer of a client consumer group, within a window.

Consumers of one group share the items (each item to one consumer); each group sees every item. A consumer
holds at most `window` items delivered and not committed; a commit frees a place. Items a consumer holds
carry a lease that the watch renews while the connection lives; when it closes they are released at once,
and a crashed API's leases lapse, so another consumer of the group gets them. An idle watch costs Redis
nothing: it waits on this process's reader of its service (`waiters.py`), which also tells it when an item
of its group lapsed. Each connection is a stream consumer of its own (`keys.connection_consumer`): the
clients reconnect with the same consumer id, and a new connection must never renew what an old one was sent.

Two transports, one delivery loop: a WebSocket (one binary frame per item) or, as the Go client's
`WebsocketWatch=false` asks, a plain HTTP answer that streams the frames, each after its length (4 bytes,
big-endian). When the queue's stream has ended (`_eos_`) and nothing put before the end is left, the watch
sends one last frame, index 0 with the tag `_eos_`, and stays open (a closed watch would make every official
client reconnect at once, forever).

WebSocket answers: a missing or wrong token, or an unknown service, refuse the handshake with the HTTP
status (401, 404); a malformed request is accepted and closed with 1008 and the reason; too many consumer
groups on the queue closes with 1013 (try again later); an internal fault closes with 1011. The HTTP watch
answers those with the status itself (401, 404, 400, 429), before any frame.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import struct
import time
import uuid
from collections.abc import Awaitable, Callable, Coroutine, Mapping
from dataclasses import dataclass, field
from typing import Any

import redis.exceptions
from starlette.requests import Request
from starlette.responses import Response
from starlette.types import Receive, Scope, Send
from starlette.websockets import WebSocket, WebSocketDisconnect

from queue_service.api.context import App, app_of
from queue_service.api.errors import ApiError, error_response
from queue_service.api.params import MAX_WINDOW, Params
from queue_service.api.preamble import QueueCall, find_service, identity
from queue_service.api.waiters import Waiter
from queue_service.protocol import END_OF_STREAM_TAG, PROTOBUF_MEDIA_TYPE
from queue_service.store import keys
from queue_service.store.keys import QueueKeys, QueueName
from queue_service.store.model import DataFrame, EndOfStream, TooManyGroups, WatchConsumer
from queue_service.store.queues import now_ms
from queue_service.wire import encode_frame

log = logging.getLogger("queue_service.api.watch")

LEASE_MS = 10_000
# A group none of whose consumers was seen this long may be replaced by a new group (queue.max_groups).
GROUP_IDLE_MS = 15_000
# How long an idle watch waits for a wake-up before it looks again itself (a safety net).
IDLE_RECHECK_SECONDS = 30.0
# How often a watch of a queue that has ended looks whether what was put before the end is gone: commits
# through other API processes and workers finishing input items wake nobody here.
ENDING_RECHECK_SECONDS = 1.0
# While the window is full, how often to look whether the client committed through another API process
# (a commit through this one wakes the watch at once).
FULL_WINDOW_RECHECK_SECONDS = 1.0
# How long a closing watch waits for its sender to stop before releasing what it holds.
STOP_WAIT_SECONDS = 2.0
POLICY_VIOLATION, TRY_AGAIN_LATER, INTERNAL_ERROR = 1008, 1013, 1011
MAX_REASON_BYTES = 120  # a close frame's reason is at most 123 bytes


@dataclass
class WatchRequest:
    queue: QueueKeys
    group: str
    consumer: str
    window: int
    start_index: int = 0
    auto_commit: bool = False
    index_only: bool = False
    tags: Mapping[str, str] = field(default_factory=dict)


def watch_request(params: Params, qk: QueueKeys, group: str, consumer: str) -> WatchRequest:
    if not params.flag("_watch_"):
        raise ApiError(400, "a watch needs _watch_=true")
    return WatchRequest(
        queue=qk,
        group=group,
        consumer=consumer or str(uuid.uuid4()),
        window=params.integer("_window_", 1, minimum=1, maximum=MAX_WINDOW),
        start_index=params.integer("_index_", 0),
        auto_commit=params.flag("_auto_commit_"),
        index_only=params.flag("_index_only_"),
        tags=params.tags(),
    )


class Watcher:
    """One consumer's delivery loop: sends frames through `send`, within its window."""

    def __init__(self, app: App, request: WatchRequest) -> None:
        self.app = app
        self.req = request
        self.store = app.store
        self._last_renew = time.monotonic()
        self._end_sent = -1  # the end of stream announced to this consumer (-1: none)
        self._stopped = False
        self._waiter: Waiter | None = None
        connection = secrets.token_hex(8)
        # This connection's own consumer in the group (see keys.connection_consumer).
        self.stream_consumer = keys.connection_consumer(request.consumer, connection)
        self.consumer = WatchConsumer(
            group=request.group,
            consumer=request.consumer,
            window=request.window,
            tags=dict(request.tags),
            auto_commit=request.auto_commit,
            index=request.start_index,
            api=app.channel,
            connection=connection,
            since_ms=now_ms(),
        )

    async def join(self) -> None:
        """Register the consumer's group (TooManyGroups when the queue has no room for another)."""
        await self.store.join(
            self.req.queue,
            self.req.group,
            start_index=self.req.start_index,
            max_groups=self.app.service(self.req.queue.service).queue.max_groups,
            idle_ms=GROUP_IDLE_MS,
        )

    async def run(self, send: Callable[[DataFrame], Awaitable[None]]) -> None:
        req, qk = self.req, self.req.queue
        waiters = self.app.waiters.of(qk)
        async with waiters.on_queue(qk.queue) as waiter:
            self._waiter = waiter
            with waiters.in_group(qk.queue, req.group, LEASE_MS, waiter):
                claim = True  # items left by consumers gone before this one came
                while not self._stopped:
                    held = 0 if req.auto_commit else await self._held()
                    free = req.window - held
                    if free <= 0:
                        await waiter.wait(FULL_WINDOW_RECHECK_SECONDS)
                        continue
                    delivery = await self.store.watch_delivery(
                        qk,
                        group=req.group,
                        consumer=self.stream_consumer,
                        want=free,
                        lease_ms=LEASE_MS if claim else 0,
                        tags=req.tags,
                        max_bytes=self.app.settings.max_answer_bytes,
                        watch_end=True,
                    )
                    if delivery is None:  # the group was replaced while idle: come back as a new consumer
                        await self.join()
                        continue
                    if delivery.frames:
                        await self._send_all(delivery.frames, send)
                        claim = False
                        continue
                    ending = await self._at_end(delivery.end, send)
                    woken = await waiter.wait(ENDING_RECHECK_SECONDS if ending else IDLE_RECHECK_SECONDS)
                    claim = waiter.lapsed or not woken
                    waiter.lapsed = False

    def stop(self) -> None:
        """The connection is gone: deliver nothing more. Beside cancelling the loop's task, because a cancellation
        that comes as the task is woken can be lost on its way (seen on Python 3.11), and a loop that went on
        would take items for a client that is gone after they were released."""
        self._stopped = True
        if self._waiter is not None:
            self._waiter.event.set()

    async def _at_end(self, end: EndOfStream | None, send: Callable[[DataFrame], Awaitable[None]]) -> bool:
        """Send the end-of-stream frame once the end is reached; True while the queue is ending (not reached)."""
        if end is None:
            return False
        if end.reached and end.index != self._end_sent:
            self._end_sent = end.index
            tags = {END_OF_STREAM_TAG: "true"}
            await send(DataFrame(index=0, tags=tags, data=b"", message=f"end of stream after index {end.index}"))
        return not end.reached

    async def _send_all(self, frames: list[DataFrame], send: Callable[[DataFrame], Awaitable[None]]) -> None:
        sent: list[int] = []
        try:
            for frame in frames:
                if self._stopped:
                    break
                if self.req.index_only:
                    frame.data = b""
                await send(frame)
                sent.append(frame.index)
        finally:
            if self.req.auto_commit and sent:
                # Committed once on the wire; a frame the connection refused stays held, then is released.
                await asyncio.shield(self.store.remove(self.req.queue, sent, self.req.group))

    async def _held(self) -> int:
        due = time.monotonic() - self._last_renew >= LEASE_MS / 3000
        if due:
            self._last_renew = time.monotonic()
        return await self.store.held(
            self.req.queue,
            group=self.req.group,
            consumer=self.stream_consumer,
            mode="renew" if due else "count",
            most=self.req.window * 4,
        )

    async def release(self) -> None:
        """Hand back what this consumer holds: another consumer of the group may take it now."""
        await self.store.held(
            self.req.queue,
            group=self.req.group,
            consumer=self.stream_consumer,
            mode="release",
            most=self.req.window * 4,
        )


async def watch(websocket: WebSocket, queue: QueueName) -> None:
    app = app_of(websocket)
    try:
        service = find_service(websocket, app)
    except ApiError as exc:
        # Refuse the handshake: the client sees the HTTP status and the JSON reason.
        await websocket.send_denial_response(error_response(exc.status, exc.detail))
        return
    try:
        group, consumer = identity(websocket)
        request = watch_request(Params(websocket.query_params), QueueKeys(service.name, queue), group, consumer)
        watcher = Watcher(app, request)
        await watcher.join()
    except ApiError as exc:
        await _refuse(websocket, POLICY_VIOLATION, exc.detail)
        return
    except TooManyGroups as exc:
        await _refuse(websocket, TRY_AGAIN_LATER, str(exc))
        return
    await websocket.accept()

    async def send(frame: DataFrame) -> None:
        await websocket.send_bytes(encode_frame(frame))

    async def until_disconnect() -> None:
        while (await websocket.receive())["type"] != "websocket.disconnect":
            pass

    failed = await serve(watcher, send, until_disconnect, f"{service.name}/{queue}")
    with contextlib.suppress(Exception):
        await websocket.close(INTERNAL_ERROR if failed else 1000)


async def http_watch(request: Request, call: QueueCall) -> Response:
    """The watch over plain HTTP: a 200 answer that streams length-prefixed frames until the client leaves."""
    group, consumer = identity(request)
    watcher = Watcher(call.app, watch_request(call.params, call.qk, group, consumer))
    await watcher.join()  # TooManyGroups: 429 before any frame
    return FrameStream(watcher, f"{call.service.name}/{call.queue}")


class FrameStream(Response):
    """Streams a watch's frames, each after its length as 4 bytes big-endian (the Go client's framing)."""

    media_type = PROTOBUF_MEDIA_TYPE

    def __init__(self, watcher: Watcher, name: str) -> None:
        self.watcher = watcher
        self.name = name
        self.status_code = 200
        self.background = None
        self.init_headers({"content-type": PROTOBUF_MEDIA_TYPE, "cache-control": "no-store"})

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": self.raw_headers})
        # An empty chunk sends the headers now: the client's request returns before the first item comes.
        await send({"type": "http.response.body", "body": b"", "more_body": True})

        async def send_frame(frame: DataFrame) -> None:
            encoded = encode_frame(frame)
            body = struct.pack(">I", len(encoded)) + encoded
            await send({"type": "http.response.body", "body": body, "more_body": True})

        async def until_disconnect() -> None:
            while (await receive())["type"] != "http.disconnect":
                pass

        await serve(self.watcher, send_frame, until_disconnect, self.name)
        with contextlib.suppress(Exception):
            await send({"type": "http.response.body", "body": b"", "more_body": False})


async def serve(
    watcher: Watcher,
    send: Callable[[DataFrame], Awaitable[None]],
    until_disconnect: Callable[[], Coroutine[Any, Any, None]],
    name: str,
) -> bool:
    """Run the delivery loop until the client leaves (or the loop fails: True), then release what it holds."""
    store, qk = watcher.store, watcher.req.queue
    with contextlib.suppress(redis.exceptions.RedisError):
        await store.consumer_joined(qk, watcher.consumer)
    sender = asyncio.create_task(watcher.run(send))
    receiver = asyncio.create_task(until_disconnect())
    failed = False
    try:
        done, _ = await asyncio.wait({sender, receiver}, return_when=asyncio.FIRST_COMPLETED)
        if sender in done and not sender.cancelled():
            problem = sender.exception()
            if problem is not None and not isinstance(problem, WebSocketDisconnect | OSError):
                level = logging.WARNING if isinstance(problem, redis.exceptions.RedisError) else logging.ERROR
                log.log(level, "watch of %s ended: %r", name, problem)
                failed = True
    finally:
        watcher.stop()
        for task in (sender, receiver):
            task.cancel()

        async def release() -> None:
            # The sender stops first: an item it took meanwhile would stay held until its lease lapsed.
            await asyncio.wait({sender, receiver}, timeout=STOP_WAIT_SECONDS)
            if not sender.done():
                log.warning("watch of %s: its sender did not stop within %g s", name, STOP_WAIT_SECONDS)
            await watcher.release()
            await store.consumer_left(qk, watcher.consumer)

        with contextlib.suppress(Exception):
            await asyncio.shield(release())
    return failed


async def _refuse(websocket: WebSocket, code: int, reason: str) -> None:
    await websocket.accept()
    encoded = reason.encode()[:MAX_REASON_BYTES].decode(errors="ignore")
    await websocket.close(code, reason=encoded)
