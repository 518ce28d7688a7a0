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

Forwarded: the body; `Content-Type` as the client sent it (`application/octet-stream` when it sent none);
`X-Eas-Queueservice-Request-Id`; the service's `upstream.headers`. Nothing else of the client's request is
stored, so nothing else (its token, cookies, other headers, the tags) reaches the upstream.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from urllib.parse import urlsplit, urlunsplit

import httpx

from queue_service.config import UpstreamSettings
from queue_service.protocol import REQUEST_ID_HEADER
from queue_service.store.model import OCTET_STREAM, Outcome
from workers.context import RequestContext

log = logging.getLogger("rq.worker")
BAD_GATEWAY, GATEWAY_TIMEOUT = 502, 504
HEALTH_TIMEOUT_SECONDS = 5.0


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
        for attempt in range(settings.retries + 1):
            if attempt:
                await asyncio.sleep(settings.backoff_seconds * 2 ** (attempt - 1))
            pool = self._pool()
            client = await pool.get()
            try:
                # The whole attempt is bounded: httpx's read timeout is per read, a trickling upstream resets it.
                async with asyncio.timeout(settings.timeout):
                    response = await client.post(url, content=data, headers=headers)
            except (TimeoutError, httpx.TimeoutException):
                failure = Outcome.failure(
                    GATEWAY_TIMEOUT, f"upstream {url} did not answer within upstream.timeout={settings.timeout:g}s"
                )
            except httpx.TransportError as exc:
                failure = Outcome.failure(BAD_GATEWAY, f"upstream {url}: {type(exc).__name__}: {exc}")
            else:
                return _outcome_of(response)
            finally:
                pool.put_nowait(client)
            log.info("request %s: attempt %d: %s", context.request_id, attempt + 1, failure.message)
        return Outcome.failure(failure.status, f"{failure.message} ({settings.retries + 1} attempts)")


def _outcome_of(response: httpx.Response) -> Outcome:
    status = response.status_code
    message = "" if 200 <= status < 300 else f"upstream answered {status}"
    return Outcome(response.content, status, response.headers.get("content-type", OCTET_STREAM), message)
