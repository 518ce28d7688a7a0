"""The queue protocol's calls as requests and answers, without I/O: what the sync and async clients share.

Each call is a `Call` (method, path, query, headers, body, how long the server may wait) and a parser of its
answer; `Client` and `AsyncClient` only send them. Paths and names are the API's (README "The queue API").
"""

from __future__ import annotations

import base64
import json
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote

import httpx
from httpx_sse import ServerSentEvent

from queue_service.client.errors import raise_for
from queue_service.client.types import Chunk, Done, Progress, Restart, Result, Status, StreamEvent, Submitted
from queue_service.protocol import INDEX_HEADER, LAST_CODE_HEADER, REQUEST_ID_HEADER

# The server's longest long poll (params.MAX_TIMEOUT_SECONDS); longer waits are several polls.
LONGEST_POLL_SECONDS = 600.0
# How long an answer may take beyond what the server was asked to wait.
ANSWER_MARGIN_SECONDS = 10.0
PUT_INDEX_HEADER = "X-Queueservice-Put-Index"


def queue_path(service: str, sink: bool = False) -> str:
    return f"/api/predict/{quote(service, safe='')}" + ("/sink" if sink else "")


def duration(seconds: float) -> str:
    return f"{round(seconds * 1000)}ms"


@dataclass(frozen=True, slots=True)
class Call:
    method: str
    path: str
    params: dict[str, str] = field(default_factory=dict)
    headers: dict[str, str] = field(default_factory=dict)
    content: bytes | None = None
    server_wait: float = 0.0

    def timeout(self, base: float) -> httpx.Timeout:
        return httpx.Timeout(base, read=self.server_wait + base + ANSWER_MARGIN_SECONDS)


def put(
    service: str,
    data: bytes,
    *,
    tags: Mapping[str, str] | None = None,
    priority: bool = False,
    webhook: str | None = None,
    webhook_events: list[str] | None = None,
    ttl: float | str | None = None,
    idempotency_key: str | None = None,
    wait: float | None = None,
    content_type: str | None = None,
) -> Call:
    params = dict(tags or {})
    if priority:
        params["_priority_"] = "1"
    if webhook:
        params["_webhook_"] = webhook
    if webhook_events:
        params["_webhook_events_"] = ",".join(webhook_events)
    if ttl is not None:
        params["_ttl_"] = ttl if isinstance(ttl, str) else duration(ttl)
    # A put is retried on 450/429/503 and lost connections: the key makes a retry after a lost answer store
    # nothing twice (the server answers the first put's index and request id).
    headers = {"Idempotency-Key": idempotency_key or f"qs-client-{uuid.uuid4()}"}
    if wait is not None:
        headers["Prefer"] = f"wait={wait:g}"
    if content_type:
        headers["Content-Type"] = content_type
    return Call("POST", queue_path(service), params, headers, data, server_wait=wait or 0.0)


def submitted(response: httpx.Response) -> Submitted:
    raise_for(response)
    request_id = response.headers.get(REQUEST_ID_HEADER, "")
    if response.status_code == 202 or "preference-applied" not in response.headers:
        return Submitted(int(response.text), request_id)
    result = result_of(response, request_id)
    return Submitted(int(response.headers.get(PUT_INDEX_HEADER, "0")), request_id, result)


def result(service: str, request_id: str, wait: float, keep: bool) -> Call:
    params = {
        "requestId": request_id,
        "_raw_": "true",
        "_timeout_": duration(min(wait, LONGEST_POLL_SECONDS)),
        "_auto_delete_": "false" if keep else "true",
    }
    return Call("GET", queue_path(service, sink=True), params, server_wait=min(wait, LONGEST_POLL_SECONDS))


def result_of(response: httpx.Response, request_id: str) -> Result | None:
    raise_for(response)
    if response.status_code == 204:
        return None
    return Result(
        request_id=response.headers.get(REQUEST_ID_HEADER, request_id),
        index=int(response.headers.get(INDEX_HEADER, "0")),
        data=response.content,
        status=int(response.headers.get(LAST_CODE_HEADER) or 200),
    )


def status(service: str, request_id: str) -> Call:
    return Call("GET", queue_path(service), {"requestId": request_id, "_status_": "true"})


def status_of(response: httpx.Response) -> Status:
    raise_for(response)
    return Status.from_json(response.json())


def delete(service: str, index: int, sink: bool = False) -> Call:
    return Call("DELETE", queue_path(service, sink), {"_indexes_": str(index)})


def commit(service: str, index: int, sink: bool = True) -> Call:
    return Call("PUT", queue_path(service, sink), {"_indexes_": str(index)})


def attributes(service: str, sink: bool = False) -> Call:
    return Call("GET", queue_path(service, sink), {"_attrs_": "true"})


def readiness(api_only: bool = False) -> Call:
    return Call("GET", "/readyz", {"scope": "api"} if api_only else {})


def stream(service: str, request_id: str) -> Call:
    return Call("GET", queue_path(service, sink=True), {"requestId": request_id, "_stream_": "true"})


def stream_event(sse: ServerSentEvent) -> StreamEvent | None:
    """One SSE event of a request's stream (progress, chunk, restart, done); None for others."""
    if sse.event == "chunk":
        return Chunk(chunk_bytes(sse.data), sse.id or "")
    if sse.event == "restart":
        body = _json(sse.data)
        return Restart(int(body.get("delivery", 0)) if isinstance(body, dict) else 0, sse.id or "")
    if sse.event == "progress":
        body = _json(sse.data)
        fraction = body.get("fraction", body.get("progress")) if isinstance(body, dict) else None
        message = str(body.get("message", "")) if isinstance(body, dict) else ""
        return Progress(float(fraction) if isinstance(fraction, int | float) else None, message, body, sse.id or "")
    if sse.event == "done":
        body = _json(sse.data)
        found = body if isinstance(body, dict) else {}
        code = found.get("status") or found.get("statusCode") or found.get("lastCode") or 200
        return Done(int(code), str(found.get("message", "")), body, sse.id or "")
    return None


def chunk_bytes(data: str) -> bytes:
    """A chunk event's data as the chunk's bytes: the API sends `{"text": ...}`, `{"base64": ...}` or
    `{"json": ...}` (api/stream.py); a JSON chunk is its JSON text and a newline, as in the joined result."""
    body = _json(data)
    if not isinstance(body, dict):
        return data.encode()
    if "text" in body:
        return str(body["text"]).encode()
    if "base64" in body:
        return base64.b64decode(str(body["base64"]))
    return json.dumps(body.get("json"), ensure_ascii=False, separators=(",", ":")).encode() + b"\n"


def _json(data: str) -> Any:
    try:
        return json.loads(data)
    except ValueError:
        return data
