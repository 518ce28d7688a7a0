"""The Lua scripts that make each queue operation atomic, and one typed wrapper per script.

Each script in `lua/` runs with `lua/lib.lua` (shared helpers) in front of it; its header names its KEYS
and ARGV. A wrapper here builds them from named, typed arguments and returns a `Call`: the script, its keys
and arguments, and how its answer becomes a typed result (or a domain exception). The same Call runs on the
API's asyncio client and on a worker's sync client (`Scripts.run` / `Scripts.run_async`), or in a pipeline.
redis-py sends EVALSHA and falls back to EVAL, so a restarted Redis needs no reload.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from functools import cache
from importlib import resources
from typing import Any, Generic, TypeVar

from queue_service.store import keys
from queue_service.store.keys import WORKER_GROUP, QueueKeys
from queue_service.store.model import (
    RELEASE_IDLE_MS,
    RELEASED_ONLY_MS,
    REPLY_TTL_MS,
    DataFrame,
    Delivery,
    EndOfStream,
    Finished,
    Item,
    ItemGone,
    NoLiveWorker,
    NotHolder,
    Outcome,
    QueueEnded,
    QueueFull,
    Read,
    Refused,
    Reply,
    Taken,
    TooManyGroups,
)

T = TypeVar("T")
Arg = str | int | float | bytes
NAMES = (
    "put",
    "take",
    "finish",
    "lease",
    "remove",
    "read",
    "search",
    "status",
    "deliver",
    "held",
    "join",
    "rate",
    "reconcile",
    "eos",
    "negative",
    "count",
)
# How many replies one API process's reply stream keeps (it reads them as they come).
REPLY_STREAM_MAXLEN = 10_000
# Most items counted ahead of one in a search or a status (the scan is inside Redis).
AHEAD_CAP = 100_000


@cache
def source(name: str) -> str:
    folder = resources.files("queue_service.store") / "lua"
    header = f"local WORKER_GROUP = '{WORKER_GROUP}'\n"
    return header + (folder / "lib.lua").read_text() + "\n" + (folder / f"{name}.lua").read_text()


@dataclass(frozen=True, slots=True)
class Call(Generic[T]):
    """One script call: which script, its KEYS and ARGV, and how its answer is read."""

    script: str
    keys: Sequence[str]
    args: Sequence[Arg]
    decode: Callable[[Any], T]


class Scripts:
    """The scripts registered on one client (sync `redis.Redis` or `redis.asyncio.Redis`)."""

    def __init__(self, client: Any) -> None:
        self._scripts = {name: client.register_script(source(name)) for name in NAMES}

    def run(self, call: Call[T], client: Any = None) -> T:
        return call.decode(self._scripts[call.script](keys=call.keys, args=call.args, client=client))

    async def run_async(self, call: Call[T], client: Any = None) -> T:
        return call.decode(await self._scripts[call.script](keys=call.keys, args=call.args, client=client))

    def queue(self, call: Call[Any], pipeline: Any) -> None:
        """Add the call to a pipeline; `call.decode` then reads its answer among the pipeline's."""
        self._scripts[call.script](keys=call.keys, args=call.args, client=pipeline)


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _flat_fields(flat: Sequence[Any]) -> dict[str, bytes]:
    return {_text(flat[i]): flat[i + 1] for i in range(0, len(flat), 2)}


def _tags_json(tags: Mapping[str, str] | None) -> str:
    return json.dumps(dict(tags), ensure_ascii=False, separators=(",", ":")) if tags else ""


def frame_from_entry(entry_id: bytes | str, flat: Sequence[Any]) -> DataFrame:
    fields = _flat_fields(flat)
    tags: dict[str, str] = json.loads(fields.get("tags") or b"{}")
    request_id = _text(fields.get("rid", b""))
    if request_id:
        tags.setdefault("requestId", request_id)
    return DataFrame(
        index=keys.index_of(entry_id),
        tags=tags,
        data=bytes(fields.get("data", b"")),
        message=_text(fields.get("message", b"")),
    )


def item_from_entry(service: str, taken: Sequence[Any]) -> Item:
    stream, entry_id, flat, deliveries, exhausted = taken
    fields = _flat_fields(flat)
    return Item(
        service=service,
        stream=_text(stream),
        entry_id=_text(entry_id),
        index=keys.index_of(entry_id),
        request_id=_text(fields.get("rid", b"")),
        data=bytes(fields.get("data", b"")),
        tags=json.loads(fields.get("tags") or b"{}"),
        put_ms=int(fields.get("ts") or 0),
        reply_channel=_text(fields.get("reply", b"")),
        deliveries=int(deliveries),
        exhausted=bool(int(exhausted)),
        path=_text(fields.get("path", b"")),
    )


# --- put -------------------------------------------------------------------------------------


def put(
    qk: QueueKeys,
    *,
    data: bytes,
    tags: Mapping[str, str],
    request_id: str,
    now_ms: int,
    priority: bool = False,
    max_items: int = 0,
    max_bytes: int = 0,
    reply_channel: str = "",
    path: str = "",
) -> Call[int]:
    """Append one item within the queue's bound; QueueFull past it, NoLiveWorker for a sync request without one."""

    def decode(raw: Any) -> int:
        if isinstance(raw, list):
            if _text(raw[0]) == "no-worker":
                raise NoLiveWorker(f"no live worker serves service {qk.service!r}")
            if _text(raw[0]) == "ended":
                raise QueueEnded(
                    f"queue {qk.service}/{qk.queue} has ended (end of stream after index {_text(raw[1])}): "
                    "it takes no more puts; a truncate past that index reopens it"
                )
            what = _text(raw[1])
            bound = f"{max_bytes} bytes of results" if what == "bytes" else f"{max_items} {_counted(qk)}"
            raise QueueFull(f"queue {qk.service}/{qk.queue} is full ({bound})")
        return max(0, int(raw))

    return Call(
        "put",
        [
            qk.stream(priority),
            qk.seq,
            qk.ids,
            qk.counts,
            keys.live_workers(qk.service) if reply_channel else qk.seq,
            qk.end,
        ],
        [
            qk.queue,
            data,
            json.dumps(dict(tags), ensure_ascii=False, separators=(",", ":")),
            request_id,
            now_ms,
            "1" if priority else "0",
            max_items,
            max_bytes,
            reply_channel,
            now_ms / 1000,
            path,
        ],
        decode,
    )


def _counted(qk: QueueKeys) -> str:
    return "waiting" if qk.queue == "input" else "results"


# --- the workers' side -----------------------------------------------------------------------


def take(
    service: str,
    *,
    consumer: str,
    want: int,
    lease_ms: int,
    max_delivery: int,
    sink_max_items: int,
    sink_max_bytes: int,
    restart_guard: bool = True,
) -> Call[Taken]:
    """Up to `want` items for a worker; `lease_ms` > 0 also claims items whose lease lapsed."""
    qi = keys.input_queue(service)

    def decode(raw: Any) -> Taken:
        sink_full, last_index, taken = raw
        return Taken([item_from_entry(service, t) for t in taken], bool(int(sink_full)), int(last_index))

    return Call(
        "take",
        [qi.high, qi.normal, qi.counts, qi.seq],
        [
            consumer,
            want,
            lease_ms,
            max_delivery,
            sink_max_items,
            sink_max_bytes,
            RELEASED_ONLY_MS if restart_guard else "",
        ],
        decode,
    )


FINISH_NOT_HOLDER, FINISH_GONE = -1, -2


def finish(
    item: Item,
    outcome: Outcome,
    *,
    consumer: str,
    now_ms: int,
    processing_seconds: float = 0.0,
    held: bool = True,
) -> Call[Finished]:
    """Publish an item's outcome and remove it; NotHolder when the caller no longer holds it (ItemGone: nobody does).

    A sync request's answer goes to its API process's reply stream, never to the sink. An async result with
    an empty body and status 200 writes nothing (users who deliver results elsewhere do this). `held=False`
    publishes for an item that is gone already: the terminal answer of a cancelled request.
    """
    qi, qs = keys.input_queue(item.service), keys.sink_queue(item.service)
    if item.sync:
        mode = "reply"
    elif outcome.body or outcome.status != 200:
        mode = "sink"
    else:
        mode = "none"
    tags = dict(item.tags, requestId=item.request_id)
    if outcome.status != 200:
        tags["lastCode"] = str(outcome.status)

    def decode(raw: Any) -> Finished:
        if not isinstance(raw, list):
            if int(raw) == FINISH_GONE:
                raise ItemGone(f"{item.service} #{item.index} is gone from the input queue")
            raise NotHolder(f"{item.service} #{item.index} is held by another consumer now")
        written, waiting, last_index = raw
        return Finished(int(written), int(waiting), int(last_index))

    return Call(
        "finish",
        [
            item.stream,
            qi.ids,
            qi.counts,
            qs.normal,
            qs.seq,
            qs.ids,
            keys.replies(item.service, item.reply_channel) if item.sync else qs.normal,
            qi.seq,
        ],
        [
            consumer,
            item.entry_id,
            "1" if held else "0",
            mode,
            item.request_id,
            outcome.body,
            json.dumps(tags, ensure_ascii=False, separators=(",", ":")),
            now_ms,
            outcome.message,
            outcome.status,
            outcome.content_type,
            f"{item.queue_wait:.6f}",
            f"{processing_seconds:.6f}",
            REPLY_TTL_MS,
            REPLY_STREAM_MAXLEN,
        ],
        decode,
    )


def decode_reply(fields: dict[bytes, bytes]) -> Reply:
    """A sync answer as finish.lua writes it to an API process's reply stream."""
    outcome = Outcome(
        body=bytes(fields.get(b"body", b"")),
        status=int(fields.get(b"status", b"500")),
        content_type=fields.get(b"type", b"application/octet-stream").decode(),
    )
    return Reply(
        request_id=fields.get(b"rid", b"").decode(),
        outcome=outcome,
        queue_wait=float(fields.get(b"wait", b"0")),
        processing=float(fields.get(b"proc", b"0")),
    )


def lease(
    stream: str, entry_ids: Sequence[str], *, group: str, consumer: str, release: bool = False
) -> Call[tuple[int, int]]:
    """Renew (or release) a hold on entries: (still held, gone)."""

    def decode(raw: Any) -> tuple[int, int]:
        held, gone = raw
        return int(held), int(gone)

    return Call("lease", [stream], [group, consumer, RELEASE_IDLE_MS if release else 0, *entry_ids], decode)


def reconcile(service: str, *, max_scan: int = 10_000) -> Call[dict[str, int]]:
    qi, qs = keys.input_queue(service), keys.sink_queue(service)

    def decode(raw: Any) -> dict[str, int]:
        names = ("waiting", "waiting_high", "sink_used", "sink_bytes")
        return {name: int(value or 0) for name, value in zip(names, raw, strict=True)}

    return Call("reconcile", [qi.high, qi.normal, qi.counts, qs.high, qs.normal], [max_scan], decode)


# --- reading and removing --------------------------------------------------------------------


def read(
    qk: QueueKeys,
    *,
    start: int = 0,
    length: int = 1,
    request_id: str = "",
    tags: Mapping[str, str] | None = None,
    max_bytes: int,
    reserve_token: str = "",
    now_ms: int = 0,
    reserve_ms: int = 0,
) -> Call[Read]:
    """Items from index `start` (or the item of `request_id`); `reserve_token` reserves them for an auto-delete."""

    def decode(raw: Any) -> Read:
        last_index, entries, _removed = raw
        return Read([frame_from_entry(entry_id, flat) for entry_id, flat in entries], int(last_index))

    return Call(
        "read",
        [qk.high, qk.normal, qk.ids, qk.seq, qk.reserved],
        [
            start,
            length,
            request_id,
            "1" if reserve_token else "0",
            _tags_json(tags),
            max_bytes,
            now_ms,
            reserve_ms,
            reserve_token,
        ],
        decode,
    )


def remove(
    qk: QueueKeys,
    mode: str,
    values: Sequence[int | str],
    *,
    now_ms: int,
    group: str = "",
    token: str = "",
) -> Call[tuple[int, bool]]:
    """Remove items (see remove.lua for the modes): (how many were removed, whether a 'below' step stopped early)."""

    def decode(raw: Any) -> tuple[int, bool]:
        removed, more = raw
        return int(removed), bool(int(more))

    return Call(
        "remove",
        [qk.high, qk.normal, qk.ids, qk.counts, qk.reserved],
        [qk.queue, mode, group, now_ms, token, *values],
        decode,
    )


def negative(
    qk: QueueKeys,
    indexes: Sequence[int],
    *,
    group: str,
    max_delivery: int,
    now_ms: int,
    last_code: int,
    message: str,
) -> Call[Refused]:
    """A client group refuses items it holds: back to the group, or ended past `max_delivery` (negative.lua)."""
    qs = keys.sink_queue(qk.service)

    def decode(raw: Any) -> Refused:
        released, ended = raw
        return Refused(int(released), int(ended))

    return Call(
        "negative",
        [qk.high, qk.normal, qk.ids, qk.counts, qs.normal, qs.seq, qs.ids],
        [qk.queue, group, max_delivery, RELEASE_IDLE_MS, now_ms, last_code, message, *indexes],
        decode,
    )


def count(qk: QueueKeys, *, priority_only: bool = False, tags: Mapping[str, str] | None = None) -> Call[int]:
    """Items in the queue (the priority stream only); with `tags`, those matching among the first AHEAD_CAP."""
    return Call("count", [qk.high, qk.normal], ["1" if priority_only else "0", _tags_json(tags), AHEAD_CAP], int)


# --- end of stream ---------------------------------------------------------------------------


def end_stream(qk: QueueKeys) -> Call[int]:
    """End the queue's stream after the last index given out (kept if it has ended already); the end index."""
    return Call("eos", [qk.high, qk.normal, qk.seq, qk.end], ["end", 0], int)


def end_of_stream(qk: QueueKeys) -> Call[EndOfStream | None]:
    """The queue's end of stream, or None while it is open."""

    def decode(raw: Any) -> EndOfStream | None:
        index, left = raw
        return None if int(index) < 0 else EndOfStream(int(index), bool(int(left)))

    return Call("eos", [qk.high, qk.normal, qk.seq, qk.end], ["check", 0], decode)


def reopen(qk: QueueKeys, *, below: int) -> Call[bool]:
    """A truncate removed everything below `below`: past the end, the queue takes puts again. True if it did."""
    return Call("eos", [qk.high, qk.normal, qk.seq, qk.end], ["lift", below], lambda raw: bool(int(raw)))


def search(qk: QueueKeys, index: int, *, group: str) -> Call[tuple[str, bool, int] | None]:
    def decode(raw: Any) -> tuple[str, bool, int] | None:
        if not raw:
            return None
        holder, pending, ahead = raw
        return _text(holder or b""), bool(int(pending)), int(ahead)

    return Call("search", [qk.high, qk.normal], [index, group, AHEAD_CAP], decode)


def status(service: str, request_id: str) -> Call[list[Any] | None]:
    """The raw state of one request (status.lua's answer); the store shapes it."""
    qi, qs = keys.input_queue(service), keys.sink_queue(service)
    return Call(
        "status",
        [qi.high, qi.normal, qi.ids, qs.high, qs.normal, qs.ids],
        [request_id, AHEAD_CAP],
        lambda raw: list(raw) if raw else None,
    )


# --- watches (client consumer groups) --------------------------------------------------------


def join(qk: QueueKeys, group: str, *, start_index: int, now_ms: int, max_groups: int, idle_ms: int) -> Call[bool]:
    """Register a consumer of `group` (creating the group); TooManyGroups when the queue has no room for it."""

    def decode(raw: Any) -> bool:
        if int(raw) < 0:
            raise TooManyGroups(
                f"queue {qk.service}/{qk.queue} has {max_groups} consumer groups with live consumers "
                "(queue.max_groups); use one of them, or retry when one is idle"
            )
        return int(raw) == 1

    start = keys.stream_id(start_index - 1) if start_index > 1 else "0"
    return Call("join", [qk.high, qk.normal, qk.groups], [group, start, now_ms, max_groups, idle_ms], decode)


def deliver(
    qk: QueueKeys,
    *,
    group: str,
    consumer: str,
    want: int,
    lease_ms: int,
    tags: Mapping[str, str] | None,
    max_bytes: int,
    watch_end: bool = False,
) -> Call[Delivery | None]:
    """Up to `want` items for a watch consumer (lapsed ones of its group first when `lease_ms` > 0); None: no group.
    With `watch_end`, a delivery of nothing also tells the queue's end of stream."""

    def decode(raw: Any) -> Delivery | None:
        if _text(raw[0]) == "nogroup":
            return None
        frames = [frame_from_entry(entry_id, flat) for _stream, entry_id, flat in raw[1]]
        end = None
        if len(raw) > 2 and int(raw[2]) >= 0:
            end = EndOfStream(int(raw[2]), bool(int(raw[3])))
        return Delivery(frames, end)

    return Call(
        "deliver",
        [qk.high, qk.normal, qk.end],
        [
            group,
            consumer,
            want,
            lease_ms,
            RELEASED_ONLY_MS if lease_ms else "",
            _tags_json(tags),
            max_bytes,
            "1" if watch_end else "0",
        ],
        decode,
    )


def held(qk: QueueKeys, *, group: str, consumer: str, mode: str, most: int) -> Call[int]:
    """Items a watch consumer holds ('count'), also renewing ('renew') or releasing ('release') them."""
    return Call("held", [qk.high, qk.normal], [group, consumer, mode, most, RELEASE_IDLE_MS], int)


# --- admission -------------------------------------------------------------------------------


def rate(service: str, per_second: float) -> Call[int]:
    """0 when a request is admitted, else milliseconds until one would be."""
    return Call("rate", [keys.rate_limit(service)], [per_second], int)
