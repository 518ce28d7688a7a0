"""Redis work per request, from server-side counters (INFO): commands, round trips, Redis CPU.

- commands: `INFO commandstats` calls, every command counted, those run inside Lua scripts included
  (so one EVALSHA of a script that runs 20 commands counts 21); the snapshots' own INFO calls are
  subtracted, anyone else's INFO is counted.
- round trips: `total_reads_processed` (Redis >= 6): socket reads Redis served. One command, one
  pipeline or one blocking wait sent in one write is one read: that is a network round trip.
- Redis CPU: `used_cpu_user + used_cpu_sys` of the redis-server process.

The counters are server-wide: what idle processes do meanwhile (heartbeats, idle polls) is measured
over an idle window first and subtracted at that rate.
"""

from __future__ import annotations

import threading
import time
import uuid
from collections import Counter
from dataclasses import dataclass

import redis


@dataclass
class Snapshot:
    at: float
    commands: Counter
    reads: int
    cpu: float


@dataclass
class Cost:
    commands: Counter  # per command name, total over the window (background removed)
    reads: float
    cpu: float
    seconds: float

    def per(self, requests: int) -> dict[str, float]:
        return {
            "commands": sum(self.commands.values()) / requests,
            "round_trips": self.reads / requests,
            "redis_cpu_us": self.cpu / requests * 1e6,
        }

    def top(self, requests: int, n: int = 12) -> list[tuple[str, float]]:
        return [(name, count / requests) for name, count in self.commands.most_common(n) if count / requests >= 0.05]


def snapshot(client: redis.Redis) -> Snapshot:
    info = client.info("all")
    commands = Counter()
    for key, value in info.items():
        if key.startswith("cmdstat_"):
            commands[key[len("cmdstat_") :]] = int(value["calls"])
    return Snapshot(
        at=time.monotonic(),
        commands=commands,
        reads=int(info["total_reads_processed"]),
        cpu=float(info["used_cpu_user"]) + float(info["used_cpu_sys"]),
    )


def delta(before: Snapshot, after: Snapshot, background: Cost | None = None) -> Cost:
    seconds = after.at - before.at
    commands = Counter({k: after.commands[k] - before.commands.get(k, 0) for k in after.commands})
    commands["info"] -= 1  # the first snapshot's own INFO (each snapshot counts the INFO calls before it)
    reads = after.reads - before.reads - 1  # the second snapshot's own INFO
    cpu = after.cpu - before.cpu
    if background is not None and background.seconds > 0:
        scale = seconds / background.seconds
        for name, count in background.commands.items():
            commands[name] -= count * scale
        reads -= background.reads * scale
        cpu -= background.cpu * scale
    commands = Counter({k: max(0.0, v) for k, v in commands.items() if v > 0})
    return Cost(commands, max(0.0, reads), max(0.0, cpu), seconds)


def background(client: redis.Redis, seconds: float) -> Cost:
    """What Redis does per `seconds` while nothing is asked of the system."""
    before = snapshot(client)
    time.sleep(seconds)
    return delta(before, snapshot(client))


def round_trip(client: redis.Redis, n: int = 2000) -> float:
    """Redis CPU (µs) of one bare round trip: a PING from one client that waits for each answer. What any
    command costs Redis here before it does anything (reading, writing, waking the client), on this machine."""
    before = snapshot(client)
    for _ in range(n):
        client.ping()
    return (snapshot(client).cpu - before.cpu) / n * 1e6


def sync_floor(url: str, n: int = 2000) -> float:
    """Redis CPU (µs) of the least a sync request over Redis streams can ask of Redis: the client's XADD to an
    input stream; a worker blocked in XREADGROUP, which answers with an XADD to a reply stream and an XACK
    pipelined with its next blocking read; a reader blocked in XREAD on the reply stream, as the API's is. Raw
    commands, no Lua: no bound, no idempotency, no live-worker look, no counters. 3 round trips per request
    (the client's, the worker's, the reader's next XREAD). Below this no design of the sync path goes on
    this machine."""
    prefix = f"qs-bench-floor:{{{uuid.uuid4().hex}}}"
    inbox, replies, group = f"{prefix}:in", f"{prefix}:replies", "floor"
    client = redis.Redis.from_url(url)
    client.xgroup_create(inbox, group, id="0", mkstream=True)
    stop = threading.Event()
    answered: set[bytes] = set()
    heard = threading.Condition()

    def worker() -> None:
        conn = redis.Redis.from_url(url)
        done: tuple[bytes, bytes] | None = None
        while not stop.is_set():
            with conn.pipeline(transaction=False) as pipe:
                if done is not None:
                    pipe.xadd(replies, {"rid": done[1], "body": b"x" * 32}, maxlen=1000)
                    pipe.xack(inbox, group, done[0])
                pipe.xreadgroup(group, "w", {inbox: ">"}, count=1, block=200)
                got = pipe.execute()[-1]
            done = None
            if got:
                entry_id, fields = got[0][1][0]
                done = (entry_id, fields[b"rid"])

    def reader() -> None:
        conn, cursor = redis.Redis.from_url(url), "0-0"
        while not stop.is_set():
            for _, entries in conn.xread({replies: cursor}, count=64, block=200) or []:
                for entry_id, fields in entries:
                    cursor = entry_id
                    with heard:
                        answered.add(fields[b"rid"])
                        heard.notify_all()

    def request(rid: bytes) -> None:
        client.xadd(inbox, {"rid": rid, "body": b"y" * 32})
        with heard:
            if not heard.wait_for(lambda: rid in answered, timeout=30):
                raise RuntimeError("the floor's worker did not answer")
            answered.discard(rid)

    threads = [threading.Thread(target=worker, daemon=True), threading.Thread(target=reader, daemon=True)]
    for thread in threads:
        thread.start()
    try:
        for i in range(50):  # warm up
            request(b"w%d" % i)
        before = snapshot(client)
        for i in range(n):
            request(b"r%d" % i)
        after = snapshot(client)
    finally:
        stop.set()
        for thread in threads:
            thread.join()
        client.delete(inbox, replies)
    return (after.cpu - before.cpu) / n * 1e6
