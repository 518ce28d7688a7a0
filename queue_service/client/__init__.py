"""The Python client of queue-service: `Client` (sync) and `AsyncClient` (asyncio), over httpx.

    from queue_service.client import Client

    with Client("http://127.0.0.1:8000", "echo", token="...") as client:
        submitted = client.put(b"hello", webhook="https://example.com/hook")
        result = client.result(submitted.request_id, wait=30)
        print(result.text)

Puts, reads and status calls that meet 429, 450 or 503 are tried again with bounded exponential backoff and
jitter, honouring Retry-After (`RetryPolicy`); a put carries an Idempotency-Key so that a retry after a lost
answer stores nothing twice.
"""

from queue_service.client.aio import AsyncClient
from queue_service.client.errors import (
    ClientError,
    NotFound,
    QueueFull,
    RateLimited,
    RequestFailed,
    Unavailable,
    Unreachable,
)
from queue_service.client.retrying import RetryPolicy
from queue_service.client.sync import Client
from queue_service.client.types import Chunk, Done, Progress, Restart, Result, Status, StreamEvent, Submitted

__all__ = [
    "AsyncClient",
    "Chunk",
    "Client",
    "ClientError",
    "Done",
    "NotFound",
    "Progress",
    "QueueFull",
    "RateLimited",
    "RequestFailed",
    "Restart",
    "Result",
    "RetryPolicy",
    "Status",
    "StreamEvent",
    "Submitted",
    "Unavailable",
    "Unreachable",
]
