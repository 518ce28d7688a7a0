"""Get: items of a queue by index or request id, answered at once or after a long poll, deleted only once answered.

Nothing there is 204, or, for a client that asks for protobuf (the official SDKs), 200 with an empty list.

A long poll holds no Redis connection while it waits (`waiters.py` wakes it), stops the moment its client
leaves, and counts against the process's and the service's bounds on open waits (429 past them).

`_auto_delete_=true` never deletes for a client that is gone: the read reserves what it returns (other
auto-deleting readers skip it), the answer is written, the items are removed, and only then does the
answer end (it goes out chunked), so the client's next request never finds them. If the client
left first, the reservation is given back; if the API dies in between, the reservation lapses after
`RESERVE_MS` and the items are there again. What is guaranteed: an item is deleted only after its answer
was written to the client's open connection; an answer lost after that (a network break mid-flight) is
gone with it. Clients that need more read without auto-delete and delete (or commit) what they received.
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Awaitable, Callable, Sequence

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.types import Message, Receive, Scope, Send

from queue_service.api.disconnect import ClientGone
from queue_service.api.params import MAX_LENGTH
from queue_service.api.preamble import QueueCall
from queue_service.api.waiters import Match, for_request_id, from_index
from queue_service.protocol import CLIENT_CLOSED, INDEX_HEADER, LAST_CODE_HEADER, REQUEST_ID_HEADER
from queue_service.store.model import DataFrame, Read
from queue_service.wire import PROTOBUF_MEDIA_TYPE, encode_frame_list, frames_to_json, wants_protobuf

# How long a read's reservation holds items for its answer (then, if never settled, they are back).
RESERVE_MS = 30_000
# Longest a long poll waits for a wake-up before it looks again itself (a safety net; wake-ups come first).
RECHECK_SECONDS = 5.0


class SettledResponse(Response):
    """Sends its answer, then settles the reserved items: removed if the client was there, else given back.

    The answer goes out chunked, and its last (empty) chunk only after the settle: a client cannot see its
    answer complete, and ask again, before the items are gone (with a Content-Length it could, and find them).
    """

    def __init__(self, answer: Response, settle: Callable[[bool], Awaitable[object]], request: Request) -> None:
        self.answer = answer
        self.settle = settle
        self.request = request
        self.status_code = answer.status_code
        self.background = None
        answer.raw_headers = [(k, v) for k, v in answer.raw_headers if k != b"content-length"]

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        async def send_all_but_the_end(message: Message) -> None:
            if message["type"] == "http.response.body" and not message.get("more_body", False):
                message = {**message, "more_body": True}
            await send(message)

        try:
            await self.answer(scope, receive, send_all_but_the_end)
        except OSError:  # the connection broke under the answer (a server that says so): the items go back
            await self.settle(False)
            return
        # Asked once, after the body: a client gone before it is still gone now (Starlette keeps the answer).
        await self.settle(not await self.request.is_disconnected())
        await send({"type": "http.response.body", "body": b"", "more_body": False})


async def get_items(request: Request, call: QueueCall) -> Response:
    params = call.params
    raw = params.flag("_raw_")
    length = params.integer("_length_", 1, minimum=1, maximum=MAX_LENGTH)  # checked with _raw_ too
    start = params.integer("_index_", 0)
    request_id = request.query_params.get("requestId", "")
    tags = params.tags()
    timeout = params.duration("_timeout_", 0.0)
    token = secrets.token_hex(8) if params.flag("_auto_delete_") else ""
    store, qk = call.app.store, call.qk

    async def read() -> Read:
        return await store.read(
            qk,
            start=start,
            length=1 if raw else length,
            request_id=request_id,
            tags=tags,
            max_bytes=call.app.settings.max_answer_bytes,
            reserve_token=token,
            reserve_ms=RESERVE_MS,
        )

    first = await read()
    frames = first.frames
    if not frames and timeout > 0:
        match = for_request_id(request_id) if request_id else None if tags else from_index(start)
        frames, left = await long_poll(request, call, read, first.last_index, match, timeout)
        if left:  # the client left: nothing is answered, and nothing it might have taken is kept from others
            await store.settle_reserved(qk, frames, token, delivered=False)
            request.state.final_status = CLIENT_CLOSED
            return Response(status_code=CLIENT_CLOSED)
    if not frames:
        if not raw and wants_protobuf(request.headers.get("accept")):
            # The SDKs all ask for protobuf, and the Java one takes only 200 as an answer (204: it asks again,
            # five more times): an empty DataFrameListProto (no bytes), which every SDK reads as no items.
            return Response(b"", media_type=PROTOBUF_MEDIA_TYPE)
        return Response(status_code=204)
    answer = _answer(request, frames, raw)
    if not token:
        return answer

    async def settle(delivered: bool) -> None:
        await store.settle_reserved(qk, frames, token, delivered=delivered)

    return SettledResponse(answer, settle, request)


async def long_poll(
    request: Request,
    call: QueueCall,
    read: Callable[[], Awaitable[Read]],
    last_index: int,
    match: Match | None,
    timeout: float,
) -> tuple[list[DataFrame], bool]:
    """Read until something is there or `timeout` passes: (what was read, whether the client left meanwhile).

    `last_index` is the last index the caller's first read saw: if this process's reader has not gone past it,
    every item put since wakes the waiter, and no second read is needed before waiting."""
    deadline = time.monotonic() + timeout
    with call.app.waits.hold(call.service.name):
        gone = ClientGone(request.receive)
        try:
            waiters = call.app.waiters.of(call.qk)
            async with waiters.on_queue(call.queue, match) as waiter:
                gone.on_gone(waiter.event.set)
                look = not waiters.sees_after(call.queue, last_index)
                while not gone.gone:
                    if look:  # registered first: nothing put after this read is missed
                        frames = (await read()).frames
                        if frames or time.monotonic() >= deadline:
                            return frames, gone.gone
                    look = True
                    await waiter.wait(min(deadline - time.monotonic(), RECHECK_SECONDS))
            return [], True
        finally:
            await gone.aclose()


def _answer(request: Request, frames: Sequence[DataFrame], raw: bool) -> Response:
    if raw:
        frame = frames[0]
        headers = {REQUEST_ID_HEADER: frame.tags.get("requestId", ""), INDEX_HEADER: str(frame.index)}
        if "lastCode" in frame.tags:
            headers[LAST_CODE_HEADER] = frame.tags["lastCode"]
        return Response(frame.data, media_type="application/octet-stream", headers=headers)
    if wants_protobuf(request.headers.get("accept")):
        return Response(encode_frame_list(frames), media_type=PROTOBUF_MEDIA_TYPE)
    return JSONResponse(frames_to_json(frames))
