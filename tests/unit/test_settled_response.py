"""An auto-delete answer completes only after its items are settled: the client's next request cannot find them."""

from __future__ import annotations

import asyncio

from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.types import Message

from queue_service.api.reads import SettledResponse


def _request(messages: list[Message]) -> Request:
    async def receive() -> Message:
        if messages:
            return messages.pop(0)
        await asyncio.sleep(3600)  # a client that stays: nothing more arrives
        raise AssertionError("unreachable")

    return Request({"type": "http", "method": "GET", "path": "/", "headers": [], "query_string": b""}, receive)


def _run(incoming: list[Message]) -> tuple[list[str], list[Message]]:
    events: list[str] = []
    sent: list[Message] = []

    async def settle(delivered: bool) -> None:
        await asyncio.sleep(0.01)  # a Redis round trip: the answer must not be complete meanwhile
        events.append(f"settled delivered={delivered}")

    async def send(message: Message) -> None:
        sent.append(message)
        if message["type"] == "http.response.body" and not message.get("more_body", False):
            events.append("answer complete")

    response = SettledResponse(JSONResponse([{"index": 1}]), settle, _request(incoming))
    asyncio.run(response({"type": "http"}, response.request.receive, send))
    return events, sent


def test_the_answer_completes_only_after_the_items_are_removed() -> None:
    events, sent = _run([{"type": "http.request", "body": b"", "more_body": False}])
    assert events == ["settled delivered=True", "answer complete"]
    start = sent[0]
    assert start["type"] == "http.response.start" and start["status"] == 200
    # No Content-Length: with one, a client has its whole answer (and may ask again) before the last message.
    assert b"content-length" not in dict(start["headers"])
    assert b"".join(m.get("body", b"") for m in sent[1:]) == b'[{"index":1}]'


def test_a_client_gone_before_the_answer_gets_its_items_given_back() -> None:
    events, _ = _run([{"type": "http.disconnect"}])
    assert events == ["settled delivered=False", "answer complete"]
