"""Streaming: what a running request yields (chunks) and reports (progress), written to its stream in Redis.

A processor whose `process` is a generator (sync or async) streams: each yielded value is one chunk (`str`
text, `bytes`, or a JSON-able `dict`/`list`/number), a yielded `Progress` is a progress report. Its result
in the sink is the chunks joined (`collect`): text and bytes concatenated (text as UTF-8); each JSON chunk
is its JSON text and a newline (JSON Lines). All text: `text/plain`; all JSON: `application/x-ndjson`;
anything else: `application/octet-stream`.

One StreamWriter per worker process (`install`) writes every running request's chunks to that request's
stream (`qs:{s}:chunks:<rid>`, `chunks.lua`) from a thread of its own, so a processor never waits for
Redis: the first chunk after a quiet spell goes at once, later ones at most every `QS_STREAM_FLUSH_MS`
(or as soon as `QS_STREAM_FLUSH_CHUNKS` wait), all requests' in one round trip. Of several progress reports
between two writes only the last is written. A delivery's chunks are capped at `queue.stream.max_bytes`:
past it the processor is told (`StreamTooLarge` is raised at its `yield`) and the request ends with 413.
Before a request's result is written its pending chunks are (`drain`), and once it is written its stream
gets its done entry and expires `queue.stream.ttl_seconds` later (`end`). A request whose webhooks ask for
`progress` or `output` passes its targets with each write (`scripts.StreamHooks`): the same script enqueues
those deliveries, at most one of each per request per second (docs/webhooks.md).
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import AsyncGenerator, Callable, Generator, Iterable, Sequence
from typing import Any

from queue_service.config import ServiceConfig
from queue_service.store import connection, scripts
from queue_service.store.consumer import WorkerStore
from queue_service.store.model import OCTET_STREAM, TEXT_PLAIN, Item, Outcome
from workers.context import Progress, RequestContext

log = logging.getLogger("rq.worker")

TEXT, BYTES, JSON = "t", "b", "j"
NDJSON = "application/x-ndjson"
# A running request's stream lives this long after its last write (a worker that died mid-stream leaves it);
# once the request ends it expires `queue.stream.ttl_seconds` after its done entry.
RUNNING_TTL_MS = 6 * 3600 * 1000
# How long writes are retried while Redis is away, before the chunks are given up (the result is not).
WRITE_RETRY_SECONDS = 30.0
TOO_LARGE = 413


class StreamTooLarge(Exception):
    """The request's streamed output is over `queue.stream.max_bytes`; raised at the processor's `yield`."""


class ChunkError(Exception):
    """A yielded value that is no chunk: a bug of the processor (400)."""


def encode_chunk(value: object) -> tuple[str, bytes]:
    """(encoding, bytes) of a yielded chunk: text, bytes, or JSON."""
    if isinstance(value, str):
        return TEXT, value.encode()
    if isinstance(value, bytes | bytearray | memoryview):
        return BYTES, bytes(value)
    if isinstance(value, dict | list | int | float) and not isinstance(value, bool):
        try:
            text = json.dumps(value, ensure_ascii=False, separators=(",", ":"), allow_nan=False)
        except (TypeError, ValueError) as exc:
            raise ChunkError(f"processor yielded {type(value).__name__}, not valid JSON: {exc}") from None
        return JSON, text.encode()
    raise ChunkError(
        f"processor yielded {type(value).__name__}; a chunk is str, bytes, a dict, a list or a number "
        "(or a workers.context.Progress)"
    )


class Joined:
    """The chunks of one request joined into its result (see the module's docstring)."""

    def __init__(self) -> None:
        self.parts: list[bytes] = []
        self.encodings: set[str] = set()

    def add(self, encoding: str, data: bytes) -> None:
        self.encodings.add(encoding)
        self.parts.append(data + b"\n" if encoding == JSON else data)

    def outcome(self) -> Outcome:
        if self.encodings == {TEXT}:
            content_type = TEXT_PLAIN
        elif self.encodings == {JSON}:
            content_type = NDJSON
        else:
            content_type = OCTET_STREAM
        return Outcome(b"".join(self.parts), 200, content_type)


def _too_large(exc: StreamTooLarge) -> Outcome:
    return Outcome.failure(TOO_LARGE, str(exc))


def _report(context: RequestContext | None, value: object, joined: Joined) -> None:
    """One yielded value: a progress report, or a chunk streamed (if the request streams) and kept for the result."""
    if isinstance(value, Progress):
        if context is not None:
            context.progress(value.fraction, value.message)
        return
    encoding, data = encode_chunk(value)
    stream = context.stream if context is not None else None
    if isinstance(stream, RequestStream):
        stream.add(encoding, data)
    joined.add(encoding, data)


def collect(generator: Generator[Any, Any, Any], context: RequestContext | None) -> Outcome:
    """Run a sync generator processor to its end: stream what it yields; its result is the chunks joined."""
    joined = Joined()
    over: StreamTooLarge | None = None
    try:
        value = next(generator)
        while True:
            try:
                _report(context, value, joined)
            except StreamTooLarge as exc:
                if over is not None:  # told once, and it went on yielding: stop it
                    return _too_large(over)
                over = exc
                value = generator.throw(exc)
                continue
            value = next(generator)
    except StopIteration:
        pass
    except StreamTooLarge as exc:
        return _too_large(exc)
    finally:
        generator.close()
    return _too_large(over) if over is not None else joined.outcome()


async def collect_async(generator: AsyncGenerator[Any, Any], context: RequestContext | None) -> Outcome:
    """`collect` for an async generator processor (`async def process` with `yield`)."""
    joined = Joined()
    over: StreamTooLarge | None = None
    try:
        value = await generator.__anext__()
        while True:
            try:
                _report(context, value, joined)
            except StreamTooLarge as exc:
                if over is not None:
                    return _too_large(over)
                over = exc
                value = await generator.athrow(exc)
                continue
            value = await generator.__anext__()
    except StopAsyncIteration:
        pass
    except StreamTooLarge as exc:
        return _too_large(exc)
    finally:
        await generator.aclose()
    return _too_large(over) if over is not None else joined.outcome()


# --- writing to Redis -------------------------------------------------------------------------------


class RequestStream:
    """One delivery of one request: its pending entries, and how many bytes of chunks it streamed."""

    __slots__ = (
        "encodings",
        "hooks",
        "item",
        "joined_bytes",
        "max_bytes",
        "pending",
        "pending_progress",
        "refused",
        "ttl_ms",
        "used",
        "writer",
        "written",
    )

    def __init__(
        self, writer: StreamWriter, item: Item, max_bytes: int, ttl_ms: int, hooks: scripts.StreamHooks | None = None
    ) -> None:
        self.writer = writer
        self.item = item
        self.max_bytes = max_bytes
        self.ttl_ms = ttl_ms
        self.hooks = hooks  # its `progress` / `output` webhooks, enqueued with its writes (None: it asks none)
        self.used = 0
        self.joined_bytes = 0  # its chunks joined as the result will be (JSON ones with a newline): `output` webhooks
        self.encodings = ""  # which of TEXT, BYTES, JSON its chunks had, in that order
        self.pending: list[tuple[str, str, bytes]] = []
        self.pending_progress: str = ""
        self.written = False  # this delivery wrote to the stream
        self.refused = False  # a later delivery owns the stream (this worker lost the item): nothing more

    # StreamSink, for the processor's context (any thread)
    def chunk(self, value: object) -> None:
        self.add(*encode_chunk(value))

    def progress(self, report: Progress) -> None:
        text = json.dumps(
            {"fraction": report.fraction, "message": report.message, "at": int(time.time() * 1000)},
            ensure_ascii=False,
            separators=(",", ":"),
        )
        self.writer.add(self, None, text)

    def add(self, encoding: str, data: bytes) -> None:
        if self.used + len(data) > self.max_bytes:
            raise StreamTooLarge(
                f"request {self.item.request_id} streamed more than queue.stream.max_bytes={self.max_bytes} bytes"
            )
        self.used += len(data)
        self.joined_bytes += len(data) + (encoding == JSON)
        if encoding not in self.encodings:
            self.encodings = "".join(e for e in (TEXT, BYTES, JSON) if e in self.encodings + encoding)
        self.writer.add(self, ("c", encoding, data), "")


class StreamWriter:
    """Every running request's stream of one worker process, written from one thread (see the module)."""

    def __init__(
        self, store: WorkerStore, services: Iterable[ServiceConfig], flush_ms: float, flush_chunks: int
    ) -> None:
        self.store = store
        services = list(services)
        self.settings = {service.name: service.queue.stream for service in services}
        # webhook.max_result_bytes: `output` webhooks carry the output so far up to this size, a link beyond.
        self.inline_bytes = {s.name: s.webhook.max_result_bytes if s.webhook else 0 for s in services}
        self.gap = flush_ms / 1000
        self.flush_chunks = flush_chunks
        self._changed = threading.Condition()
        self._write_lock = threading.Lock()  # writes go out in the order their entries were taken
        self._dirty: dict[int, RequestStream] = {}
        self._count = 0
        self._last_write = 0.0
        self._open: dict[int, RequestStream] = {}  # id(item) -> its stream, until the item is finished
        self._thread: threading.Thread | None = None

    def open(self, item: Item) -> RequestStream:
        """The stream of a request this process starts running (nothing is written until it streams)."""
        stream_settings = self.settings[item.service]
        hooks = scripts.stream_hooks(
            item, inline_bytes=self.inline_bytes[item.service], start_ms=int(item.taken_at * 1000)
        )
        stream = RequestStream(self, item, stream_settings.max_bytes, RUNNING_TTL_MS, hooks)
        with self._changed:
            self._open[id(item)] = stream
        return stream

    def add(self, stream: RequestStream, entry: tuple[str, str, bytes] | None, progress: str) -> None:
        with self._changed:
            if stream.refused:
                return
            if entry is not None:
                stream.pending.append(entry)
                self._count += 1
            else:
                stream.pending_progress = progress  # only the last report between two writes counts
            self._dirty[id(stream)] = stream
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="stream-writer", daemon=True)
                self._thread.start()
            self._changed.notify()

    # --- the writer's thread ----------------------------------------------------------------------

    def _run(self) -> None:
        while True:
            with self._changed:
                while not self._dirty:
                    self._changed.wait()
                # Coalesce: the first write after a quiet spell goes at once, then at most one per gap.
                while self._count < self.flush_chunks:
                    left = self._last_write + self.gap - time.monotonic()
                    if left <= 0:
                        break
                    self._changed.wait(left)
            self._write(lambda stream: True)

    def _take(self, wanted: Callable[[RequestStream], bool]) -> list[tuple[RequestStream, scripts.Call[bool]]]:
        calls = []
        with self._changed:
            for key, stream in list(self._dirty.items()):
                if not wanted(stream):
                    continue
                del self._dirty[key]
                self._count -= len(stream.pending)
                item = stream.item
                entries: list[tuple[str, str, bytes | str]] = list(stream.pending)
                if stream.pending_progress:  # the last report since the previous write, after its chunks
                    entries.append(("p", "", stream.pending_progress))
                call = scripts.chunks_append(
                    item.service,
                    item.request_id,
                    delivery=item.deliveries,
                    entries=entries,
                    progress_json=stream.pending_progress,
                    ttl_ms=stream.ttl_ms,
                    hooks=stream.hooks,
                    output_bytes=stream.joined_bytes,
                    encodings=stream.encodings,
                )
                stream.pending, stream.pending_progress = [], ""
                calls.append((stream, call))
            self._last_write = time.monotonic()
        return calls

    def _write(self, wanted: Callable[[RequestStream], bool]) -> None:
        with self._write_lock:
            taken = self._take(wanted)
            if not taken:
                return
            answers = self._send([call for _, call in taken])
            for (stream, _), written in zip(taken, answers, strict=True):
                if written is True:
                    stream.written = True
                elif written is False:
                    stream.refused = True  # another worker runs the request now; its delivery owns the stream

    def _send(self, calls: Sequence[scripts.Call[bool]]) -> list[Any]:
        def log_outage(state: Any) -> None:
            log.error("stream writer: Redis unreachable (%s); retrying", state.outcome.exception())

        try:
            return connection.outage_retry(WRITE_RETRY_SECONDS, log_outage)(lambda: self.store.write_streams(calls))
        except Exception:  # the chunks are lost, the request goes on (its result is written as usual)
            log.exception("stream writer: %d write(s) given up", len(calls))
            return [None] * len(calls)

    # --- the end of a request (the publisher's thread) -----------------------------------------------

    def drain(self, items: Iterable[Item]) -> None:
        """Write what these requests still have pending, now (before their results are written)."""
        keys = {id(self._open[id(item)]) for item in items if id(item) in self._open}
        if keys:
            self._write(lambda stream: id(stream) in keys)

    def end(self, ended: Sequence[tuple[Item, Outcome]]) -> None:
        """Each request's done entry, for those that streamed (in this delivery or an earlier one), in one round
        trip; and forget their streams."""
        calls: list[scripts.Call[bool]] = []
        for item, outcome in ended:
            stream = self.forget(item)
            streamed = stream is not None and stream.written and not stream.refused
            if not streamed and item.deliveries <= 1:
                continue  # nothing streamed: no stream to end (the common case costs nothing)
            ttl_ms = int(self.settings[item.service].ttl_seconds * 1000)
            if stream is not None and streamed and not stream.used and outcome.status == 200 and outcome.body:
                # It reported progress only: its result goes in the stream as its one chunk (within the cap).
                calls.append(_result_chunk(item, outcome, stream))
            calls.append(
                scripts.chunks_end(
                    item.service,
                    item.request_id,
                    delivery=item.deliveries,
                    done_json=json.dumps(done_body(outcome), ensure_ascii=False, separators=(",", ":")),
                    ttl_ms=ttl_ms,
                    if_exists=not streamed,
                )
            )
        if calls:
            with self._write_lock:
                self._send(calls)

    def forget(self, item: Item) -> RequestStream | None:
        """The item is no longer this process's (finished, handed over, released): drop what is pending."""
        with self._changed:
            stream = self._open.pop(id(item), None)
            if stream is not None and self._dirty.pop(id(stream), None) is not None:
                self._count -= len(stream.pending)
                stream.pending = []
        return stream

    def stream_of(self, item: Item) -> RequestStream | None:
        with self._changed:
            return self._open.get(id(item))


def _result_chunk(item: Item, outcome: Outcome, stream: RequestStream) -> scripts.Call[bool]:
    body = outcome.body[: stream.max_bytes]
    try:
        body.decode()
        encoding = TEXT
    except UnicodeDecodeError:
        encoding = BYTES
    return scripts.chunks_append(
        item.service, item.request_id, delivery=item.deliveries, entries=[("c", encoding, body)], ttl_ms=stream.ttl_ms
    )


def done_body(outcome: Outcome) -> dict[str, object]:
    """The done event's JSON: the status, `lastCode` where it is not 200, and a failure's message."""
    body: dict[str, object] = {"statusCode": outcome.status}
    if outcome.status != 200:
        body["lastCode"] = str(outcome.status)
        body["message"] = outcome.message or outcome.body[:500].decode(errors="replace")
    return body


# --- the process's writer -------------------------------------------------------------------------

_writer: StreamWriter | None = None


def install(writer: StreamWriter | None) -> None:
    """Make `writer` the one this process's requests stream to (the worker does this at start-up)."""
    global _writer
    _writer = writer


def installed() -> StreamWriter | None:
    return _writer


def context_for(item: Item) -> RequestContext:
    """The RequestContext of an item about to run, with its stream when this process streams."""
    writer = _writer
    return RequestContext.of(item, writer.open(item) if writer is not None else None)


def forget_all(items: Iterable[Item]) -> None:
    writer = _writer
    if writer is not None:
        for item in items:
            writer.forget(item)
