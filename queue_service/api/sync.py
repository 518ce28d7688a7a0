"""The synchronous path: put into the same bounded input queue, wait for the worker's answer.

The whole request is bounded by `metadata.rpc.keepalive` (queue wait included). The answer comes back on
this API process's reply stream, which one reader per service reads for every sync request of the process
(`waiters.py`): a waiting request holds no Redis connection. On expiry, or when the client leaves, a
request that no worker has taken yet is withdrawn from the queue; one that has started finishes, and its
answer is dropped (it never reaches the sink).
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

from starlette.requests import Request
from starlette.responses import Response

from queue_service.api.disconnect import ClientGone
from queue_service.api.errors import ApiError
from queue_service.api.preamble import QueueCall
from queue_service.api.waiters import ServiceWaiters
from queue_service.protocol import CLIENT_CLOSED
from queue_service.store.model import NoLiveWorker, PutResult
from queue_service.store.queues import new_request_id

# How often a sync put looks whether a worker is live, while one was (see put_for_reply).
LIVE_LOOK_SECONDS = 1.0


async def put_for_reply(request: Request, call: QueueCall, request_id: str, path: str) -> PutResult:
    """Put a sync request: its answer goes to this process's reply stream (503 when no live worker serves it).

    Whether a worker is live is a fact of seconds (a worker counts live until its heartbeat lapses, 5 s), so
    the put looks at most once a second while workers are seen: one Redis command less per request."""
    name, now = call.service.name, time.monotonic()
    check_live = now - call.app.workers_seen.get(name, -LIVE_LOOK_SECONDS) >= LIVE_LOOK_SECONDS
    try:
        put = await call.app.store.put(
            call.qk,
            call.body,
            {},
            max_items=call.service.rpc.max_queue_size,
            reply_channel=call.app.channel,
            check_live=check_live,
            request_id=request_id,
            content_type=request.headers.get("content-type", ""),
            path=path,
        )
    except NoLiveWorker:
        call.app.workers_seen.pop(name, None)
        raise ApiError(503, f"no healthy upstream: no live worker serves service {name!r}") from None
    if check_live:
        call.app.workers_seen[name] = now
    return put


async def admit(request: Request, call: QueueCall) -> tuple[float, str, ServiceWaiters]:
    """A sync request past the rate limit: its deadline (monotonic), its new request id, its service's waiters."""
    # Keepalive covers the whole request: reading the body and admission count too.
    received_at = getattr(request.state, "received_at", None) or time.monotonic()
    deadline = received_at + call.service.rpc.keepalive / 1000
    await call.app.rate.admit(call.service)
    request_id = new_request_id()
    request.state.request_id = request_id
    return deadline, request_id, call.app.waiters.of(call.qk)


async def call(request: Request, call: QueueCall, path: str = "") -> Response:
    app, service = call.app, call.service
    deadline, request_id, waiters = await admit(request, call)
    answer = waiters.expect_reply(request_id)  # before the put: the answer cannot come first
    gone = ClientGone(request.receive)
    try:
        put = await put_for_reply(request, call, request_id, path)
        left_client: asyncio.Future[Any] = asyncio.ensure_future(gone.wait())
        waits: set[asyncio.Future[Any]] = {answer, left_client}
        try:
            await asyncio.wait(waits, timeout=max(0.0, deadline - time.monotonic()), return_when="FIRST_COMPLETED")
        finally:
            left_client.cancel()
        if answer.done():
            reply = answer.result()
            request.state.log_extra = {
                "queue_wait_ms": round(reply.queue_wait * 1000, 2),
                "processing_ms": round(reply.processing * 1000, 2),
            }
            outcome = reply.outcome
            return Response(outcome.body, status_code=outcome.status, media_type=outcome.content_type)
        withdrawn = await app.store.withdraw(service.name, put.index)
        request.state.log_extra = {"withdrawn": withdrawn}
        if gone.gone:
            request.state.final_status = CLIENT_CLOSED
            return Response(status_code=CLIENT_CLOSED)
        raise ApiError(
            408,
            f"request took longer than metadata.rpc.keepalive={service.rpc.keepalive}ms"
            + ("; withdrawn from the queue before any worker started it" if withdrawn else ""),
            {"Connection": "close"},
        )
    finally:
        waiters.drop_reply(request_id)
        await gone.aclose()
