"""The synchronous path: put into the same bounded input queue, wait for the worker's answer.

The whole request is bounded by `metadata.rpc.keepalive` (queue wait included). On expiry, or
when the client leaves, a request that no worker has taken yet is withdrawn from the queue;
one that has started finishes, and its answer expires unread in its reply list (never in the
sink).
"""

from __future__ import annotations

import time

from fastapi import Request, Response
from redis.asyncio import Redis

from queue_service import keys
from queue_service.config import ServiceConfig
from queue_service.consumer import decode_reply
from queue_service.errors import ApiError
from queue_service.queues import Queues

# How often a waiting sync request looks whether its client is still there.
DISCONNECT_CHECK_SECONDS = 0.5
# Redis truncates a BLPOP timeout to whole milliseconds and reads 0 as "block forever".
MIN_BLOCK_SECONDS = 0.01
CLIENT_CLOSED = 499


class SyncCaller:
    def __init__(self, redis: Redis, queues: Queues) -> None:
        self.redis = redis
        self.queues = queues

    async def call(self, request: Request, service: ServiceConfig, body: bytes) -> Response:
        # Keepalive covers the whole request: reading the body and admission count too.
        received_at = getattr(request.state, "received_at", None) or time.monotonic()
        deadline = received_at + service.rpc.keepalive / 1000
        if await self.queues.live_workers(service.name) == 0:
            raise ApiError(503, f"no healthy upstream: no live worker serves service {service.name!r}")
        put = await self.queues.put(service, "input", body, {}, sync_reply=True)  # QueueFull: 450
        request.state.request_id = put.request_id
        reply_key = keys.sync_reply(service.name, put.request_id)
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                withdrawn = await self.queues.withdraw(service.name, put.index)
                request.state.log_extra = {"withdrawn": withdrawn}
                raise ApiError(
                    408,
                    f"request took longer than metadata.rpc.keepalive={service.rpc.keepalive}ms"
                    + ("; withdrawn from the queue before any worker started it" if withdrawn else ""),
                    {"Connection": "close"},
                )
            popped = await self.redis.blpop(
                [reply_key], timeout=max(MIN_BLOCK_SECONDS, min(left, DISCONNECT_CHECK_SECONDS))
            )
            if popped is not None:
                reply = decode_reply(popped[1])
                request.state.log_extra = {
                    "queue_wait_ms": round(reply.queue_wait * 1000, 2),
                    "processing_ms": round(reply.processing * 1000, 2),
                }
                outcome = reply.outcome
                return Response(outcome.body, status_code=outcome.status, media_type=outcome.content_type)
            if await request.is_disconnected():
                withdrawn = await self.queues.withdraw(service.name, put.index)
                request.state.final_status = CLIENT_CLOSED
                request.state.log_extra = {"withdrawn": withdrawn}
                return Response(status_code=CLIENT_CLOSED)
