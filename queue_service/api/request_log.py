"""RequestLog: every HTTP request gets a request id header and exactly one JSON log line.

The line carries the final status code, 499 included (a sync request whose client left).
Routes that create a queue item set `request.state.request_id` so the log and the header use
the item's own id. `request.state.received_at` is when the request arrived (monotonic clock):
the sync path's keepalive counts from there.

A WebSocket (watch) is a request too: its handshake answer carries the header, and its line is
written when it ends, with 101 if it was accepted, else the status it was refused with.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable

from starlette.datastructures import MutableHeaders
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from queue_service.protocol import REQUEST_ID_HEADER
from queue_service.store.queues import new_request_id

log = logging.getLogger("queue_service.access")
SWITCHING_PROTOCOLS = 101
HANDSHAKE_REFUSED = 403
# The messages that start an answer: an HTTP response, a WebSocket accept or handshake refusal.
_ANSWERS = frozenset({"http.response.start", "websocket.accept", "websocket.http.response.start"})


class RequestLog:
    """`on_done(record)` is called with each request's log record (metrics count from it)."""

    def __init__(self, app: ASGIApp, on_done: Callable[[dict], None] | None = None) -> None:
        self.app = app
        self.on_done = on_done

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        started = time.monotonic()
        websocket = scope["type"] == "websocket"
        method = "GET" if websocket else scope["method"]
        state = scope.setdefault("state", {})
        if "request_id" not in state:
            state["request_id"] = new_request_id()
        state.setdefault("received_at", started)
        status = 500

        async def send_with_id(message: Message) -> None:
            nonlocal status
            if message["type"] in _ANSWERS:
                status = message.get("status", SWITCHING_PROTOCOLS)
                message.setdefault("headers", [])
                headers = MutableHeaders(scope=message)
                if REQUEST_ID_HEADER.lower() not in headers:
                    headers[REQUEST_ID_HEADER] = state["request_id"]
            elif message["type"] == "websocket.close" and status == 500:
                status = HANDSHAKE_REFUSED  # closed before accepting: the server refuses the handshake
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        finally:
            # A route that saw its client leave records 499 (nothing could be sent).
            status = state.get("final_status", status)
            path = scope["path"]
            # The router leaves what it matched in the scope: the service is the route's, not re-parsed.
            service = scope.get("path_params", {}).get("service_name", "")
            record = {
                "request_id": state["request_id"],
                "method": method,
                "path": path,
                "service": service,
                "operation": state.get("operation", "watch" if websocket else method.lower()),
                "status": status,
                "duration_ms": round((time.monotonic() - started) * 1000, 2),
            }
            record.update(state.get("log_extra", {}))
            log.info(json.dumps(record))
            if self.on_done is not None:
                self.on_done(record)
