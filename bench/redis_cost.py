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

import time
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
