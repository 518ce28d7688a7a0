"""On a Redis Cluster every script runs in one slot: its keys share the service's `{service}` hash tag, and it
touches no key it was not given in KEYS (a key built inside Lua could be in another slot, or on another node)."""

from __future__ import annotations

import dataclasses
import hashlib
import re
import time
from collections.abc import Iterator
from typing import Any

import pytest
import redis
from redis.crc import key_slot

from queue_service.store import keys, scripts
from queue_service.store.keys import WORKER_GROUP
from queue_service.store.model import Delivery, Item, Outcome, StoreError

SERVICES = ["echo", "a", "Model-v2.1_large", "x" * 63]
# A request whose webhooks ask for what chunks.lua enqueues.
STREAM_HOOKS = '[{"url":"https://receiver.example/h","events":["progress","output","completed"]}]'


def _item(service: str, *, sync: bool) -> Item:
    return Item(
        service=service,
        stream=keys.input_queue(service).high,
        entry_id="7-0",
        index=7,
        request_id="r-7",
        data=b"x",
        tags={},
        put_ms=0,
        reply_channel="a0b1c2" if sync else "",
        deliveries=1,
    )


def every_call(service: str) -> Iterator[scripts.Call[Any]]:
    """One Call of each wrapper in scripts.py, in each of its key shapes."""
    qi, qs = keys.input_queue(service), keys.sink_queue(service)
    for qk in (qi, qs):
        for priority in (False, True):
            yield scripts.put(qk, data=b"x", tags={}, request_id="r", now_ms=1, priority=priority, max_items=9)
        yield scripts.read(qk, start=1, length=5, max_bytes=100, reserve_token="t", now_ms=1, reserve_ms=5)
        for mode in ("indexes", "waiting", "below", "reserved", "release"):
            yield scripts.remove(qk, mode, [1], now_ms=1)
        yield scripts.search(qk, 1, group="g")
        yield scripts.join(qk, "g", start_index=1, now_ms=1, max_groups=5, idle_ms=1)
        yield scripts.deliver(qk, group="g", consumer="c", want=1, lease_ms=1, tags=None, max_bytes=100)
        yield scripts.held(qk, group="g", consumer="c", mode="count", most=5)
        yield scripts.negative(qk, [1], group="g", max_delivery=3, now_ms=1, last_code=500, message="Shutdown: x")
        yield scripts.count(qk)
        yield scripts.end_stream(qk)
        yield scripts.end_of_stream(qk)
        yield scripts.reopen(qk, below=2)
    yield scripts.put(qi, data=b"x", tags={}, request_id="r", now_ms=1, max_items=9, reply_channel="a0b1c2")
    yield scripts.take(service, consumer="w", want=1, lease_ms=1, max_delivery=3, sink_max_items=9, sink_max_bytes=9)
    for sync in (False, True):
        for body in (b"", b"x"):
            yield scripts.finish(
                [scripts.finish_part(_item(service, sync=sync), Outcome(body), consumer="w", now_ms=1)]
            )
    yield scripts.lease(qi.normal, ["1-0"], group=WORKER_GROUP, consumer="w")
    yield scripts.reconcile(service)
    yield scripts.status(service, "r")
    yield scripts.rate(service, 5)
    yield scripts.expire(service)
    yield scripts.hook_take(service, consumer="d", want=1, lease_ms=1)
    yield scripts.hook_done(Delivery(service, "1-0", "msg_1", 1, {}), consumer="d", outcome="delivered")
    yield scripts.hook_revive(service)
    yield scripts.holding(service, most=5)
    yield scripts.failures(service, scan=5, message_bytes=10)
    yield scripts.peek(service, 1, max_bytes=10)
    yield scripts.chunks_append(service, "r", delivery=1, entries=[("c", "t", "x")], progress_json="{}", ttl_ms=9)
    hooked = dataclasses.replace(_item(service, sync=False), hooks=STREAM_HOOKS)
    yield scripts.chunks_append(
        service,
        "r",
        delivery=1,
        entries=[("c", "t", "x")],
        progress_json="{}",
        ttl_ms=9,
        hooks=scripts.stream_hooks(hooked, inline_bytes=9, start_ms=1),
    )
    for if_exists in (False, True):
        yield scripts.chunks_end(service, "r", delivery=1, done_json="{}", ttl_ms=9, if_exists=if_exists)


@pytest.mark.parametrize("service", SERVICES)
def test_every_script_call_of_a_service_hashes_to_that_services_slot(service: str) -> None:
    calls = list(every_call(service))
    assert {call.script for call in calls} == set(scripts.NAMES), "a wrapper of scripts.py is not covered here"
    slot = key_slot(f"{{{service}}}".encode())
    for call in calls:
        slots = {key_slot(key.encode()) for key in call.keys}
        assert slots == {slot}, f"{call.script}: keys {list(call.keys)} hash to slots {slots}, not {slot}"


# --- no key outside KEYS: what Redis saw each script touch --------------------------------------------------

_ARG = re.compile(rb'"((?:\\.|[^"\\])*)"')
_ESCAPE = re.compile(rb"\\(x[0-9a-fA-F]{2}|.)")
_ESCAPES = {b"n": b"\n", b"r": b"\r", b"t": b"\t", b"a": b"\a", b"b": b"\b"}


def _unescape(raw: bytes) -> bytes:
    def one(match: re.Match[bytes]) -> bytes:
        code = match.group(1)
        if code.startswith(b"x") and len(code) == 3:
            return bytes([int(code[1:], 16)])
        return _ESCAPES.get(code, code)

    return _ESCAPE.sub(one, raw)


def _monitored(line: bytes) -> tuple[bool, list[bytes]]:
    """(whether a script ran it, its arguments) from one MONITOR line: `<time> [<db> <client>] "ARG" ...`."""
    head, _, rest = line.partition(b"] ")
    return head.endswith(b" lua"), [_unescape(arg) for arg in _ARG.findall(rest)]


def _exercise_every_script(client: redis.Redis, service: str) -> None:
    run = scripts.Scripts(client).run
    qi, qs = keys.input_queue(service), keys.sink_queue(service)
    now = int(time.time() * 1000)
    client.zadd(keys.live_workers(service), {"w": time.time() + 60})

    def attempt(call: scripts.Call[Any]) -> Any:
        try:
            return run(call)
        except StoreError:
            return None  # a refusal is an answer too: the script ran

    for rid, priority in (("r1", False), ("r2", True)):
        attempt(scripts.put(qi, data=b"a", tags={"k": "v"}, request_id=rid, now_ms=now, priority=priority, max_items=9))
    attempt(scripts.put(qi, data=b"s", tags={}, request_id="r3", now_ms=now, max_items=9, reply_channel="c0ffee"))
    attempt(scripts.put(qs, data=b"out", tags={}, request_id="r4", now_ms=now, max_items=9, max_bytes=10**6))
    taken = run(
        scripts.take(service, consumer="w", want=3, lease_ms=0, max_delivery=3, sink_max_items=9, sink_max_bytes=10**6)
    )
    held = taken.items
    attempt(scripts.lease(held[0].stream, [held[0].entry_id], group=WORKER_GROUP, consumer="w"))
    attempt(scripts.lease(held[1].stream, [held[1].entry_id], group=WORKER_GROUP, consumer="w", release=True))
    attempt(
        scripts.take(
            service,
            consumer="w",
            want=1,
            lease_ms=1,
            max_delivery=3,
            sink_max_items=9,
            sink_max_bytes=10**6,
            restart_guard=False,
        )
    )
    parts = [scripts.finish_part(item, Outcome(b"done"), consumer="w", now_ms=now) for item in held]
    attempt(scripts.finish([part for part in parts if part.keys == parts[0].keys]))  # a chain's, in one call
    for part in parts:
        if part.keys != parts[0].keys:
            attempt(scripts.finish([part]))
    attempt(scripts.finish([scripts.finish_part(held[0], Outcome(b"", 499), consumer="w", now_ms=now, held=False)]))
    attempt(scripts.read(qs, start=1, length=5, max_bytes=10**6, reserve_token="t", now_ms=now, reserve_ms=1000))
    for mode, values in (("reserved", [1]), ("release", [2]), ("indexes", [2]), ("below", [3, 100])):
        attempt(scripts.remove(qs, mode, values, now_ms=now, token="t"))
    attempt(scripts.put(qi, data=b"b", tags={}, request_id="r5", now_ms=now, max_items=9))
    attempt(scripts.search(qi, 4, group=WORKER_GROUP))
    attempt(scripts.status(service, "r5"))
    attempt(scripts.status(service, "r1"))
    attempt(scripts.remove(qi, "waiting", [4], now_ms=now))
    attempt(scripts.put(qs, data=b"w", tags={}, request_id="r6", now_ms=now, max_items=9, max_bytes=10**6))
    attempt(scripts.join(qs, "g", start_index=1, now_ms=now, max_groups=5, idle_ms=15_000))
    attempt(scripts.deliver(qs, group="g", consumer="c", want=5, lease_ms=1000, tags=None, max_bytes=10**6))
    for mode in ("count", "renew", "release"):
        attempt(scripts.held(qs, group="g", consumer="c", mode=mode, most=10))
    attempt(scripts.rate(service, 10))
    attempt(scripts.reconcile(service))
    attempt(scripts.put(qi, data=b"c", tags={}, request_id="r7", now_ms=now, max_items=9))
    running = attempt(
        scripts.take(service, consumer="w", want=1, lease_ms=0, max_delivery=3, sink_max_items=9, sink_max_bytes=10**6)
    )
    attempt(scripts.status(service, "r7"))  # running: with its progress report
    assert running is not None and running.items
    # A streaming request whose webhooks ask for progress and output.
    hooked = dataclasses.replace(running.items[0], hooks=STREAM_HOOKS)
    for inline_bytes in (1000, 1):  # the output so far in the payload, or a link to the stream
        hooks = scripts.stream_hooks(hooked, inline_bytes=inline_bytes, start_ms=now)
        assert hooks is not None
        entries = [("c", "t", "tok "), ("p", "", '{"fraction":0.5}')]
        call = scripts.chunks_append(
            service,
            "r7",
            delivery=1,
            entries=entries,
            progress_json='{"fraction":0.5}',
            ttl_ms=60_000,
            hooks=dataclasses.replace(hooks, gap_ms=1),
            output_bytes=4,
            encodings="t",
        )
        attempt(call)
        time.sleep(0.01)  # past the gates' gap: the next append enqueues again
    attempt(scripts.status(service, "r7"))
    attempt(scripts.negative(qs, [1, 2], group="g", max_delivery=1, now_ms=now, last_code=500, message="Shutdown: x"))
    attempt(scripts.count(qi, tags={"k": "v"}))
    attempt(scripts.end_stream(qs))
    attempt(scripts.end_of_stream(qs))
    attempt(scripts.reopen(qs, below=100))
    attempt(scripts.expire(service))
    attempt(scripts.hook_take(service, consumer="d", want=5, lease_ms=1000))
    attempt(scripts.hook_done(Delivery(service, "1-0", "msg_1", 1, {}), consumer="d", outcome="dead"))
    attempt(scripts.hook_revive(service))
    attempt(scripts.holding(service, most=10))
    attempt(scripts.failures(service, scan=10, message_bytes=100))
    attempt(scripts.peek(service, 1, max_bytes=10))
    entries = [("c", "t", "tok "), ("c", "b", b"\x00\xff"), ("p", "j", '{"fraction":0.5}')]
    attempt(scripts.chunks_append(service, "r1", delivery=1, entries=entries, progress_json="{}", ttl_ms=60_000))
    attempt(scripts.chunks_append(service, "r1", delivery=0, entries=entries[:1], ttl_ms=60_000))
    attempt(
        scripts.chunks_end(service, "r1", delivery=1, done_json='{"statusCode":200}', ttl_ms=60_000, if_exists=True)
    )
    attempt(
        scripts.chunks_end(service, "r9", delivery=1, done_json='{"statusCode":500}', ttl_ms=60_000, if_exists=False)
    )


def test_no_script_touches_a_key_it_was_not_given_in_keys(fresh_redis_url: str) -> None:
    client = redis.Redis.from_url(fresh_redis_url)
    looker = redis.Redis.from_url(fresh_redis_url)
    by_sha = {hashlib.sha1(scripts.source(name).encode()).hexdigest().encode(): name for name in scripts.NAMES}
    # Redis 7.2 shows a script's commands before the EVALSHA that ran them; 7.0 (Debian 12's) and 6.2, after it.
    version = tuple(int(part) for part in str(looker.info("server")["redis_version"]).split(".")[:2])
    commands_first = version >= (7, 2)
    seen: set[str] = set()
    problems: list[str] = []
    try:
        with client.monitor() as monitor:
            _exercise_every_script(looker, "svc")
            looker.echo("end of the exercise")
            current: tuple[str, set[bytes]] | None = None
            pending: list[list[bytes]] = []

            def check(script: tuple[str, set[bytes]], commands: list[list[bytes]]) -> None:
                name, given = script
                for args in commands:
                    try:
                        touched = {k if isinstance(k, bytes) else k.encode() for k in looker.command_getkeys(*args)}
                    except redis.ResponseError:
                        continue  # a command without keys (TIME, INFO)
                    if touched - given:
                        problems.append(f"{name}: {args[0].decode()} touched {touched - given}, not in its KEYS")

            while True:
                from_script, args = _monitored(monitor.connection.read_response())
                if from_script:
                    pending.append(args)
                    continue
                command = args[0].upper() if args else b""
                if command in (b"EVALSHA", b"EVAL"):
                    name = by_sha.get(args[1], "?") if command == b"EVALSHA" else "?"
                    script = (name, set(args[3 : 3 + int(args[2])]))
                    seen.add(name)
                    if commands_first:
                        check(script, pending)
                    elif current is not None:
                        check(current, pending)
                    pending, current = [], script
                elif command == b"ECHO":
                    if current is not None and not commands_first:
                        check(current, pending)
                    break
    finally:
        client.close()
        looker.close()
    assert seen >= set(scripts.NAMES), f"scripts never run here: {set(scripts.NAMES) - seen}"
    assert not problems, "\n".join(problems)
