"""What the client raises: one class per answer a caller may want to handle, all of them `ClientError`."""

from __future__ import annotations

import httpx

from queue_service.protocol import QUEUE_FULL, TOO_MANY_REQUESTS


class ClientError(Exception):
    """A call that did not succeed."""


class Unreachable(ClientError):
    """The API could not be reached (connection refused, reset, timed out)."""


class RequestFailed(ClientError):
    """The API answered with an error status; `status` and the server's `detail`."""

    def __init__(self, status: int, detail: str, retry_after: float | None = None) -> None:
        super().__init__(f"{status} {detail}")
        self.status = status
        self.detail = detail
        self.retry_after = retry_after


class QueueFull(RequestFailed):
    """450: the queue is full (retried by default)."""


class RateLimited(RequestFailed):
    """429: over the service's rate limit or the API's open-wait bounds (retried by default)."""


class Unavailable(RequestFailed):
    """503: no live worker (sync), or the API cannot reach Redis (retried by default)."""


class NotFound(RequestFailed):
    """404: no such service, path or request id."""


_BY_STATUS: dict[int, type[RequestFailed]] = {
    QUEUE_FULL: QueueFull,
    TOO_MANY_REQUESTS: RateLimited,
    503: Unavailable,
    404: NotFound,
}


def raise_for(response: httpx.Response) -> None:
    """Raise the error an error answer means; nothing for a success."""
    if response.status_code < 400:
        return
    try:
        detail = str(response.json().get("detail") or "")
    except (ValueError, AttributeError):
        detail = ""
    detail = detail or response.text.strip()[:500]
    raw = response.headers.get("retry-after", "")
    retry_after = float(raw) if raw.replace(".", "", 1).isdigit() else None
    raise _BY_STATUS.get(response.status_code, RequestFailed)(response.status_code, detail, retry_after)
