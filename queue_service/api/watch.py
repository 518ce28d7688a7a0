"""Watch: deliver a queue's items to one consumer of a client consumer group, within a window.

Consumers of one group share the items (each item to one consumer); each group sees every item. A consumer
holds at most `window` items delivered and not committed; a commit frees a place. Items a consumer holds
carry a lease that the watch renews while the connection lives; when it closes they are released at once,
and a crashed API's leases lapse, so another consumer of the group gets them. An idle watch costs Redis
nothing: it waits on this process's reader of its service (`waiters.py`), which also tells it when an item
of its group lapsed.

WebSocket answers: a missing or wrong token, or an unknown service, refuse the handshake with the HTTP
status (401, 404); a malformed request is accepted and closed with 1008 and the reason; too many consumer
groups on the queue closes with 1013 (try again later); an internal fault closes with 1011.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field

import redis.exceptions
from starlette.websockets import WebSocket, WebSocketDisconnect

from queue_service.api.context import App, app_of
from queue_service.api.errors import ApiError, error_response
from queue_service.api.params import MAX_WINDOW, Params
from queue_service.api.preamble import find_service, identity
from queue_service.store.keys import QueueKeys, QueueName
from queue_service.store.model import DataFrame, TooManyGroups
from queue_service.wire import encode_frame

log = logging.getLogger("queue_service.api.watch")

LEASE_MS = 10_000
# A group none of whose consumers was seen this long may be replaced by a new group (queue.max_groups).
GROUP_IDLE_MS = 15_000
# How long an idle watch waits for a wake-up before it looks again itself (a safety net).
IDLE_RECHECK_SECONDS = 30.0
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
            with waiters.in_group(qk.queue, req.group, LEASE_MS, waiter):
                claim = True  # items left by consumers gone before this one came
                while True:
                    held = 0 if req.auto_commit else await self._held()
                    free = req.window - held
                    if free <= 0:
                        await waiter.wait(FULL_WINDOW_RECHECK_SECONDS)
                        continue
                    frames = await self.store.deliver(
                        qk,
                        group=req.group,
                        consumer=req.consumer,
                        want=free,
                        lease_ms=LEASE_MS if claim else 0,
                        tags=req.tags,
                        max_bytes=self.app.settings.max_answer_bytes,
                    )
                    if frames is None:  # the group was replaced while idle: come back as a new consumer
                        await self.join()
                        continue
                    if frames:
                        await self._send_all(frames, send)
                        claim = False
                        continue
                    woken = await waiter.wait(IDLE_RECHECK_SECONDS)
                    claim = waiter.lapsed or not woken
                    waiter.lapsed = False

    async def _send_all(self, frames: list[DataFrame], send: Callable[[DataFrame], Awaitable[None]]) -> None:
        sent: list[int] = []
        try:
            for frame in frames:
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
            consumer=self.req.consumer,
            mode="renew" if due else "count",
            most=self.req.window * 4,
        )

    async def release(self) -> None:
        """Hand back what this consumer holds: another consumer of the group may take it now."""
        await self.store.held(
            self.req.queue, group=self.req.group, consumer=self.req.consumer, mode="release", most=self.req.window * 4
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
    await serve(websocket, watcher, f"{service.name}/{queue}")


async def serve(websocket: WebSocket, watcher: Watcher, name: str) -> None:
    async def send(frame: DataFrame) -> None:
        await websocket.send_bytes(encode_frame(frame))

    async def until_disconnect() -> None:
        while (await websocket.receive())["type"] != "websocket.disconnect":
            pass

    sender = asyncio.create_task(watcher.run(send))
    receiver = asyncio.create_task(until_disconnect())
    close_code = 1000
    try:
        done, _ = await asyncio.wait({sender, receiver}, return_when=asyncio.FIRST_COMPLETED)
        if sender in done and not sender.cancelled():
            problem = sender.exception()
            if problem is not None and not isinstance(problem, WebSocketDisconnect | OSError):
                level = logging.WARNING if isinstance(problem, redis.exceptions.RedisError) else logging.ERROR
                log.log(level, "watch of %s ended: %r", name, problem)
                close_code = INTERNAL_ERROR
    finally:
        for task in (sender, receiver):
            task.cancel()

        async def release() -> None:
            # The sender stops first: an item it took meanwhile would stay held until its lease lapsed.
            await asyncio.wait({sender, receiver}, timeout=STOP_WAIT_SECONDS)
            await watcher.release()

        with contextlib.suppress(Exception):
            await asyncio.shield(release())
        with contextlib.suppress(Exception):
            await websocket.close(close_code)


async def _refuse(websocket: WebSocket, code: int, reason: str) -> None:
    await websocket.accept()
    encoded = reason.encode()[:MAX_REASON_BYTES].decode(errors="ignore")
    await websocket.close(code, reason=encoded)
