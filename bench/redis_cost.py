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
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

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


class _Floor:
    """The threads and keys of a floor measurement: raw stream commands, on keys of its own, deleted after."""

    def __init__(self, url: str) -> None:
        self.url = url
        prefix = f"qs-bench-floor:{{{uuid.uuid4().hex}}}"
        self.inbox, self.out, self.group = f"{prefix}:in", f"{prefix}:out", "floor"
        self.client = redis.Redis.from_url(url)
        self.client.xgroup_create(self.inbox, self.group, id="0", mkstream=True)
        self.stop = threading.Event()
        self.heard = threading.Condition()
        self.threads: list[threading.Thread] = []

    def run(self, *loops: Callable[[redis.Redis], None]) -> None:
        for loop in loops:
            conn = redis.Redis.from_url(self.url)
            self.threads.append(threading.Thread(target=loop, args=(conn,), daemon=True))
            self.threads[-1].start()

    def worker(self, conn: redis.Redis, answer: Callable[[Any, list[tuple[bytes, dict]]], None], count: int) -> None:
        """Read up to `count` items in the group; answer them and acknowledge them pipelined with the next read."""
        done: list[tuple[bytes, dict]] = []
        while not self.stop.is_set():
            with conn.pipeline(transaction=False) as pipe:
                if done:
                    answer(pipe, done)
                    pipe.xack(self.inbox, self.group, *[entry_id for entry_id, _ in done])
                    pipe.xdel(self.inbox, *[entry_id for entry_id, _ in done])
                pipe.xreadgroup(self.group, "w", {self.inbox: ">"}, count=count, block=200)
                got = pipe.execute()[-1]
            done = got[0][1] if got else []

    def cost(self, requests: Callable[[], None], n: int) -> float:
        """Redis CPU (µs) per request of `requests()`, which makes n of them; then everything stops."""
        try:
            before = snapshot(self.client)
            requests()
            after = snapshot(self.client)
        finally:
            self.stop.set()
            for thread in self.threads:
                thread.join()
            self.client.delete(self.inbox, self.out)
        return (after.cpu - before.cpu) / n * 1e6


def sync_floor(url: str, n: int = 2000, *, publish: bool = False) -> float:
    """Redis CPU (µs) of the least a sync request over Redis streams can ask of Redis: the client's XADD to an
    input stream; a worker blocked in XREADGROUP, which answers with an XADD to a reply stream and an XACK
    pipelined with its next blocking read; a reader blocked in XREAD on the reply stream, as the API's is.
    `publish`: the answer goes by PUBLISH to a subscribed reader instead, which reads nothing again (2 round
    trips per request, not 3: a put and a finish, each waking Redis once). Raw commands, no Lua: no bound, no
    idempotency, no live-worker look, no counters. Below the `publish` floor no design of the sync path goes
    on this machine."""
    floor = _Floor(url)
    answered: set[bytes] = set()

    def answer(pipe: Any, done: list[tuple[bytes, dict]]) -> None:
        for _, fields in done:
            if publish:
                pipe.publish(floor.out, fields[b"rid"])
            else:
                pipe.xadd(floor.out, {"rid": fields[b"rid"], "body": b"x" * 32}, maxlen=1000)

    def heard(rid: bytes) -> None:
        with floor.heard:
            answered.add(rid)
            floor.heard.notify_all()

    def reader(conn: redis.Redis) -> None:
        if publish:
            subscription = conn.pubsub()
            subscription.subscribe(floor.out)
            while not floor.stop.is_set():
                message = subscription.get_message(timeout=0.2)
                if message is not None and message["type"] == "message":
                    heard(message["data"])
            subscription.close()
            return
        cursor: Any = "0-0"
        while not floor.stop.is_set():
            for _, entries in conn.xread({floor.out: cursor}, count=64, block=200) or []:
                cursor = entries[-1][0]
                for _, fields in entries:
                    heard(fields[b"rid"])

    def request(rid: bytes) -> None:
        floor.client.xadd(floor.inbox, {"rid": rid, "body": b"y" * 32})
        with floor.heard:
            if not floor.heard.wait_for(lambda: rid in answered, timeout=30):
                raise RuntimeError("the floor's worker did not answer")
            answered.discard(rid)

    floor.run(lambda conn: floor.worker(conn, answer, 1), reader)
    time.sleep(0.2)  # the subscription is made
    for i in range(50):  # warm up
        request(b"w%d" % i)

    def requests() -> None:
        for i in range(n):
            request(b"r%d" % i)

    return floor.cost(requests, n)


def async_floor(url: str, n: int = 5000, connections: int = 16) -> float:
    """Redis CPU (µs) of the least an async request over Redis streams can ask of Redis, under load: clients
    on `connections` connections XADD to an input stream; a worker reads up to 16 items at once in its group
    and answers them with an XADD each to a sink stream, acknowledging and deleting them pipelined with its
    next read; a watcher reads the sink (XREAD) and deletes what it read. Raw commands, no Lua."""
    floor = _Floor(url)
    seen = [0]

    def answer(pipe: Any, done: list[tuple[bytes, dict]]) -> None:
        for _, fields in done:
            pipe.xadd(floor.out, {"rid": fields[b"rid"], "data": fields[b"body"]})

    def watcher(conn: redis.Redis) -> None:
        cursor: Any = "0-0"
        while not floor.stop.is_set():
            for _, entries in conn.xread({floor.out: cursor}, count=64, block=200) or []:
                cursor = entries[-1][0]
                conn.xdel(floor.out, *[entry_id for entry_id, _ in entries])
                with floor.heard:
                    seen[0] += len(entries)
                    floor.heard.notify_all()

    def requests() -> None:
        left, lock = [n], threading.Lock()

        def put() -> None:
            conn = redis.Redis.from_url(url)
            while True:
                with lock:
                    if left[0] <= 0:
                        return
                    left[0] -= 1
                conn.xadd(floor.inbox, {"rid": "r", "body": b"y" * 32})

        putters = [threading.Thread(target=put) for _ in range(connections)]
        for thread in putters:
            thread.start()
        for thread in putters:
            thread.join()
        with floor.heard:
            if not floor.heard.wait_for(lambda: seen[0] >= n, timeout=60):
                raise RuntimeError("the floor's worker did not answer every request")

    floor.run(lambda conn: floor.worker(conn, answer, 16), watcher)
    return floor.cost(requests, n)
