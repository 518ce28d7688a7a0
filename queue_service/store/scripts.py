"""The Lua scripts that make each queue operation atomic, and one typed wrapper per script.

Each script in `lua/` runs with `lua/lib.lua` (shared helpers) in front of it; its header names its KEYS
and ARGV. A wrapper here builds them from named, typed arguments and returns a `Call`: the script, its keys
and arguments, and how its answer becomes a typed result (or a domain exception). The same Call runs on the
API's asyncio client and on a worker's sync client (`Scripts.run` / `Scripts.run_async`), or in a pipeline.
redis-py sends EVALSHA and falls back to EVAL, so a restarted Redis needs no reload.
"""

from __future__ import annotations

import json
import logging
import re
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from functools import cache
from importlib import resources
from typing import Any, Generic, TypeVar

import msgpack
from redis.exceptions import ClusterError, NoScriptError, TryAgainError

from queue_service.store import keys
from queue_service.store.keys import WEBHOOK_GROUP, WORKER_GROUP, QueueKeys
from queue_service.store.model import (
    EXPIRED_MESSAGE,
    RELEASE_IDLE_MS,
    RELEASED_ONLY_MS,
    REPLY_TTL_MS,
    DataFrame,
    Delivery,
    EndOfStream,
    FailedResult,
    FailureScan,
    Finished,
    Holding,
    Item,
    ItemGone,
    NoLiveWorker,
    NotHolder,
    Outcome,
    PutResult,
    QueueEnded,
    QueueFull,
    Read,
    Refused,
    Reply,
    StoreError,
    Taken,
    TooManyGroups,
    WatchDelivery,
)

T = TypeVar("T")
log = logging.getLogger("queue_service.store")
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
    "holding",
    "failures",
    "peek",
    "expire",
    "hook_take",
    "hook_done",
    "hook_revive",
    "eos",
    "negative",
    "count",
    "chunks",
)
_LUA_FUNCTION = re.compile(r"local function (\w+)\(")
# How many replies one API process's reply stream keeps (it reads them as they come).
REPLY_STREAM_MAXLEN = 10_000
# Most items counted ahead of one in a search or a status (the scan is inside Redis).
AHEAD_CAP = 100_000
# How long an Idempotency-Key answers with its first put.
IDEMPOTENCY_SECONDS = 24 * 3600
# Dead letters kept per service (the oldest go first past it).
DEAD_LETTERS_KEPT = 10_000


@cache
def source(name: str) -> str:
    folder = resources.files("queue_service.store") / "lua"
    header = f"local WORKER_GROUP = '{WORKER_GROUP}'\nlocal WEBHOOK_GROUP = '{WEBHOOK_GROUP}'\n"
    body = (folder / f"{name}.lua").read_text()
    return header + helpers_for(body, (folder / "lib.lua").read_text()) + "\n" + body


def helpers_for(body: str, lib: str) -> str:
    """The functions of `lib` that `body` names, with those they name in turn, in lib's order (a function
    is defined before its callers). Every call of a script defines its helpers anew (a script keeps no
    globals): all of lib.lua cost ~1.6 µs of Redis CPU per call."""
    functions: dict[str, str] = {}
    name, lines = "", []
    for line in lib.splitlines(keepends=True):
        if not name and (found := _LUA_FUNCTION.match(line)):
            name = found[1]
        lines.append(line)
        if name and line.rstrip() == "end":  # a top-level function ends at an `end` in the first column
            functions[name], name, lines = "".join(lines), "", []
    needed: set[str] = set()
    todo = [body]
    while todo:
        text = todo.pop()
        for helper, code in functions.items():
            if helper not in needed and re.search(rf"\b{helper}\b", text):
                needed.add(helper)
                todo.append(code)
    return "".join(code for helper, code in functions.items() if helper in needed)


@dataclass(frozen=True, slots=True)
class Call(Generic[T]):
    """One script call: which script, its KEYS and ARGV, and how its answer is read."""

    script: str
    keys: Sequence[str]
    args: Sequence[Arg]
    decode: Callable[[Any], T]


# A cluster's "not now" answers (TRYAGAIN: a slot's keys are moving; CLUSTERDOWN: a shard fails over; "TTL
# exhausted": more redirections than the client follows): the call did not run, so `run_many` sends it again,
# backing off, before it gives up (the caller's outage retry then).
CLUSTER_BUSY = (TryAgainError, ClusterError)
CLUSTER_BUSY_ATTEMPTS = 8
CLUSTER_BUSY_PAUSE_SECONDS = 0.05


class Scripts:
    """The scripts registered on one client (sync `redis.Redis` or `redis.asyncio.Redis`)."""

    def __init__(self, client: Any) -> None:
        self._scripts = {name: client.register_script(source(name)) for name in NAMES}

    def sha(self, name: str) -> str:
        """The SHA1 that EVALSHA names the script by."""
        sha: str = self._scripts[name].sha
        return sha

    def source_of(self, name: str) -> str:
        """The script's text (to load it into a Redis that does not know it)."""
        text: str = self._scripts[name].script
        return text

    def run(self, call: Call[T], client: Any = None) -> T:
        return call.decode(self._scripts[call.script](keys=call.keys, args=call.args, client=client))

    async def run_async(self, call: Call[T], client: Any = None) -> T:
        return call.decode(await self._scripts[call.script](keys=call.keys, args=call.args, client=client))

    def queue(self, call: Call[Any], pipeline: Any) -> None:
        """Add the call to a pipeline; `call.decode` then reads its answer among the pipeline's."""
        self._scripts[call.script](keys=call.keys, args=call.args, client=pipeline)

    def run_many(
        self, calls: Sequence[Call[T]], client: Any, *, wait: tuple[int, int] | None = None
    ) -> list[T | StoreError]:
        """Several calls in one round trip (sync client); each answer decoded, a StoreError in its place.

        Plain EVALSHAs in one pipeline: redis-py's script registration would send SCRIPT EXISTS first (a
        second round trip). A script Redis does not know (it restarted) is loaded and its calls sent again:
        NOSCRIPT means the call did not run. `wait` = (replicas, timeout ms) ends the pipeline with a WAIT
        (`queue.durability: replicated`): the same connection, so it covers these writes. A WAIT that times out
        is logged, not raised: the writes are on the primary, and running them again would publish twice.
        On a cluster the pipeline goes to each call's node; a call answered TRYAGAIN or CLUSTERDOWN did not run
        either, and is sent again after a pause (`CLUSTER_BUSY`).
        """
        answers: list[Any] = [None] * len(calls)
        todo = list(range(len(calls)))
        loaded = False
        for attempt in range(CLUSTER_BUSY_ATTEMPTS):
            with client.pipeline(transaction=False) as pipe:
                for i in todo:
                    call = calls[i]
                    pipe.execute_command("EVALSHA", self.sha(call.script), len(call.keys), *call.keys, *call.args)
                if wait is not None:
                    pipe.wait(*wait)
                raw = pipe.execute(raise_on_error=False)
            if wait is not None:
                acknowledged = raw.pop()
                if isinstance(acknowledged, int) and acknowledged < wait[0]:
                    log.warning(
                        "%d of %d replica(s) confirmed %d result(s) within %d ms: they are on the primary only",
                        acknowledged,
                        wait[0],
                        len(todo),
                        wait[1],
                    )
            missing, busy = [], []
            for i, answer in zip(todo, raw, strict=True):
                if isinstance(answer, NoScriptError) and not loaded:
                    missing.append(i)
                elif isinstance(answer, CLUSTER_BUSY) and attempt < CLUSTER_BUSY_ATTEMPTS - 1:
                    busy.append(i)  # a slot moving or a shard failing over: the call did not run
                elif isinstance(answer, Exception):  # an error of Redis or of the client: not an answer
                    raise answer
                else:
                    answers[i] = answer
            if not missing and not busy:
                break
            for name in {calls[i].script for i in missing}:
                client.script_load(self.source_of(name))
            loaded = loaded or bool(missing)
            if busy:
                time.sleep(min(CLUSTER_BUSY_PAUSE_SECONDS * 2**attempt, 1.0))
            todo = sorted(missing + busy)
        else:  # the last round still had calls that did not run (a script lost again right after its load)
            raise NoScriptError(f"{len(todo)} call(s) did not run after {CLUSTER_BUSY_ATTEMPTS} rounds")
        decoded: list[T | StoreError] = []
        for call, answer in zip(calls, answers, strict=True):
            try:
                decoded.append(call.decode(answer))
            except StoreError as exc:
                decoded.append(exc)
        return decoded

    async def queue_async(self, call: Call[Any], pipeline: Any) -> None:
        """The same for an asyncio pipeline (redis-py's asyncio script call is a coroutine even there)."""
        await self._scripts[call.script](keys=call.keys, args=call.args, client=pipeline)


def unpacked(raw: bytes) -> Any:
    """A script's answer packed by lib.lua's `packed`: lists, bytes and ints, as a RESP array reply would be."""
    return msgpack.unpackb(raw, raw=True)


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _flat_fields(flat: Sequence[Any]) -> dict[str, bytes]:
    return {_text(flat[i]): flat[i + 1] for i in range(0, len(flat), 2)}


# One encoder, built once: json.dumps with non-default options builds a new one per call (~9 % of a put's
# API CPU, py-spy, issue 17).
_COMPACT_JSON = json.JSONEncoder(ensure_ascii=False, separators=(",", ":"))


def _tags_json(tags: Mapping[str, str] | None) -> str:
    return _COMPACT_JSON.encode(dict(tags)) if tags else ""


def _item_tags_json(tags: Mapping[str, str]) -> str:
    """An item's tags as put.lua stores them: "{}" for none."""
    return _COMPACT_JSON.encode(dict(tags)) if tags else "{}"


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


# What take.lua says of an item it hands over: run it, give it up (exhausted), or end it (expired).
TAKE_RUN, TAKE_EXHAUSTED, TAKE_EXPIRED = 0, 1, 2


def item_from_entry(service: str, taken: Sequence[Any]) -> Item:
    stream, entry_id, flat, deliveries, ending = taken
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
        exhausted=int(ending) == TAKE_EXHAUSTED,
        expired=int(ending) == TAKE_EXPIRED,
        path=_text(fields.get("path", b"")),
        content_type=_text(fields.get("type", b"")),
        hooks=_text(fields.get("hooks", b"")),
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
    check_live: bool = True,
    path: str = "",
    content_type: str = "",
    ttl_ms: int = 0,
    hooks: str = "",
    idempotency_digest: str = "",
) -> Call[PutResult]:
    """Append one item within the queue's bound; QueueFull past it, NoLiveWorker for a sync request without one
    (when `check_live`).

    `ttl_ms`: the request's deadline from now; `hooks`: its webhook targets (JSON); `idempotency_digest`: the
    sha256 of an Idempotency-Key, whose first put's answer is returned (`repeated`) within its lifetime."""

    def decode(raw: Any) -> PutResult:
        if isinstance(raw, list):
            if _text(raw[0]) == "same":
                index, _, first_id = _text(raw[1]).partition(":")
                return PutResult(int(index), first_id, repeated=True)
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
        return PutResult(max(0, int(raw)), request_id)

    look_for_workers = bool(reply_channel) and check_live
    return Call(
        "put",
        [
            qk.stream(priority),
            qk.seq,
            qk.ids,
            qk.counts,
            keys.live_workers(qk.service) if look_for_workers else qk.seq,
            keys.deadlines(qk.service),
            keys.idempotency(qk.service, idempotency_digest) if idempotency_digest else qk.seq,
            qk.end,
            keys.bell(qk.service) if qk.queue == "input" else qk.seq,
        ],
        [
            qk.queue,
            data,
            _item_tags_json(tags),
            request_id,
            now_ms,
            "1" if priority else "0",
            max_items,
            max_bytes,
            reply_channel,
            now_ms / 1000 if look_for_workers else "",
            path,
            content_type,
            ttl_ms,
            hooks,
            "1" if idempotency_digest else "0",
            IDEMPOTENCY_SECONDS,
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
        sink_full, last_index, taken = unpacked(raw)
        return Taken([item_from_entry(service, t) for t in taken], bool(int(sink_full)), int(last_index))

    hooks = keys.webhooks(service)
    return Call(
        "take",
        [qi.high, qi.normal, qi.counts, qi.seq, hooks.stream, hooks.requests],
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
FINISH_ARGS_PER_ITEM = 22  # finish.lua's PER


@dataclass(frozen=True)
class FinishPart:
    """One item's share of a finish call: the call's KEYS (the same for every item of one call) and its ARGV."""

    service: str
    index: int
    keys: list[str]
    args: list[Arg]


def finish_part(
    item: Item,
    outcome: Outcome,
    *,
    consumer: str,
    now_ms: int,
    processing_seconds: float = 0.0,
    held: bool = True,
    fresh: bool = False,
    inline_bytes: int = 0,
) -> FinishPart:
    """An item's outcome to publish (and the item to remove); `finish` makes the call of one or several.

    A sync request's answer goes to its API process's reply stream, never to the sink. An async result with
    an empty body and status 200 writes nothing (users who deliver results elsewhere do this). `held=False`
    publishes for an item that is gone already: the terminal answer of a cancelled request. `fresh`: the caller
    took the held item less than half a lease ago, so no other worker can hold it, and the script's holder
    check is its acknowledgement (one command less). (A host that slept past the lease, which the monotonic
    clock does not count, breaks that premise; then two workers' results race and the first one stored
    stands, as after any lapsed lease.) The request's `completed` webhooks are enqueued in the same step,
    with the result in them up to `inline_bytes`.
    """
    qi, qs = keys.input_queue(item.service), keys.sink_queue(item.service)
    hooks = keys.webhooks(item.service)
    if item.sync:
        mode = "reply"
    elif outcome.body or outcome.status != 200:
        mode = "sink"
    else:
        mode = "none"
    tags = dict(item.tags, requestId=item.request_id)
    if outcome.status != 200:
        tags["lastCode"] = str(outcome.status)
    return FinishPart(
        item.service,
        item.index,
        [
            item.stream,
            qi.ids,
            qi.counts,
            qs.normal,
            qs.seq,
            qs.ids,
            keys.replies(item.service, item.reply_channel) if item.sync else qs.normal,
            hooks.stream,
            hooks.requests,
        ],
        [
            consumer,
            item.entry_id,
            ("2" if fresh else "1") if held else "0",
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
            item.hooks,
            "1" if item.hooks and len(outcome.body) <= inline_bytes else "0",
            item.put_ms,
            int(item.taken_at * 1000),
            item.deliveries,
            item.index,
            "expired" if item.expired else "",
        ],
    )


def finish(parts: Sequence[FinishPart], *, count_waiting: bool = True) -> Call[list[Finished | StoreError]]:
    """Publish these outcomes and remove their items in one step (parts of one service with the same KEYS: a
    chain's results); per item its Finished, or NotHolder when the caller no longer holds it (ItemGone: nobody
    does). `count_waiting`: the last item's Finished tells how many items wait (asked of a pipeline's last
    call only: the others' would be out of date at once)."""
    if not parts or any(part.keys != parts[0].keys or len(part.args) != FINISH_ARGS_PER_ITEM for part in parts):
        raise ValueError("one finish call takes one or more items with the same keys")

    def decode(raw: Any) -> list[Finished | StoreError]:
        waiting, written = unpacked(raw)
        answers: list[Finished | StoreError] = []
        for i, (part, index) in enumerate(zip(parts, written, strict=True)):
            what = f"{part.service} #{part.index}"
            if int(index) == FINISH_GONE:
                answers.append(ItemGone(f"{what} is gone from the input queue"))
            elif int(index) < 0:
                answers.append(NotHolder(f"{what} is held by another consumer now"))
            else:
                last = i == len(parts) - 1 and int(waiting) >= 0
                answers.append(Finished(int(index), int(waiting) if last else None))
        return answers

    args: list[Arg] = ["1" if count_waiting else "0"]
    for part in parts:
        args += part.args
    return Call("finish", parts[0].keys, args, decode)


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


LEASE_HELD, LEASE_HANDED_OVER, LEASE_GONE = 1, 0, -1


def lease(
    stream: str, entry_ids: Sequence[str], *, group: str, consumer: str, release: bool = False
) -> Call[list[int]]:
    """Renew (or release) a hold on entries: per entry LEASE_HELD, LEASE_HANDED_OVER (another consumer
    holds it) or LEASE_GONE (it no longer exists: removed while held)."""

    def decode(raw: Any) -> list[int]:
        return [int(state) for state in raw]

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
        last_index, entries, _removed = unpacked(raw)
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

    hooks = keys.webhooks(qk.service)
    return Call(
        "remove",
        [
            qk.high,
            qk.normal,
            qk.ids,
            qk.counts,
            qk.reserved,
            keys.sink_queue(qk.service).ids,
            hooks.stream,
            hooks.requests,
        ],
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
    qs, hooks = keys.sink_queue(qk.service), keys.webhooks(qk.service)

    def decode(raw: Any) -> Refused:
        released, ended = raw
        return Refused(int(released), int(ended))

    return Call(
        "negative",
        [qk.high, qk.normal, qk.ids, qk.counts, qs.normal, qs.seq, qs.ids, hooks.stream, hooks.requests],
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
        [
            qi.high,
            qi.normal,
            qi.ids,
            qs.high,
            qs.normal,
            qs.ids,
            keys.running(service),
            keys.webhooks(service).requests,
            keys.progress(service, request_id),
        ],
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
) -> Call[WatchDelivery | None]:
    """Up to `want` items for a watch consumer (lapsed ones of its group first when `lease_ms` > 0); None: no group.
    With `watch_end`, a delivery of nothing also tells the queue's end of stream."""

    def decode(packed: Any) -> WatchDelivery | None:
        raw = unpacked(packed)
        if _text(raw[0]) == "nogroup":
            return None
        frames = [frame_from_entry(entry_id, flat) for _stream, entry_id, flat in raw[1]]
        end = None
        if len(raw) > 2 and int(raw[2]) >= 0:
            end = EndOfStream(int(raw[2]), bool(int(raw[3])))
        return WatchDelivery(frames, end)

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


# --- the dashboard's reads (read-only) -------------------------------------------------------


def holding(service: str, *, most: int) -> Call[list[Holding]]:
    """The input items workers hold now, with their request ids (at most `most` per stream)."""
    qi = keys.input_queue(service)

    def decode(raw: Any) -> list[Holding]:
        return [
            Holding(
                worker=_text(consumer),
                index=keys.index_of(entry_id),
                request_id=_text(rid),
                put_ms=int(put_ms or 0),
                deliveries=int(deliveries),
                idle_ms=int(idle),
                priority=int(stream) == 1,
            )
            for stream, entry_id, consumer, idle, deliveries, rid, put_ms in raw
        ]

    return Call("holding", [qi.high, qi.normal], [most], decode)


def failures(service: str, *, scan: int, message_bytes: int) -> Call[FailureScan]:
    """The failed results among the newest `scan` items of each sink stream, newest first."""
    qs = keys.sink_queue(service)

    def decode(raw: Any) -> FailureScan:
        scanned, oldest, found = raw
        failed = [
            FailedResult(
                index=keys.index_of(entry_id),
                request_id=_text(rid),
                finished_ms=int(ts or 0),
                status=int(code),
                message=_text(message),
                size=int(size),
            )
            for entry_id, rid, ts, code, message, size in found
        ]
        failed.sort(key=lambda f: f.index, reverse=True)
        return FailureScan(int(scanned), int(oldest), failed)

    return Call("failures", [qs.high, qs.normal], [scan, message_bytes], decode)


def peek(service: str, index: int, *, max_bytes: int) -> Call[tuple[int, bytes] | None]:
    """(size, first `max_bytes` bytes) of one sink item's data, or None when it is not in the sink."""
    qs = keys.sink_queue(service)

    def decode(raw: Any) -> tuple[int, bytes] | None:
        if not raw:
            return None
        size, prefix = raw
        return int(size), bytes(prefix)

    return Call("peek", [qs.high, qs.normal], [index, max_bytes], decode)


# --- deadlines -------------------------------------------------------------------------------


def expire(service: str, *, most: int = 1000) -> Call[int]:
    """End up to `most` requests whose deadline passed while they waited (terminal 408 results); how many."""
    qi, qs, hooks = keys.input_queue(service), keys.sink_queue(service), keys.webhooks(service)
    return Call(
        "expire",
        [
            qi.high,
            qi.normal,
            qi.ids,
            qi.counts,
            qs.normal,
            qs.seq,
            qs.ids,
            keys.deadlines(service),
            hooks.stream,
            hooks.requests,
        ],
        [most, EXPIRED_MESSAGE],
        int,
    )


# --- webhook deliveries (the dispatcher's side) ----------------------------------------------


@dataclass(frozen=True, slots=True)
class DeliveryBatch:
    """What one hook_take found: the deliveries, the stream's newest entry id (to wait after), the next due time."""

    deliveries: list[Delivery]
    newest: str
    next_due_ms: int | None


def hook_take(service: str, *, consumer: str, want: int, lease_ms: int) -> Call[DeliveryBatch]:
    hooks = keys.webhooks(service)

    def decode(raw: Any) -> DeliveryBatch:
        taken, newest, next_due = raw
        deliveries = [
            Delivery(service, _text(entry_id), _text(webhook_id), int(attempt), _flat_fields(flat))
            for entry_id, flat, attempt, webhook_id in taken
        ]
        return DeliveryBatch(deliveries, _text(newest), int(float(next_due)) if next_due else None)

    return Call("hook_take", [hooks.stream, hooks.due], [consumer, want, lease_ms], decode)


def hook_done(
    delivery: Delivery,
    *,
    consumer: str,
    outcome: str,
    next_ms: int = 0,
    status: int = 0,
    error: str = "",
) -> Call[bool]:
    """Record an attempt: `delivered`, `gone`, `retry` (due at `next_ms`) or `dead`; False when no longer held."""
    hooks = keys.webhooks(delivery.service)
    return Call(
        "hook_done",
        [hooks.stream, hooks.due, hooks.dead, hooks.requests, hooks.stats],
        [
            consumer,
            delivery.entry_id,
            outcome,
            next_ms,
            delivery.request_id,
            delivery.state_key,
            delivery.attempt,
            status,
            error[:300],
            DEAD_LETTERS_KEPT,
        ],
        lambda raw: bool(int(raw)),
    )


def hook_revive(service: str, entry_ids: Sequence[str] = (), *, most: int = 1000) -> Call[int]:
    """Send dead letters again (these, or the oldest `most`), same webhook ids; how many went back."""
    hooks = keys.webhooks(service)
    return Call("hook_revive", [hooks.stream, hooks.dead, hooks.requests], [most, *entry_ids], int)


# --- what a request streams while it runs (workers/streaming.py writes, api/stream.py reads) -----


# A request's `progress` and `output` webhooks: at most one of each per this many ms (chunks.lua's gate keys).
STREAM_HOOK_GAP_MS = 1000


@dataclass(frozen=True, slots=True)
class StreamHooks:
    """What chunks.lua needs to enqueue a streaming request's `progress` / `output` webhooks with its writes."""

    hooks: str  # the item's webhook targets (JSON)
    events: frozenset[str]  # which of `progress`, `output` some target asks for (not empty)
    index: int
    put_ms: int
    start_ms: int
    inline_bytes: int  # webhook.max_result_bytes: output up to this size is in the payload, beyond it a link
    gap_ms: int = STREAM_HOOK_GAP_MS


STREAM_EVENTS = ("progress", "output")


def stream_hooks(item: Item, *, inline_bytes: int, start_ms: int) -> StreamHooks | None:
    """The StreamHooks of a request, None when no target of its webhooks asks for `progress` or `output`."""
    if not item.hooks:
        return None
    try:
        targets = json.loads(item.hooks)
    except ValueError:
        return None
    wanted = frozenset(event for target in targets for event in target.get("events", ()) if event in STREAM_EVENTS)
    if not wanted:
        return None
    return StreamHooks(item.hooks, wanted, item.index, item.put_ms, start_ms, inline_bytes)


def _chunk_keys(service: str, request_id: str) -> list[str]:
    hooks = keys.webhooks(service)
    return [
        keys.chunks(service, request_id),
        keys.progress(service, request_id),
        hooks.stream,
        hooks.requests,
        *(keys.webhook_gate(service, request_id, event) for event in STREAM_EVENTS),
        keys.webhook_output(service, request_id),
    ]


def chunks_append(
    service: str,
    request_id: str,
    *,
    delivery: int,
    entries: Sequence[tuple[str, str, bytes | str]],
    progress_json: str = "",
    ttl_ms: int,
    hooks: StreamHooks | None = None,
    output_bytes: int = 0,
    encodings: str = "",
) -> Call[bool]:
    """Append (kind 'c' chunk / 'p' progress, encoding, value) entries; False when a later delivery owns the stream.

    With `hooks`, a progress report enqueues the request's `progress` webhooks and chunks its `output` ones
    (the output so far, or a link past `hooks.inline_bytes`; `output_bytes` is the worker's count of this
    delivery's chunks joined, these included, `encodings` theirs: 't', 'b', 'j' seen), each at most once per
    `hooks.gap_ms`, in the same step as the write."""
    flat: list[Arg] = [part for entry in entries for part in entry]
    hook_args: list[Arg] = ["", "", 0, "", 0, 0, 0, 0, 0, ""]
    if hooks is not None:
        hook_args = [
            hooks.hooks,
            ",".join(sorted(hooks.events)),
            hooks.gap_ms,
            request_id,
            hooks.index,
            hooks.put_ms,
            hooks.start_ms,
            output_bytes,
            hooks.inline_bytes,
            encodings,
        ]
    return Call(
        "chunks",
        _chunk_keys(service, request_id),
        ["append", delivery, ttl_ms, progress_json, *hook_args, *flat],
        lambda raw: int(raw) == 1,
    )


def chunks_end(
    service: str, request_id: str, *, delivery: int, done_json: str, ttl_ms: int, if_exists: bool
) -> Call[bool]:
    """End a request's stream with its done entry (expiring `ttl_ms` later); False when not written."""
    return Call(
        "chunks",
        _chunk_keys(service, request_id),
        ["end", delivery, ttl_ms, done_json, "1" if if_exists else "0"],
        lambda raw: int(raw) == 1,
    )
