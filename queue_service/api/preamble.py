"""The preamble every queue operation runs first: find the service, check the token, parse the query, read the body.

In that order, so that a client without the token is refused before its body is read (the signed form,
whose signature covers the body, is checked once the body is in), and a body that trickles in is cut off
at a deadline (408). The consumer identity headers (group, consumer id) are checked here too.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from starlette.requests import HTTPConnection, Request

from queue_service.api.auth import check_authorization, check_before_body
from queue_service.api.context import App, app_of
from queue_service.api.errors import ApiError
from queue_service.api.params import KNOWN_CONTROLS, Params
from queue_service.config import ServiceConfig
from queue_service.protocol import DEFAULT_GROUP, GID_HEADER, UID_HEADER
from queue_service.store import keys
from queue_service.store.keys import RESERVED_PREFIX, QueueKeys, QueueName

# Group names and consumer ids: what the official clients send (a name, a UUID), nothing that could be
# mistaken for a key or a command, and never our own names (the workers' group, the workers' ids).
IDENTITY = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.:@-]{0,63}")


@dataclass(slots=True)
class QueueCall:
    """One queue request after the preamble."""

    app: App
    service: ServiceConfig
    queue: QueueName
    qk: QueueKeys
    params: Params
    body: bytes


async def queue_call(
    request: Request,
    queue: QueueName,
    *,
    allowed: Iterable[str] = KNOWN_CONTROLS,
    with_body: bool = False,
    check: Callable[[Params], object] | None = None,
) -> QueueCall:
    """The preamble; `check` validates the parameters further before the body is read."""
    app = app_of(request)
    service = find_service(request, app)
    params = Params(request.query_params, allowed)
    if check is not None:
        check(params)
    body = b""
    if with_body:
        body = await read_body(request, service.max_payload_bytes, app.settings.body_timeout_seconds)
    authorize_signed(request, app, service, body)
    return QueueCall(app, service, queue, keys.queue_keys(service.name, queue), params, body)


def find_service(connection: HTTPConnection, app: App) -> ServiceConfig:
    """The service of the path (404), its token checked as far as it can be without the body (401)."""
    service = app.service(connection.path_params["service_name"])
    problem = check_before_body(service.token, connection.headers)
    if problem:
        raise ApiError(401, problem)
    return service


def authorize_signed(connection: HTTPConnection, app: App, service: ServiceConfig, body: bytes) -> None:
    """The full token check, signed form included (its signature covers the body)."""
    if not service.token:
        return
    problem = check_authorization(
        service.token,
        connection.headers,
        method=connection.scope.get("method", "GET"),
        path=connection.url.path,
        body=body,
        max_skew_seconds=app.settings.max_clock_skew_seconds,
    )
    if problem:
        raise ApiError(401, problem)


async def read_body(request: Request, limit: int, timeout: float) -> bytes:
    """The body, refused with 413 once it is known to exceed `limit` bytes, and 408 if it takes over `timeout` s."""
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > limit:
        raise ApiError(413, f"body of {declared} bytes is over this service's limit of {limit} bytes")
    chunks, size = [], 0
    try:
        async with asyncio.timeout(timeout):
            async for chunk in request.stream():
                size += len(chunk)
                if size > limit:
                    raise ApiError(413, f"body is over this service's limit of {limit} bytes")
                chunks.append(chunk)
    except TimeoutError:
        raise ApiError(
            408,
            f"the request body did not arrive within {timeout:g} s ({size} bytes received)",
            {"Connection": "close"},
        ) from None
    return b"".join(chunks)


def identity(connection: HTTPConnection) -> tuple[str, str]:
    """The caller's consumer group and consumer id (from the official clients' headers), validated."""
    group = _identity_header(connection, GID_HEADER) or DEFAULT_GROUP
    consumer = _identity_header(connection, UID_HEADER)
    return group, consumer


def _identity_header(connection: HTTPConnection, name: str) -> str:
    value = connection.headers.get(name, "")
    if not value:
        return ""
    if not IDENTITY.fullmatch(value):
        raise ApiError(400, f"{name} must be 1-64 of A-Z a-z 0-9 _ . : @ - starting with a letter or digit")
    if value.startswith(RESERVED_PREFIX):
        raise ApiError(400, f"{name}: names starting with {RESERVED_PREFIX!r} are reserved for the service itself")
    return value
