"""The queues as the API uses them (asyncio): put, read, remove, search, status, state, and the watch calls.

Knows Redis, knows nothing of HTTP or of the services file: callers pass the bounds. Each operation that must
be atomic is one script (`scripts.py`); the rest are plain commands, pipelined where they go together.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from redis.asyncio import Redis

from queue_service.store import keys, scripts
from queue_service.store.durability import Durability, run_replicated_async
from queue_service.store.keys import WORKER_GROUP, QueueKeys, QueueName
from queue_service.store.model import (
    REPLY_TTL_MS,
    ConsumerRow,
    Consumers,
    DataFrame,
    EndOfStream,
    FailureScan,
    Holding,
    Position,
    PutResult,
    QueueState,
    Read,
    Refused,
    RunningItem,
    StreamEntry,
    WatchConsumer,
    WatchDelivery,
    WebhookCounts,
)
from queue_service.store.pipelining import AutoPipeline

# How many items one truncate script removes before the next step (a huge truncate must not block Redis).
TRUNCATE_STEP = 1000
# An API process whose heartbeat lapsed this long ago is dropped from the service's list of API processes.
API_FORGET_SECONDS = 60.0
# A watch consumer's row is kept this long after it was last seen (the attributes show it as gone meanwhile),
# and rows are looked through for such only once there are this many.
CONSUMER_FORGET_MS = 3_600_000
CONSUMER_ROWS_BEFORE_PRUNING = 256


def new_request_id() -> str:
    """A random (version 4) UUID, as `str(uuid.uuid4())` writes it: unguessable (122 bits of os.urandom), and
    the format the platform's clients expect. Built here from the bytes: half of uuid4's cost, and every
    put and every request's log line takes one (issue 17)."""
    raw = bytearray(os.urandom(16))
    raw[6] = (raw[6] & 0x0F) | 0x40  # version 4
    raw[8] = (raw[8] & 0x3F) | 0x80  # RFC 4122 variant
    h = raw.hex()
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"


def now_ms() -> int:
    return int(time.time() * 1000)


@dataclass(frozen=True, slots=True)
class RequestState:
    """Where one request is: `queued` / `running` in the input queue, `done` (its result in the sink), or
    `removed` (its result was read with auto-delete, deleted or committed)."""

    state: str
    index: int = 0  # input index (queued, running) or sink index (done)
    put_ms: int = 0
    ahead: int = 0
    deliveries: int = 0
    finished_ms: int = 0
    removed_ms: int = 0
    status: int = 0  # the processor's status, once finished
    tags: Mapping[str, str] | None = None
    message: str = ""
    size: int = 0
    deadline_ms: int = 0  # when it expires if still waiting (0: no deadline)
    started_ms: int = 0  # running: when its worker took it (as the worker published); done: when it started
    progress: Any = None  # running: what its processor last reported (as its worker published), if anything
    ending: str = ""  # "expired" when it ended at its deadline (lastCode 408)
    webhooks: Mapping[str, Any] | None = None  # `<event>/<target>` -> state of that delivery


class QueueStore:
    """The queues of every service, over one asyncio Redis client."""

    def __init__(self, redis: Redis, durability: Durability | None = None) -> None:
        self.redis = redis
        self.scripts = scripts.Scripts(redis)
        # Concurrent puts share round trips (one pipeline); a cluster client routes each key itself.
        self.puts = AutoPipeline(self.scripts, redis) if isinstance(redis, Redis) else None
        # Services whose puts a replica must confirm before they are acknowledged (NotReplicated if not).
        self.durability = dict(durability or {})

    async def put(
        self,
        qk: QueueKeys,
        data: bytes,
        tags: Mapping[str, str],
        *,
        max_items: int,
        max_bytes: int = 0,
        priority: bool = False,
        reply_channel: str = "",
        check_live: bool = True,
        request_id: str = "",
        path: str = "",
        content_type: str = "",
        ttl_ms: int = 0,
        hooks: str = "",
        idempotency_digest: str = "",
    ) -> PutResult:
        """Append one item; QueueFull when the bound is reached, NoLiveWorker for a sync put without a worker
        (looked at when `check_live`).

        `ttl_ms`: a deadline (ends it unrun if still waiting then); `hooks`: its webhook targets (JSON);
        `idempotency_digest`: an Idempotency-Key's sha256, whose first put answers again (`repeated`)."""
        request_id = request_id or new_request_id()
        call = scripts.put(
            qk,
            data=data,
            tags=tags,
            request_id=request_id,
            now_ms=now_ms(),
            priority=priority,
            max_items=max_items,
            max_bytes=max_bytes,
            reply_channel=reply_channel,
            check_live=check_live,
            path=path,
            content_type=content_type,
            ttl_ms=ttl_ms,
            hooks=hooks,
            idempotency_digest=idempotency_digest,
        )
        rule = self.durability.get(qk.service)
        if rule is not None:
            return await run_replicated_async(self.scripts, self.redis, call, rule)
        if self.puts is not None:
            return await self.puts.run(call)
        return await self.scripts.run_async(call)

    async def read(
        self,
        qk: QueueKeys,
        *,
        start: int = 0,
        length: int = 1,
        request_id: str = "",
        tags: Mapping[str, str] | None = None,
        max_bytes: int,
        reserve_token: str = "",
        reserve_ms: int = 0,
    ) -> Read:
        call = scripts.read(
            qk,
            start=start,
            length=length,
            request_id=request_id,
            tags=tags,
            max_bytes=max_bytes,
            reserve_token=reserve_token,
            now_ms=now_ms(),
            reserve_ms=reserve_ms,
        )
        return await self.scripts.run_async(call)

    async def settle_reserved(self, qk: QueueKeys, frames: Sequence[DataFrame], token: str, *, delivered: bool) -> int:
        """Remove what an auto-deleting read answered (`delivered`), or give it back (its client left)."""
        if not frames:
            return 0
        mode = "reserved" if delivered else "release"
        call = scripts.remove(qk, mode, [f.index for f in frames], now_ms=now_ms(), token=token)
        removed, _ = await self.scripts.run_async(call)
        return removed

    async def remove(self, qk: QueueKeys, indexes: Sequence[int], group: str = "") -> int:
        """Delete (or commit) items by index; returns how many were there."""
        removed, _ = await self.scripts.run_async(scripts.remove(qk, "indexes", indexes, now_ms=now_ms(), group=group))
        return removed

    async def cancel(self, service: str, indexes: Sequence[int], group: str = "") -> int:
        """Delete input items as cancelled requests: one no worker holds ends here (its status says cancelled,
        its webhooks go); a held one's worker writes its terminal answer. Returns how many were there."""
        call = scripts.remove(keys.input_queue(service), "cancel", indexes, now_ms=now_ms(), group=group)
        removed, _ = await self.scripts.run_async(call)
        return removed

    async def expire(self, service: str, *, most: int = 1000) -> int:
        """End requests whose deadline passed while they waited; how many (see expire.lua)."""
        return await self.scripts.run_async(scripts.expire(service, most=most))

    async def sweep_lock(self, service: str, owner: str, ms: int) -> bool:
        """Whether this caller may sweep the service's deadlines now (one API process per interval)."""
        return bool(await self.redis.set(keys.expiry_lock(service), owner, nx=True, px=ms))

    async def webhook_counts(self, service: str) -> WebhookCounts:
        """The service's webhook deliveries now, and its delivery counters (one pipeline)."""
        hooks = keys.webhooks(service)
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.xlen(hooks.stream)
            pipe.zcard(hooks.due)
            pipe.zcard(hooks.dead)
            pipe.hmget(hooks.stats, ["delivered", "failed", "gone", "dead"])
            length, scheduled, dead, stats = await pipe.execute()
        delivered, failed, gone, dead_total = (int(v or 0) for v in stats)
        # The stream holds what is queued, what is scheduled and the dead letters' entries.
        queued = max(0, int(length) - int(scheduled) - int(dead))
        return WebhookCounts(queued, int(scheduled), int(dead), delivered, failed, gone, dead_total)

    async def withdraw(self, service: str, index: int) -> bool:
        """Remove an input item only if no worker has taken it yet; True when withdrawn."""
        call = scripts.remove(keys.input_queue(service), "waiting", [index], now_ms=now_ms())
        removed, _ = await self.scripts.run_async(call)
        return removed > 0

    async def truncate(self, qk: QueueKeys, below: int, group: str = "", *, reopen: bool = True) -> int:
        """Remove every item whose index is below `below`, a step at a time; past the queue's end of stream,
        that reopens it too (unless `reopen` is False: the forced end truncates what it ends)."""
        total, more = 0, True
        while more:
            call = scripts.remove(qk, "below", [below, TRUNCATE_STEP], now_ms=now_ms(), group=group)
            removed, more = await self.scripts.run_async(call)
            total += removed
        if reopen:
            await self.scripts.run_async(scripts.reopen(qk, below=below))
        return total

    async def end_stream(self, qk: QueueKeys, *, force: bool = False) -> int:
        """End the queue's stream after the last index given out; the end index. `force` also removes every
        item put before the end that is still there, so that watchers see the end at once."""
        end = await self.scripts.run_async(scripts.end_stream(qk))
        if force:
            await self.truncate(qk, end + 1, reopen=False)
        return end

    async def end_of_stream(self, qk: QueueKeys) -> EndOfStream | None:
        return await self.scripts.run_async(scripts.end_of_stream(qk))

    async def refuse(
        self, qk: QueueKeys, indexes: Sequence[int], group: str, *, max_delivery: int, last_code: int, message: str
    ) -> Refused:
        """A negative commit of `group`: its items go back to it, or end once delivered `max_delivery` times."""
        call = scripts.negative(
            qk,
            indexes,
            group=group,
            max_delivery=max_delivery,
            now_ms=now_ms(),
            last_code=last_code,
            message=message,
        )
        return await self.scripts.run_async(call)

    async def count(self, qk: QueueKeys, *, priority_only: bool = False, tags: Mapping[str, str] | None = None) -> int:
        return await self.scripts.run_async(scripts.count(qk, priority_only=priority_only, tags=tags))

    async def search(self, qk: QueueKeys, index: int, group: str = WORKER_GROUP) -> Position | None:
        """Where an item stands for one consumer group (the workers' group by default)."""
        found = await self.scripts.run_async(scripts.search(qk, index, group=group))
        if found is None:
            return None
        holder, pending, ahead = found
        return Position(keys.consumer_id_of(holder), pending, ahead)

    async def status(self, service: str, request_id: str) -> RequestState | None:
        """Where one request is, in one round trip (status.lua): its queue, its worker's report, its webhooks."""
        raw = await self.scripts.run_async(scripts.status(service, request_id))
        if raw is None:
            return None
        state = _text(raw[0])
        if state == "queued":
            _, index, put_ms, ahead, deadline, hooks = raw
            return RequestState(
                "queued",
                index=int(index),
                put_ms=int(put_ms or 0),
                ahead=int(ahead),
                deadline_ms=int(deadline or 0),
                webhooks=_json_or_none(hooks),
            )
        if state == "running":
            _, index, put_ms, deliveries, _idle, deadline, hooks, published, progress = raw
            mine = _published_entry(published, int(index))
            return RequestState(
                "running",
                index=int(index),
                put_ms=int(put_ms or 0),
                deliveries=int(deliveries),
                deadline_ms=int(deadline or 0),
                started_ms=int(mine.get("startedAt") or 0),
                progress=_json_or_none(progress),
                webhooks=_json_or_none(hooks),
            )
        if state == "removed":
            _, memory, hooks = raw
            removed_ms, status, ending = [*_text(memory).split(":"), "", ""][:3]
            return RequestState(
                "removed",
                removed_ms=int(removed_ms or 0),
                status=int(status or 200),
                ending=ending,
                webhooks=_json_or_none(hooks),
            )
        _, index, tags_json, finished, message, size, hooks, put_ms, started_ms, ending = raw
        tags = json.loads(tags_json or b"{}")
        return RequestState(
            "done",
            index=int(index),
            status=int(tags.get("lastCode") or 200),
            tags=tags,
            finished_ms=int(finished or 0),
            message=_text(message),
            size=int(size),
            put_ms=int(put_ms or 0),
            started_ms=int(started_ms or 0),
            ending=_text(ending),
            webhooks=_json_or_none(hooks),
        )

    async def live_workers(self, service: str) -> int:
        return int(await self.redis.zcount(keys.live_workers(service), time.time(), "+inf"))

    async def admit_rate(self, service: str, per_second: float) -> int:
        """0 when a request is admitted under the rate limit, else ms until one would be."""
        return await self.scripts.run_async(scripts.rate(service, per_second))

    async def state(self, qk: QueueKeys) -> QueueState:
        """One snapshot of a queue, read in one pipeline."""
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.xlen(qk.high)
            pipe.xlen(qk.normal)
            pipe.xrange(qk.high, count=1)
            pipe.xrange(qk.normal, count=1)
            pipe.xrevrange(qk.high, count=1)
            pipe.xrevrange(qk.normal, count=1)
            pipe.get(qk.seq)
            pipe.zcount(keys.live_workers(qk.service), time.time(), "+inf")
            pipe.hmget(qk.counts, ["waiting", "sink_used", "sink_bytes"])
            (
                high_len,
                normal_len,
                first_high,
                first_normal,
                last_high,
                last_normal,
                seq,
                workers,
                counts,
            ) = await pipe.execute()
        firsts = [e[0] for e in (first_high, first_normal) if e]
        lasts = [keys.index_of(e[0][0]) for e in (last_high, last_normal) if e]
        put_times = [int(fields[b"ts"]) / 1000 for _, fields in firsts if b"ts" in fields]
        length = int(high_len) + int(normal_len)
        waiting, used, size = (int(v or 0) for v in counts)
        return QueueState(
            length=length,
            waiting=min(length, max(0, waiting)) if qk.queue == "input" else length,
            first_index=min(keys.index_of(entry_id) for entry_id, _ in firsts) if firsts else 0,
            last_index=max(lasts) if lasts else 0,
            last_given=int(seq or 0),
            oldest_put=min(put_times) if put_times else None,
            live_workers=int(workers),
            used=max(0, used),
            bytes=max(0, size),
        )

    async def last_index(self, qk: QueueKeys) -> int:
        return int(await self.redis.get(qk.seq) or 0)

    async def ping(self) -> None:
        await self.redis.ping()

    async def timings(self, service: str) -> dict[str, float]:
        """The workers' histogram counters of a service (`queue_service/timings.py` names the fields)."""
        raw = await self.redis.hgetall(keys.timings(service))
        return {(k.decode() if isinstance(k, bytes) else k): float(v) for k, v in raw.items()}

    # --- API processes (the clients' direct mode) and watch consumers, for the attributes ------

    async def heartbeat_api(self, services: Sequence[str], member: str, ttl: float, *, prune: bool = False) -> None:
        """Count this API process (`<host:port>/<channel>`) live for each service for the next `ttl` seconds, and
        renew the lifetime of its reply streams (a worker's answer then costs one command: finish.lua);
        `prune` also drops processes whose heartbeat lapsed a while ago."""
        now = time.time()
        channel = member.rpartition("/")[2]
        async with self.redis.pipeline(transaction=False) as pipe:
            for service in services:
                pipe.zadd(keys.api_processes(service), {member: now + ttl})
                pipe.pexpire(keys.replies(service, channel), REPLY_TTL_MS)
                if prune:
                    pipe.zremrangebyscore(keys.api_processes(service), "-inf", now - API_FORGET_SECONDS)
            await pipe.execute()

    async def leave_api(self, services: Sequence[str], member: str) -> None:
        async with self.redis.pipeline(transaction=False) as pipe:
            for service in services:
                pipe.zrem(keys.api_processes(service), member)
            await pipe.execute()

    async def live_apis(self, service: str) -> list[str]:
        """The members (`<host:port>/<channel>`) of the API processes serving `service` now."""
        members = await self.redis.zrangebyscore(keys.api_processes(service), time.time(), "+inf")
        return [_text(member) for member in members]

    async def consumer_joined(self, qk: QueueKeys, consumer: WatchConsumer) -> None:
        """Record a watch consumer for the attributes (`consumers.list`); once the rows are many, those of consumers
        long gone are dropped."""
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.hset(qk.consumers, consumer.name, consumer.to_row())
            pipe.hlen(qk.consumers)
            _, rows = await pipe.execute()
        # Looked through only now and then: every so many joins once the rows are many.
        if int(rows) > CONSUMER_ROWS_BEFORE_PRUNING and int(rows) % CONSUMER_ROWS_BEFORE_PRUNING == 0:
            await self._forget_gone_consumers(qk)

    async def _forget_gone_consumers(self, qk: QueueKeys) -> None:
        live = {member.rpartition("/")[2] for member in await self.live_apis(qk.service)}
        oldest_kept = now_ms() - CONSUMER_FORGET_MS
        stale = []
        for name, raw in (await self.redis.hgetall(qk.consumers)).items():
            row = WatchConsumer.from_row(raw)
            # Gone long ago: closed, or its API process died (the row never heard the close).
            last_seen = row.left_ms or (row.since_ms if row.api not in live else now_ms())
            if last_seen < oldest_kept:
                stale.append(name)
        if stale:
            await self.redis.hdel(qk.consumers, *stale)

    async def consumer_left(self, qk: QueueKeys, consumer: WatchConsumer) -> None:
        """The watch's connection closed; a newer connection of the same consumer keeps its row as it is."""
        raw = await self.redis.hget(qk.consumers, consumer.name)
        if raw is not None and WatchConsumer.from_row(raw).connection == consumer.connection:
            await self.redis.hset(qk.consumers, consumer.name, consumer.left(now_ms()).to_row())

    async def consumers(self, qk: QueueKeys, *, most: int = 100) -> Consumers:
        """The queue's client groups, and its consumers as they stand: watch consumers (from their rows and their
        groups' pending entries) and, for the input queue, the live workers."""
        client_groups = [_text(g) for g in await self.redis.zrange(qk.groups, 0, -1)]
        groups = list(client_groups)
        workers = []
        if qk.queue == "input":
            live = await self.redis.zrangebyscore(keys.live_workers(qk.service), time.time(), "+inf")
            workers = [_text(worker) for worker in live]
            groups.append(WORKER_GROUP)
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.hgetall(qk.consumers)
            pipe.zrangebyscore(keys.api_processes(qk.service), time.time(), "+inf")
            for group in groups:
                for stream in qk.streams:
                    # The summary lists only the consumers that hold something: cheap however many there are.
                    pipe.xpending(stream, group)
            for stream in qk.streams:
                pipe.xinfo_groups(stream)
            answers = await pipe.execute(raise_on_error=False)
        rows_raw, apis, *per_group = answers
        summaries, group_infos = per_group[: 2 * len(groups)], per_group[2 * len(groups) :]
        pending: dict[str, int] = {}
        for i, group in enumerate(groups):
            for summary in summaries[2 * i : 2 * i + 2]:
                for holder in summary.get("consumers", []) if isinstance(summary, dict) else []:
                    name = f"{group}.{keys.consumer_id_of(_text(holder['name']))}"
                    pending[name] = pending.get(name, 0) + int(holder["pending"])
        delivered: dict[str, int] = {}
        for answer in group_infos:
            for info in answer if isinstance(answer, list) else []:
                index = keys.index_of(info["last-delivered-id"])
                delivered[_text(info["name"])] = max(delivered.get(_text(info["name"]), 0), index)
        live_channels = {_text(member).rpartition("/")[2] for member in (apis if isinstance(apis, list) else [])}
        # Told from each row's prefix, so that only the rows shown are parsed, however many consumers there are.
        states = []
        for name, raw in (rows_raw if isinstance(rows_raw, dict) else {}).items():
            api, left_ms = WatchConsumer.row_state(raw)
            states.append((not (left_ms == 0 and api in live_channels), _text(name), raw))
        states.sort()
        connected_rows = sum(not gone for gone, _, _ in states)
        rows: list[ConsumerRow] = []
        for gone, _name, raw in states[:most]:
            consumer = WatchConsumer.from_row(raw)
            rows.append(
                ConsumerRow(
                    consumer=consumer,
                    pending=pending.get(consumer.name, 0),
                    idle_ms=max(0, now_ms() - (consumer.left_ms or consumer.since_ms)),
                    delivered_index=delivered.get(consumer.group, 0),
                    connected=not gone,
                )
            )
        for worker in workers:
            name = f"{WORKER_GROUP}.{worker}"
            consumer = WatchConsumer(group=WORKER_GROUP, consumer=worker, window=1)
            rows.append(
                ConsumerRow(
                    consumer=consumer,
                    pending=pending.get(name, 0),
                    idle_ms=0,
                    delivered_index=delivered.get(WORKER_GROUP, 0),
                    connected=True,
                )
            )
        rows.sort(key=lambda row: (not row.connected, row.consumer.name))
        return Consumers(client_groups, rows[:most], connected_rows + len(workers))

    # --- watches -------------------------------------------------------------------------

    async def join(self, qk: QueueKeys, group: str, *, start_index: int, max_groups: int, idle_ms: int) -> bool:
        call = scripts.join(qk, group, start_index=start_index, now_ms=now_ms(), max_groups=max_groups, idle_ms=idle_ms)
        return await self.scripts.run_async(call)

    async def deliver(
        self,
        qk: QueueKeys,
        *,
        group: str,
        consumer: str,
        want: int,
        lease_ms: int,
        tags: Mapping[str, str] | None,
        max_bytes: int,
    ) -> list[DataFrame] | None:
        delivery = await self.watch_delivery(
            qk, group=group, consumer=consumer, want=want, lease_ms=lease_ms, tags=tags, max_bytes=max_bytes
        )
        return None if delivery is None else delivery.frames

    async def watch_delivery(
        self,
        qk: QueueKeys,
        *,
        group: str,
        consumer: str,
        want: int,
        lease_ms: int,
        tags: Mapping[str, str] | None,
        max_bytes: int,
        watch_end: bool = False,
    ) -> WatchDelivery | None:
        """A delivery to a watch consumer; with `watch_end`, one of nothing also tells the end of stream."""
        call = scripts.deliver(
            qk,
            group=group,
            consumer=consumer,
            want=want,
            lease_ms=lease_ms,
            tags=tags,
            max_bytes=max_bytes,
            watch_end=watch_end,
        )
        return await self.scripts.run_async(call)

    async def held(self, qk: QueueKeys, *, group: str, consumer: str, mode: str, most: int) -> int:
        return await self.scripts.run_async(scripts.held(qk, group=group, consumer=consumer, mode=mode, most=most))

    async def seen_groups(self, qk: QueueKeys, groups: Sequence[str]) -> None:
        """Mark client groups as having live consumers (join.lua evicts only groups unseen for a while)."""
        if groups:
            await self.redis.zadd(qk.groups, dict.fromkeys(groups, now_ms()), xx=True)

    async def lapsed(self, qk: QueueKeys, group: str, lease_ms: int) -> bool:
        """Whether `group` has an item whose lease lapsed (a consumer left it): its watchers should look."""
        async with self.redis.pipeline(transaction=False) as pipe:
            for stream in qk.streams:
                pipe.xpending_range(stream, group, min="-", max="+", count=1, idle=lease_ms)
            answers = await pipe.execute(raise_on_error=False)
        return any(isinstance(answer, list) and answer for answer in answers)

    # --- the dashboard's reads, and the API processes' answer counts -----------------------

    async def workers(self, service: str) -> dict[str, float]:
        """Every worker the service saw lately: name -> unix time its liveness lapses (in the past: stale)."""
        raw: Any = await self.redis.zrange(keys.live_workers(service), 0, -1, withscores=True)
        return {_text(name): float(score) for name, score in raw}

    async def holding(self, service: str, most: int = 500) -> list[Holding]:
        """The input items workers hold now (the workers' group's pending entries), with their request ids."""
        return await self.scripts.run_async(scripts.holding(service, most=most))

    async def recent_failures(self, service: str, *, scan: int = 500, message_bytes: int = 500) -> FailureScan:
        """Failed results (status not 200) among the newest `scan` items of the sink, without their data."""
        return await self.scripts.run_async(scripts.failures(service, scan=scan, message_bytes=message_bytes))

    async def peek_result(self, service: str, index: int, max_bytes: int) -> tuple[int, bytes] | None:
        """(size, first `max_bytes` bytes) of the result at sink index `index`; None when it is gone."""
        return await self.scripts.run_async(scripts.peek(service, index, max_bytes=max_bytes))

    async def add_answers(self, counts: Mapping[str, Mapping[str, int]], minute: int, ttl_seconds: int) -> None:
        """Add an API process's answer counts ({service: {"<operation>:<status>": n}}) to the minute's counters."""
        async with self.redis.pipeline(transaction=False) as pipe:
            for service, fields in counts.items():
                key = keys.answers(service, minute)
                for field, amount in fields.items():
                    pipe.hincrby(key, field, amount)
                pipe.expire(key, ttl_seconds)
            await pipe.execute()

    async def answers(self, service: str, minutes: Sequence[int]) -> list[dict[str, int]]:
        """The answer counts of each minute of `minutes` (every API process's, added up)."""
        async with self.redis.pipeline(transaction=False) as pipe:
            for minute in minutes:
                pipe.hgetall(keys.answers(service, minute))
            raw = await pipe.execute()
        return [{_text(field): int(value) for field, value in counts.items()} for counts in raw]

    # --- what the workers hold (published by each worker's lease keeper) ----------------------------

    async def running(self, service: str) -> list[RunningItem]:
        """The items workers of `service` hold now, as their keepers last published them (≤ 1 s old),
        oldest first. A field of a worker that died stays until maintenance drops it (≤ 1 min)."""
        raw = await self.redis.hgetall(keys.running(service))
        items = [
            RunningItem(
                worker=_text(worker),
                index=int(entry["index"]),
                request_id=str(entry["requestId"]),
                started_at_ms=int(entry["startedAt"]),
                deliveries=int(entry["deliveries"]),
            )
            for worker, held in raw.items()
            for entry in json.loads(held)
        ]
        return sorted(items, key=lambda item: (item.started_at_ms, item.index))

    # --- what a request streams while it runs (written by workers/streaming.py) ---------------------

    async def stream_after(self, service: str, request_id: str, after: str, count: int) -> list[StreamEntry]:
        """Up to `count` entries of the request's stream after entry id `after` ('0-0': from the start)."""
        raw: Any = await self.redis.xrange(keys.chunks(service, request_id), f"({after}", "+", count=count)
        return [stream_entry(entry_id, fields) for entry_id, fields in raw]

    async def stream_last_id(self, service: str, request_id: str) -> str:
        """The id of the last entry of the request's stream ('0-0' when it has none)."""
        raw: Any = await self.redis.xrevrange(keys.chunks(service, request_id), count=1)
        return _text(raw[0][0]) if raw else "0-0"

    async def stream_entry_at(self, service: str, request_id: str, entry_id: str) -> StreamEntry | None:
        raw: Any = await self.redis.xrange(keys.chunks(service, request_id), entry_id, entry_id)
        return stream_entry(*raw[0]) if raw else None

    async def stream_exists(self, service: str, request_id: str) -> bool:
        return bool(await self.redis.exists(keys.chunks(service, request_id)))

    async def progress(self, service: str, request_id: str) -> dict[str, Any] | None:
        """The last progress the request reported (`fraction`, `message`, `at` ms), or None."""
        raw = await self.redis.get(keys.progress(service, request_id))
        return json.loads(raw) if raw else None

    async def request_id_at(self, qk: QueueKeys, index: int) -> str:
        """The request id of the item at `index` ('' when it is not there)."""
        async with self.redis.pipeline(transaction=False) as pipe:
            for stream in qk.streams:
                pipe.xrange(stream, keys.stream_id(index), keys.stream_id(index))
            found = await pipe.execute()
        for entries in found:
            for _, fields in entries:
                return _text(fields.get(b"rid", b""))
        return ""


_KINDS: dict[bytes, Any] = {b"c": "chunk", b"p": "progress", b"r": "restart", b"d": "done"}
_ENCODINGS: dict[bytes, Any] = {b"t": "text", b"b": "bytes", b"j": "json"}


def stream_entry(entry_id: bytes | str, fields: dict[bytes, bytes]) -> StreamEntry:
    return StreamEntry(
        id=_text(entry_id),
        kind=_KINDS.get(fields.get(b"k", b""), "chunk"),
        delivery=int(fields.get(b"dl", b"1")),
        value=bytes(fields.get(b"v", b"")),
        encoding=_ENCODINGS.get(fields.get(b"e", b""), ""),
    )


Entries = list[tuple[str, list[tuple[bytes, dict[bytes, bytes]]]]]


class NewEntries:
    """The API's blocking reader: entries put after given ids, on a client of its own
    (`connection.blocking_client`), so that waiting never takes a connection from the pool of short commands."""

    def __init__(self, client: Redis) -> None:
        self.client = client

    async def after(self, streams: Mapping[str, str], *, count: int, block_ms: int) -> Entries:
        answer: Any = await self.client.xread(dict(streams), count=count, block=block_ms)  # type: ignore[arg-type]
        return [(_text(stream), list(entries)) for stream, entries in answer or []]


def queue_keys(service: str, queue: QueueName) -> QueueKeys:
    return keys.queue_keys(service, queue)


def _json_or_none(raw: Any) -> Any:
    return json.loads(raw) if raw else None


def _published_entry(published: Any, index: int) -> dict[str, Any]:
    """The entry of item `index` in what its worker published (`qs:{s}:running`); {} when it has not yet."""
    for entry in json.loads(published) if published else []:
        if int(entry.get("index", 0)) == index:
            return dict(entry)
    return {}


def _text(value: object) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)
