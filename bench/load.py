"""HTTP load from the benchmark process: a lean asyncio HTTP/1.1 keep-alive client and a blocking one.

Lean on purpose: on a small machine the load generator shares the CPU with the server it measures,
and the same generator drives the API and the hello-world ceiling, so their ratio stays fair.
Every loop is bounded by a request count and a deadline.
"""

from __future__ import annotations

import asyncio
import http.client
import time
from collections import Counter
from dataclasses import dataclass, field
from urllib.parse import urlsplit


@dataclass
class LoadResult:
    requests: int = 0
    seconds: float = 0.0
    statuses: Counter = field(default_factory=Counter)
    latencies: list[float] = field(default_factory=list)

    @property
    def per_second(self) -> float:
        return self.requests / self.seconds if self.seconds else 0.0


def _request_bytes(method: str, host: str, path: str, body: bytes) -> bytes:
    head = f"{method} {path} HTTP/1.1\r\nHost: {host}\r\nContent-Length: {len(body)}\r\n"
    if body:
        head += "Content-Type: application/octet-stream\r\n"
    return (head + "\r\n").encode() + body


async def _read_response(reader: asyncio.StreamReader) -> tuple[int, bytes]:
    head = await reader.readuntil(b"\r\n\r\n")
    status = int(head[9:12])
    lower = head.lower()
    at = lower.find(b"\r\ncontent-length:")
    if at < 0:
        if b"transfer-encoding: chunked" in lower:
            raise RuntimeError("chunked responses are not supported by the bench client")
        return status, b""
    end = lower.index(b"\r\n", at + 2)
    length = int(lower[at + 17 : end])
    body = await reader.readexactly(length) if length else b""
    return status, body


async def hammer(
    url: str,
    *,
    method: str = "POST",
    body: bytes = b"",
    connections: int = 16,
    max_requests: int = 1_000_000,
    max_seconds: float = 10.0,
) -> LoadResult:
    """As many requests as answered within the bounds, over `connections` keep-alive connections."""
    parts = urlsplit(url)
    host, port = parts.hostname or "127.0.0.1", parts.port or 80
    path = parts.path + (f"?{parts.query}" if parts.query else "")
    request = _request_bytes(method, f"{host}:{port}", path, body)
    result = LoadResult()
    budget = [max_requests]
    started = time.perf_counter()
    deadline = started + max_seconds

    async def one_connection() -> None:
        reader, writer = await asyncio.open_connection(host, port)
        try:
            while budget[0] > 0 and time.perf_counter() < deadline:
                budget[0] -= 1
                sent = time.perf_counter()
                writer.write(request)
                status, _ = await _read_response(reader)
                result.latencies.append(time.perf_counter() - sent)
                result.statuses[status] += 1
                result.requests += 1
        finally:
            writer.close()

    await asyncio.gather(*(one_connection() for _ in range(connections)))
    result.seconds = time.perf_counter() - started
    return result


class Http:
    """A blocking keep-alive HTTP/1.1 connection (one per thread)."""

    def __init__(self, base_url: str, timeout: float = 30.0) -> None:
        parts = urlsplit(base_url)
        self.conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=timeout)

    def request(self, method: str, path: str, body: bytes = b"") -> tuple[int, dict[str, str], bytes]:
        self.conn.request(method, path, body=body, headers={"Content-Type": "application/octet-stream"})
        response = self.conn.getresponse()
        data = response.read()
        return response.status, {k.lower(): v for k, v in response.getheaders()}, data

    def close(self) -> None:
        self.conn.close()
