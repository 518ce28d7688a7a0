"""Streaming a request's output as Server-Sent Events: `GET .../sink?requestId=<id>&_stream_=true`, and
`POST .../sync` with `Accept: text/event-stream`.

Events, each with an `id:`:
- `progress`: `{"fraction", "message", "at"}` as the processor reported it;
- `chunk`: one yielded chunk, as JSON whose one field says what it is: `{"text": "..."}` (text as is),
  `{"base64": "..."}` (bytes), `{"json": ...}` (a JSON chunk);
- `restart`: `{"delivery": n}`: the worker running the request stopped and another runs it again from the
  start; the chunks that follow are the new delivery's (what came before is not replayed any more);
- `done`: `{"statusCode", "lastCode" (not 200), "message" (a failure's)}`, the last event.

Ids are the entries' ids in the request's stream (`<ms>-<n>`); a request that streamed nothing gets its
result as one chunk with id `result` (text when it is UTF-8, else base64) and `done` has id `done`. A client
that reconnects with `Last-Event-ID` gets exactly what came after that id; after `done` it gets 204, which
tells a browser's EventSource not to reconnect. Before the request starts, and whenever nothing comes, an
SSE comment is sent every `QS_STREAM_KEEPALIVE_SECONDS`. A stream holds no Redis connection while it waits
(`waiters.on_stream`) and counts against the open-wait bounds (429).

Sync: the response starts with the first event (progress, chunk or the answer), so until then the usual
codes can answer (450, 503, 408 after `metadata.rpc.keepalive`); a client that leaves, or a 408, cancels
the request: it is deleted from the input queue, so a worker running it interrupts the processor (499).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import re
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence

from sse_starlette import EventSourceResponse
from starlette.requests import Request
from starlette.responses import Response
from starlette.types import Receive, Scope, Send

from queue_service.api import sync
from queue_service.api.disconnect import ClientGone
from queue_service.api.errors import ApiError
from queue_service.api.preamble import QueueCall
from queue_service.api.waiters import Match, ServiceWaiters, StreamWaiter
from queue_service.protocol import CLIENT_CLOSED
from queue_service.store import keys
from queue_service.store.model import Reply, StreamEntry
from queue_service.store.queues import RequestState, stream_entry

EVENT_STREAM = "text/event-stream"
# Entries read from a request's stream at a time: what one stream holds in memory besides its wait.
PAGE = 256
RESULT_ID, DONE_ID = "result", "done"
KEEPALIVE = b": keep-alive\n"
_ENTRY_ID = re.compile(r"[0-9]{1,20}-[0-9]{1,20}")
# How long a stream whose request has ended waits for the done entry its worker writes right after the result.
DONE_GRACE_SECONDS = 2.0


def wants_stream(request: Request) -> bool:
    return EVENT_STREAM in request.headers.get("accept", "")


# --- encoding -------------------------------------------------------------------------------------


def event(kind: str, data: str, event_id: str) -> bytes:
    # `data` is JSON without raw newlines (json.dumps escapes them): one `data:` line.
    return f"id: {event_id}\nevent: {kind}\ndata: {data}\n\n".encode()


def chunk_data(encoding: str, value: bytes) -> str:
    if encoding == "json":
        return '{"json":' + value.decode() + "}"
    if encoding == "text":
        return json.dumps({"text": value.decode(errors="replace")}, ensure_ascii=False)
    return json.dumps({"base64": base64.b64encode(value).decode()})


def encode_entries(entries: Sequence[StreamEntry]) -> bytes:
    out = []
    for entry in entries:
        if entry.kind == "chunk":
            out.append(event("chunk", chunk_data(entry.encoding, entry.value), entry.id))
        elif entry.kind == "restart":
            out.append(event("restart", json.dumps({"delivery": entry.delivery}), entry.id))
        else:  # progress, done: JSON as the worker wrote it
            out.append(event(entry.kind, entry.value.decode(), entry.id))
    return b"".join(out)


def result_chunk(body: bytes) -> bytes:
    """A request that streamed nothing: its whole result as one chunk (text when it is UTF-8: lossless)."""
    try:
        body.decode()
    except UnicodeDecodeError:
        return event("chunk", chunk_data("bytes", body), RESULT_ID)
    return event("chunk", chunk_data("text", body), RESULT_ID)


def done_event(status: int, message: str = "") -> bytes:
    body: dict[str, object] = {"statusCode": status}
    if status != 200:
        body["lastCode"] = str(status)
        if message:
            body["message"] = message
    return event("done", json.dumps(body, ensure_ascii=False, separators=(",", ":")), DONE_ID)


# --- the response -----------------------------------------------------------------------------------


class StreamResponse(EventSourceResponse):
    """An SSE response that runs `on_close` once it is over, however it ended (its wait slot, a sync cancel)."""

    def __init__(self, content: AsyncIterator[bytes], keepalive: float, on_close: Callable[[], Awaitable[None]]):
        # The keep-alives are the generators' own: a comment line without the blank line after it, which some
        # clients (httpx-sse 0.4) would take for an event of their own.
        super().__init__(content, ping=0, sep="\n")
        self.on_close = on_close

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            await asyncio.shield(self.on_close())


def _after(entry_id: str, cursor: str) -> bool:
    ms, _, seq = entry_id.partition("-")
    cursor_ms, _, cursor_seq = cursor.partition("-")
    return (int(ms), int(seq)) > (int(cursor_ms), int(cursor_seq))


class Cursor:
    """Reads one request's stream after `at`: from what its waiter kept while that is complete (no Redis work
    for a client that keeps up), else from Redis a page at a time."""

    def __init__(self, call: QueueCall, request_id: str, waiter: StreamWaiter, at: str = "0-0") -> None:
        self.store, self.service, self.request_id = call.app.store, call.service.name, request_id
        self.waiter = waiter
        self.at = at
        self.complete = False  # the last read from Redis reached the end: what the waiter keeps follows on
        self.more = False  # the last read from Redis stopped at a full page

    async def read(self, *, from_redis: bool = False) -> list[StreamEntry]:
        if self.complete and not from_redis:
            kept = self.waiter.take()
            if kept is not None:
                entries = [e for e in (stream_entry(i, f) for i, f in kept) if _after(e.id, self.at)]
                if entries:
                    self.at = entries[-1].id
                return entries
        self.waiter.reset()  # before the read: whatever is written after it is kept
        entries = await self.store.stream_after(self.service, self.request_id, self.at, PAGE)
        self.more = len(entries) == PAGE
        self.complete = not self.more
        if entries:
            self.at = entries[-1].id
        return entries


async def _woken(event: asyncio.Event, seconds: float) -> bool:
    """Wait for `event` (cleared after) or `seconds`; True when it was set."""
    if not event.is_set():
        try:
            async with asyncio.timeout(max(0.0, seconds)):
                await event.wait()
        except TimeoutError:
            return False
    event.clear()
    return True


def _result_match(request_id: str, seen: list[bool]) -> Match:
    """Matches the request's result in the sink, and notes that it came."""
    wanted = request_id.encode()

    def match(index: int, fields: dict[bytes, bytes]) -> bool:
        if fields.get(b"rid") != wanted:
            return False
        seen[0] = True
        return True

    return match


def _last_event_id(request: Request) -> str:
    value = request.headers.get("last-event-id", "").strip()
    if value and value not in (RESULT_ID, DONE_ID) and not _ENTRY_ID.fullmatch(value):
        raise ApiError(400, f"Last-Event-ID must be an id this stream sent (<ms>-<n>, result or done), got {value!r}")
    return value


def _finished(found: RequestState | None) -> bool:
    return found is None or found.state in ("done", "removed")


# --- GET .../sink?requestId=...&_stream_=true ------------------------------------------------------


async def sink_stream(request: Request, call: QueueCall) -> Response:
    if call.queue != "sink":
        raise ApiError(400, "_stream_ is read on the sink: GET /api/predict/<svc>/sink?requestId=<id>&_stream_=true")
    request_id = request.query_params.get("requestId", "")
    if not request_id:
        raise ApiError(400, "_stream_=true needs requestId: the id a put answered with")
    after = _last_event_id(request)
    app, service = call.app, call.service
    slot = contextlib.ExitStack()
    slot.enter_context(app.waits.hold(service.name, "streams"))
    handed = False
    try:
        found = await app.store.status(service.name, request_id)
        # A request cancelled while it ran is unknown to the queues until its worker writes the 499: its
        # stream says it existed.
        if found is None and not await app.store.stream_exists(service.name, request_id):
            raise ApiError(404, f"request id {request_id!r} is unknown to service {service.name!r} (or expired)")
        if after == DONE_ID:
            return Response(status_code=204)  # it had everything: EventSource stops reconnecting
        if _ENTRY_ID.fullmatch(after):
            seen = await app.store.stream_entry_at(service.name, request_id, after)
            if seen is not None and seen.kind == "done":
                return Response(status_code=204)
        if (
            found is not None
            and found.state == "removed"
            and not await app.store.stream_exists(service.name, request_id)
        ):
            raise ApiError(
                404,
                f"request {request_id!r} finished and its result was already read (or deleted); it has no stream "
                "to replay (it streamed nothing, or its stream expired after queue.stream.ttl_seconds)",
            )
        events = _sink_events(call, request_id, after)

        async def close() -> None:
            slot.close()

        handed = True  # the response gives the slot back when it is over
        return StreamResponse(events, app.settings.stream_keepalive_seconds, close)
    finally:
        if not handed:
            slot.close()


async def _sink_events(call: QueueCall, request_id: str, after: str) -> AsyncIterator[bytes]:
    app, service = call.app, call.service.name
    waiters: ServiceWaiters = app.waiters.service(service)
    keepalive = app.settings.stream_keepalive_seconds
    streamed = bool(after)  # the client has had output already: no whole-result chunk at the end
    result_seen = [False]
    async with (
        waiters.on_stream(request_id) as waiter,
        waiters.on_queue("sink", _result_match(request_id, result_seen)) as sink,
    ):
        sink.event = waiter.event  # one wake-up for both: new entries, or the result in the sink
        cursor = Cursor(call, request_id, waiter, after if _ENTRY_ID.fullmatch(after) else "0-0")
        look_at_end, ended_at = True, 0.0
        while True:
            entries = await cursor.read()
            if entries:
                yield encode_entries(entries)
                streamed = True
                if entries[-1].kind == "done":
                    return
                if cursor.more:
                    continue
            elif look_at_end:
                found = await app.store.status(service, request_id)
                if _finished(found) and not (found is None and cursor.at != "0-0"):
                    if not streamed:
                        # A worker writes what a request streamed before its result: whatever it streamed since
                        # the read above (all of a fast request, on a loaded box) is in Redis now. Read it
                        # there, not from the waiter, which may not have seen it yet.
                        late = await cursor.read(from_redis=True)
                        if late:
                            yield encode_entries(late)
                            streamed = True
                            if late[-1].kind == "done":
                                return
                            continue
                    # A request that streamed gets its done entry a round trip after its result (unless its
                    # worker died right then): wait a moment for it before making one up.
                    if not streamed or (ended_at and time.monotonic() - ended_at > DONE_GRACE_SECONDS):
                        yield await _ending(call, request_id, found, with_result=not streamed)
                        return
                    ended_at = ended_at or time.monotonic()
            woken = await _woken(waiter.event, DONE_GRACE_SECONDS / 4 if ended_at else keepalive)
            look_at_end = result_seen[0] or not woken  # a result appeared, or nothing came: has it ended?
            result_seen[0] = False
            if not (woken or ended_at):
                yield KEEPALIVE


async def _ending(call: QueueCall, request_id: str, found: RequestState | None, *, with_result: bool) -> bytes:
    """The end of a request that left no done entry: its result as one chunk (if it streamed nothing), then done."""
    if found is None:
        return done_event(500, "the request is no longer known to the service")
    head = b""
    if with_result and found.state == "done":
        read = await call.app.store.read(
            keys.sink_queue(call.service.name), request_id=request_id, max_bytes=call.app.settings.max_answer_bytes
        )
        if read.frames and read.frames[0].data:
            head = result_chunk(read.frames[0].data)
    return head + done_event(found.status, found.message)


# --- POST .../sync with Accept: text/event-stream ----------------------------------------------------


async def sync_stream(request: Request, call: QueueCall, path: str = "") -> Response:
    app, service = call.app, call.service
    deadline, request_id, waiters = await sync.admit(request, call)
    slot = contextlib.AsyncExitStack()
    slot.enter_context(app.waits.hold(service.name, "streams"))
    answer = waiters.expect_reply(request_id)  # before the put: the answer cannot come first
    slot.callback(waiters.drop_reply, request_id)
    handed = False
    try:
        waiter = await slot.enter_async_context(waiters.on_stream(request_id))
        gone = ClientGone(request.receive)
        try:
            put = await sync.put_for_reply(request, call, request_id, path)
            gone.on_gone(waiter.event.set)
            answer.add_done_callback(lambda _: waiter.event.set())  # one wake-up: output, the answer, or gone
            cursor = Cursor(call, request_id, waiter)
            entries = await _first_event(cursor, answer, gone, deadline)
        finally:
            await gone.aclose()
        if entries is None:  # the client left, or nothing came within the keepalive: cancel it
            await app.store.remove(call.qk, [put.index])
            if gone.gone:
                request.state.final_status = CLIENT_CLOSED
                return Response(status_code=CLIENT_CLOSED)
            raise ApiError(
                408,
                f"no output within metadata.rpc.keepalive={service.rpc.keepalive}ms; the request was cancelled",
                {"Connection": "close"},
            )
        ended: list[bool] = [False]

        async def close() -> None:
            try:
                if not ended[0]:  # the client left mid-stream: the request is cancelled
                    request.state.final_status = CLIENT_CLOSED
                    await app.store.remove(call.qk, [put.index])
            finally:
                await slot.aclose()

        events = _sync_events(call, cursor, answer, entries, ended)
        handed = True
        return StreamResponse(events, app.settings.stream_keepalive_seconds, close)
    finally:
        if not handed:
            await slot.aclose()


async def _first_event(
    cursor: Cursor, answer: asyncio.Future[Reply], gone: ClientGone, deadline: float
) -> list[StreamEntry] | None:
    """The first entries of the request's stream ([] when the answer came first); None: gone or too late."""
    while not gone.gone:
        entries = await cursor.read()
        if entries or answer.done():
            return entries
        left = deadline - time.monotonic()
        if left <= 0:
            return None
        await _woken(cursor.waiter.event, left)
    return None


async def _sync_events(
    call: QueueCall,
    cursor: Cursor,
    answer: asyncio.Future[Reply],
    first: list[StreamEntry],
    ended: list[bool],
) -> AsyncIterator[bytes]:
    keepalive = call.app.settings.stream_keepalive_seconds
    entries, streamed = first, False
    while True:
        if entries:
            yield encode_entries(entries)
            streamed = True
            if entries[-1].kind == "done":
                ended[0] = True
                return
        if answer.done() and not cursor.more:
            # The worker wrote every chunk before its answer: read to the end once, then the answer ends it.
            entries = await cursor.read()
            if entries:
                continue
            outcome = answer.result().outcome
            head = b"" if streamed or not outcome.body else result_chunk(outcome.body)
            message = outcome.body[:500].decode(errors="replace") if outcome.status != 200 else ""
            ended[0] = True
            yield head + done_event(outcome.status, message)
            return
        if not cursor.more and not await _woken(cursor.waiter.event, keepalive):
            yield KEEPALIVE
        entries = await cursor.read()
