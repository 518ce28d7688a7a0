"""Raw HTTP/1.1 over asyncio sockets: requests as hostile clients send them, without an HTTP library's manners.

httpx would read the whole answer, send the whole body and cost too much per connection for
floods of a thousand clients; these helpers write bytes and read one answer, nothing more.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit


@dataclass(frozen=True)
class RawAnswer:
    status: int
    headers: dict[str, str]  # names in lower case
    body: bytes
    seconds: float  # from the call of read_answer to the end of the answer

    def json(self) -> Any:
        return json.loads(self.body)

    def detail(self) -> str:
        """The `detail` of a JSON error body, or "" when the body is not one."""
        try:
            value = self.json()
        except ValueError:
            return ""
        return str(value.get("detail", "")) if isinstance(value, dict) else ""

    def __str__(self) -> str:
        return f"{self.status} {self.body[:200]!r} after {self.seconds:.1f} s"


def host_port(base_url: str) -> tuple[str, int]:
    parts = urlsplit(base_url)
    assert parts.hostname and parts.port, base_url
    return parts.hostname, parts.port


def request_head(method: str, target: str, host: str, headers: Mapping[str, str] | None = None) -> bytes:
    """The request line and headers of one HTTP/1.1 request, ending with the blank line."""
    lines = [f"{method} {target} HTTP/1.1", f"Host: {host}", *(f"{k}: {v}" for k, v in (headers or {}).items())]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


async def read_answer(reader: asyncio.StreamReader, timeout: float) -> RawAnswer | None:
    """The next answer on `reader`, or None when it is not complete within `timeout` s or the connection ends."""
    started = time.monotonic()
    try:
        async with asyncio.timeout(timeout):
            head = await reader.readuntil(b"\r\n\r\n")
            status_line, *lines = head.decode("latin-1").split("\r\n")
            headers = {}
            for line in lines:
                name, sep, value = line.partition(":")
                if sep:
                    headers[name.strip().lower()] = value.strip()
            length = int(headers.get("content-length", "0"))
            body = await reader.readexactly(length) if length else b""
    except (TimeoutError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, ConnectionError):
        return None
    return RawAnswer(int(status_line.split()[1]), headers, body, time.monotonic() - started)


async def close(writer: asyncio.StreamWriter) -> None:
    """Leave: close the connection; a reset from a server that left first is no error of the test."""
    writer.close()
    with contextlib.suppress(TimeoutError, ConnectionError, OSError):
        await asyncio.wait_for(writer.wait_closed(), 5)
