"""Serving the API (queue_service/serve.py): a small answer is one write, headers and body together.

The PAI SDK's `predict_async` closes its session as soon as the headers are in and reads the body later: a
body that comes in a later TCP segment is lost. Counted here on uvicorn's protocol with a transport that
records its writes (one write is one segment for an answer this small).
"""

from __future__ import annotations

import asyncio
from typing import Any

import uvicorn
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
from uvicorn.server import ServerState

from queue_service.serve import OneWriteProtocol, ServeSettings, advertised_address


class RecordingTransport(asyncio.Transport):
    def __init__(self) -> None:
        super().__init__()
        self.writes: list[bytes] = []
        self.closed = False

    def write(self, data: Any) -> None:
        self.writes.append(bytes(data))

    def close(self) -> None:
        self.closed = True

    def is_closing(self) -> bool:
        return self.closed

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return {"sockname": ("127.0.0.1", 8000), "peername": ("127.0.0.1", 50000)}.get(name, default)

    def pause_reading(self) -> None: ...

    def resume_reading(self) -> None: ...


BODY = b'[{"index": 1, "data": "aGVsbG8="}]'


async def small_answer(scope: dict, receive: Any, send: Any) -> None:
    # As Starlette's JSONResponse sends it.
    headers = [(b"content-type", b"application/json"), (b"content-length", b"%d" % len(BODY))]
    await send({"type": "http.response.start", "status": 200, "headers": headers})
    await send({"type": "http.response.body", "body": BODY})


async def stream(scope: dict, receive: Any, send: Any) -> None:
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": b"", "more_body": True})  # what the HTTP watch sends first
    await asyncio.sleep(0.05)
    await send({"type": "http.response.body", "body": b"frame", "more_body": False})


async def answer(protocol_class: type[HttpToolsProtocol], app: Any, request: bytes) -> list[bytes]:
    config = uvicorn.Config(app, http=protocol_class, log_level="warning")
    protocol = protocol_class(config=config, server_state=ServerState(), app_state={})
    transport = RecordingTransport()
    protocol.connection_made(transport)
    protocol.data_received(request)
    for _ in range(100):
        if protocol.cycle is not None and protocol.cycle.response_complete:
            break
        await asyncio.sleep(0.01)
    return transport.writes


GET = b"GET /api/predict/echo/sink?requestId=x HTTP/1.1\r\nHost: example\r\n\r\n"


async def test_a_small_answer_is_written_once_headers_and_body_together() -> None:
    writes = await answer(OneWriteProtocol, small_answer, GET)

    assert len(writes) == 1, f"{len(writes)} writes"
    assert writes[0].startswith(b"HTTP/1.1 200 OK\r\n") and writes[0].endswith(b"\r\n\r\n" + BODY)


async def test_uvicorns_own_protocol_writes_the_body_apart() -> None:
    # The baseline the SDK tripped over: headers, then body, two writes.
    writes = await answer(HttpToolsProtocol, small_answer, GET)

    assert len(writes) == 2 and writes[1] == BODY


async def test_a_stream_gets_its_headers_at_once_and_each_chunk_as_it_comes() -> None:
    writes = await answer(OneWriteProtocol, stream, GET)

    assert writes[0].startswith(b"HTTP/1.1 200 OK\r\n") and b"transfer-encoding: chunked" in writes[0]
    assert writes[1:] == [b"5\r\nframe\r\n0\r\n\r\n"]


async def test_100_continue_is_not_held_back() -> None:
    async def reads_the_body(scope: dict, receive: Any, send: Any) -> None:
        body = (await receive())["body"]
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"%d" % len(body))]})
        await send({"type": "http.response.body", "body": body})

    config = uvicorn.Config(reads_the_body, http=OneWriteProtocol, log_level="warning")
    protocol = OneWriteProtocol(config=config, server_state=ServerState(), app_state={})
    transport = RecordingTransport()
    protocol.connection_made(transport)
    protocol.data_received(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 4\r\nExpect: 100-continue\r\n\r\n")
    for _ in range(50):
        if transport.writes:
            break
        await asyncio.sleep(0.01)
    assert transport.writes == [b"HTTP/1.1 100 Continue\r\n\r\n"]
    protocol.data_received(b"ping")
    for _ in range(100):
        if protocol.cycle.response_complete:
            break
        await asyncio.sleep(0.01)
    assert len(transport.writes) == 2 and transport.writes[1].endswith(b"\r\n\r\nping")


def test_idle_connections_stay_open_75_seconds_unless_configured(monkeypatch: Any) -> None:
    assert ServeSettings().keepalive_seconds == 75
    monkeypatch.setenv("QS_KEEPALIVE_SECONDS", "120")
    assert ServeSettings().keepalive_seconds == 120


def test_the_advertised_address_is_the_bound_one_or_this_machines_for_a_wildcard() -> None:
    assert advertised_address("10.1.2.3", 8000) == "10.1.2.3:8000"
    host, port = advertised_address("0.0.0.0", 8001).rsplit(":", 1)
    assert port == "8001" and host != "0.0.0.0"
