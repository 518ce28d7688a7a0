"""Upstream: the built-in processor that forwards each item to an HTTP model server (a service's `upstream`).

    - name: llm
      upstream: {url: "http://127.0.0.1:8000", health: "/health", timeout: 600}
      metadata: {rpc: {worker_threads: 8}}

Each item is one `POST <url>[/<sub-path>]` with the item's body and Content-Type, on `worker_threads`
kept-alive connections per worker process (httpx): the upstream's status and body
are the result (a non-2xx status is kept, and tagged `lastCode`). Connection errors and timeouts are tried
again `retries` times with a doubling backoff, then the item ends with 502 (no answer) or 504 (no answer in
`timeout` seconds). A thread of its own asks `health` every `health_interval_seconds`: the worker counts
as live for the service, and takes its items, only while the upstream answers it with a 2xx.

An upstream that answers with a stream is passed through chunk by chunk (workers/streaming.py): an SSE answer
(`text/event-stream`, as vLLM's OpenAI server with `"stream": true`) gives one chunk per event, its `data`
(a JSON chunk when it parses as JSON, else text), and its result is those chunks joined (JSON Lines); a chunked
answer gives one chunk per piece received (text for a text/JSON Content-Type, else bytes), and its result is
the body as it came. Once something was streamed a failed attempt is not tried again (the client has seen
its output): it ends with 502 or 504 at once.

Forwarded: the body; `Content-Type` as the client sent it (`application/octet-stream` when it sent none);
`X-Eas-Queueservice-Request-Id`; the service's `upstream.headers`. Nothing else of the client's request is
stored, so nothing else (its token, cookies, other headers, the tags) reaches the upstream.
"""

from __future__ import annotations

import asyncio
import codecs
import json
import logging
import threading
from urllib.parse import urlsplit, urlunsplit

import httpx
from httpx_sse import EventSource

from queue_service.config import UpstreamSettings
from queue_service.protocol import REQUEST_ID_HEADER
from queue_service.store.model import OCTET_STREAM, Outcome
from workers.context import RequestContext
from workers.streaming import BYTES, JSON, TEXT, Joined, RequestStream, StreamTooLarge

log = logging.getLogger("rq.worker")
BAD_GATEWAY, GATEWAY_TIMEOUT = 502, 504
HEALTH_TIMEOUT_SECONDS = 5.0
TOO_LARGE = 413
_TEXTUAL = ("text/", "application/json", "application/x-ndjson")


class Upstream:
    """Forwards requests to `settings.url`; `connections` is how many it holds at once (worker_threads)."""

    def __init__(self, settings: UpstreamSettings, connections: int) -> None:
        self.settings = settings
        self.connections = connections
        parts = urlsplit(settings.url)
        root = urlunsplit((parts.scheme, parts.netloc, "", "", ""))
        self.health_url = root + settings.health if settings.health else ""
        self._healthy = not self.health_url
        self._clients: asyncio.Queue[httpx.AsyncClient] | None = None
        self._stop = threading.Event()
        self._checked = False

    # --- health ---------------------------------------------------------------------------------

    def initialize(self) -> None:
        """Ask once now (a server that is up makes the worker live at once), then keep asking in a thread."""
        if not self.health_url:
            return
        with httpx.Client(timeout=min(HEALTH_TIMEOUT_SECONDS, self.settings.health_interval_seconds * 5)) as client:
            self._check(client)
            threading.Thread(target=self._watch_health, name="upstream-health", daemon=True).start()

    def healthy(self) -> bool:
        return self._healthy

    def _watch_health(self) -> None:
        with httpx.Client(timeout=min(HEALTH_TIMEOUT_SECONDS, self.settings.health_interval_seconds * 5)) as client:
            while not self._stop.wait(self.settings.health_interval_seconds):
                self._check(client)

    def _check(self, client: httpx.Client) -> None:
        try:
            status = client.get(self.health_url).status_code
            healthy, why = 200 <= status < 300, f"answered {status}"
        except httpx.HTTPError as exc:
            healthy, why = False, f"{type(exc).__name__}: {exc}"
        if healthy != self._healthy or not self._checked:  # said once at start, then at each change
            if healthy:
                log.info("upstream %s is healthy", self.settings.url)
            else:
                log.warning(
                    "upstream %s is not healthy (%s %s): its items wait", self.settings.url, self.health_url, why
                )
        self._checked = True
        self._healthy = healthy

    # --- forwarding -----------------------------------------------------------------------------

    def _pool(self) -> asyncio.Queue[httpx.AsyncClient]:
        # `connections` clients of one kept-alive connection each, lent to one request at a time: httpcore's
        # own pool costs twice the CPU per request at 16 connections as at one (its lock and its scan of
        # the connections; httpx issue 3215), and a request never waits for a connection anyway (the
        # worker holds at most `connections` requests). Made on first use, inside the worker's event loop.
        if self._clients is None:
            settings = self.settings
            self._clients = asyncio.Queue()
            for _ in range(self.connections):
                self._clients.put_nowait(
                    httpx.AsyncClient(
                        timeout=httpx.Timeout(settings.timeout, connect=settings.connect_timeout),
                        limits=httpx.Limits(max_connections=1, max_keepalive_connections=1),
                    )
                )
        return self._clients

    def url_for(self, path: str) -> str:
        return f"{self.settings.url}/{path.lstrip('/')}" if path else self.settings.url

    async def process(self, data: bytes, context: RequestContext) -> Outcome:
        settings = self.settings
        url = self.url_for(context.path)
        headers = {
            "Content-Type": context.content_type or OCTET_STREAM,
            REQUEST_ID_HEADER: context.request_id,
            **settings.headers,
        }
        failure = Outcome.failure(BAD_GATEWAY, "no attempt")
        stream = context.stream if isinstance(context.stream, RequestStream) else None
        for attempt in range(settings.retries + 1):
            if attempt:
                await asyncio.sleep(settings.backoff_seconds * 2 ** (attempt - 1))
            pool = self._pool()
            client = await pool.get()
            try:
                # The whole attempt is bounded: httpx's read timeout is per read, a trickling upstream resets it.
                async with asyncio.timeout(settings.timeout):
                    async with client.stream("POST", url, content=data, headers=headers) as response:
                        return await _read(response, stream)
            except StreamTooLarge as exc:
                return Outcome.failure(TOO_LARGE, str(exc))
            except (TimeoutError, httpx.TimeoutException):
                failure = Outcome.failure(
                    GATEWAY_TIMEOUT, f"upstream {url} did not answer within upstream.timeout={settings.timeout:g}s"
                )
            except httpx.TransportError as exc:
                failure = Outcome.failure(BAD_GATEWAY, f"upstream {url}: {type(exc).__name__}: {exc}")
            finally:
                pool.put_nowait(client)
            log.info("request %s: attempt %d: %s", context.request_id, attempt + 1, failure.message)
            if stream is not None and stream.used:  # its client has seen output: no second attempt
                return Outcome.failure(failure.status, f"{failure.message} (after {stream.used} bytes were streamed)")
        return Outcome.failure(failure.status, f"{failure.message} ({settings.retries + 1} attempts)")


async def _read(response: httpx.Response, stream: RequestStream | None) -> Outcome:
    """The upstream's answer as the result; an SSE or chunked answer streamed on the way (see the module)."""
    status = response.status_code
    message = "" if 200 <= status < 300 else f"upstream answered {status}"
    content_type = response.headers.get("content-type", OCTET_STREAM)
    chunked = response.headers.get("transfer-encoding", "").lower() == "chunked"
    if stream is not None and content_type.startswith("text/event-stream"):
        joined = Joined()
        async for sse in EventSource(response).aiter_sse():
            encoding, value = _event_chunk(sse.data)
            stream.add(encoding, value)
            joined.add(encoding, value)
        outcome = joined.outcome()
        return Outcome(outcome.body, status, outcome.content_type, message)
    if stream is None or not chunked:
        return Outcome(await response.aread(), status, content_type, message)
    parts: list[bytes] = []
    decoder = codecs.getincrementaldecoder("utf-8")() if content_type.startswith(_TEXTUAL) else None
    async for piece in response.aiter_bytes():
        parts.append(piece)
        if decoder is not None:
            try:
                text = decoder.decode(piece)
            except UnicodeDecodeError:  # not text after all: bytes from here on
                decoder = None
                stream.add(BYTES, piece)
                continue
            if text:
                stream.add(TEXT, text.encode())
        else:
            stream.add(BYTES, piece)
    return Outcome(b"".join(parts), status, content_type, message)


def _event_chunk(data: str) -> tuple[str, bytes]:
    """An upstream SSE event's data as a chunk: JSON when it parses as a JSON object or list, else text."""
    if data[:1] in ("{", "["):
        try:
            json.loads(data)
        except ValueError:
            pass
        else:
            return JSON, data.encode()
    return TEXT, data.encode()
