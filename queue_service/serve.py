"""Serving the API: `queue-service api`, the one place for its HTTP server's settings (uvicorn, run from here).

Two settings matter to the official clients, beyond host and port:

- Idle keep-alive connections stay open `QS_KEEPALIVE_SECONDS` (75, as common proxies do). uvicorn's default
  is 5 s, and a client polling every 5 s exactly (the PAI SDK's AsyncPredictor) races the close and sees
  `ConnectionResetError` now and then.
- A small answer goes out in one write: uvicorn writes the status line and headers, then the body, in two
  writes (two TCP segments). The PAI SDK's `predict_async` closes its HTTP session as soon as the headers
  arrive and reads the body afterwards, so a body in a later segment is lost ("Connection closed"). The
  protocol here holds the header bytes until the first body message and writes them together. A streaming
  answer that has nothing to send yet (the HTTP watch) sends an empty body message to flush its headers.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
from typing import Annotated, Any

import click
import uvicorn
from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict
from uvicorn.importer import import_from_string
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from queue_service.config import Settings

API_APP = "queue_service.api:create_app"


class ServeSettings(BaseSettings):
    """The API server's own settings (QS_* environment variables)."""

    model_config = SettingsConfigDict(env_prefix="QS_", extra="ignore")

    # How long an idle keep-alive connection stays open, in seconds: past any client's poll interval.
    keepalive_seconds: Annotated[int, Field(gt=0, le=3600)] = 75


class _HeldHeaders:
    """The transport one request's answer is written through: its header bytes wait for the first body bytes.

    Everything else (100 Continue, the body, close, flow control) goes straight to the real transport.
    """

    __slots__ = ("_headers_seen", "_held", "_transport", "cycle")

    def __init__(self, transport: asyncio.Transport) -> None:
        self._transport = transport
        self._held: bytes | None = None
        self._headers_seen = False
        self.cycle: Any = None  # uvicorn's RequestResponseCycle for this request, set once it exists

    def write(self, data: bytes | bytearray | memoryview) -> None:
        if self._held is not None:
            data, self._held = self._held + bytes(data), None
        elif not self._headers_seen and self.cycle is not None and self.cycle.response_started:
            # The cycle writes the status line and headers right after it marks the response started.
            self._headers_seen = True
            self._held = bytes(data)
            return
        self._transport.write(data)

    def close(self) -> None:
        if self._held is not None:
            self._transport.write(self._held)
            self._held = None
        self._transport.close()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._transport, name)


class OneWriteProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol, with each answer's headers written together with its first body bytes."""

    def on_headers_complete(self) -> None:
        real = self.transport
        held = _HeldHeaders(real)
        # uvicorn builds the request's cycle here with `self.transport`: it gets the holding transport.
        self.transport = held  # type: ignore[assignment]
        try:
            super().on_headers_complete()
        finally:
            self.transport = real
        if self.cycle is not None and self.cycle.transport is held:
            held.cycle = self.cycle


def advertised_address(host: str, port: int) -> str:
    """`host:port` other machines reach this API at: the bound host, or this machine's address for a wildcard."""
    try:
        wildcard = ipaddress.ip_address(host).is_unspecified
    except ValueError:
        wildcard = host == ""
    if wildcard:
        try:
            host = socket.gethostbyname(socket.gethostname())
        except OSError:
            host = "127.0.0.1"
    return f"{host}:{port}"


def _bound_address(fd: int) -> tuple[str, int]:
    sock = socket.socket(fileno=socket.dup(fd))
    try:
        name = sock.getsockname()
    finally:
        sock.close()
    return str(name[0]), int(name[1])


def server_config(
    *, host: str = "127.0.0.1", port: int = 8000, fd: int | None = None, app: str = API_APP
) -> uvicorn.Config:
    """The uvicorn configuration of the API (or of another ASGI app factory, served the same way)."""
    serve_settings = ServeSettings()
    factory = import_from_string(app)
    if app == API_APP:
        settings = Settings()
        if not settings.advertise:
            bound_host, bound_port = _bound_address(fd) if fd is not None else (host, port)
            settings = settings.model_copy(update={"advertise": advertised_address(bound_host, bound_port)})
        asgi = factory(settings)
    else:
        asgi = factory()
    return uvicorn.Config(
        asgi,
        host=host,
        port=port,
        fd=fd,
        http=OneWriteProtocol,
        timeout_keep_alive=serve_settings.keepalive_seconds,
        # The API writes its own JSON log line per request (request id, status, timings).
        access_log=False,
    )


@click.command("api")
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on (0.0.0.0: every one).")
@click.option("--port", default=8000, show_default=True, type=int, help="Port to listen on.")
@click.option("--fd", type=int, help="Serve a socket bound already (by `queue-service up`) instead of --host/--port.")
@click.option("--app", default=API_APP, show_default=True, hidden=True, help="ASGI app factory to serve.")
def api(host: str, port: int, fd: int | None, app: str) -> None:
    """Run the API alone (the HTTP server): QS_REDIS_URL and QS_SERVICES say where Redis and the services are.

    QS_KEEPALIVE_SECONDS (75) keeps idle client connections open; QS_ADVERTISE (host:port) is the address
    this API registers for the clients' direct mode (default: the bound address, or this machine's).
    """
    uvicorn.Server(server_config(host=host, port=port, fd=fd, app=app)).run()


if __name__ == "__main__":
    api()
