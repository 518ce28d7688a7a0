"""What the attack tests measure from outside the processes: Redis commands, clients and groups, process memory."""

from __future__ import annotations

from pathlib import Path

import redis

MIB = 1024 * 1024


def commands_executed(store: redis.Redis) -> int:
    """Commands Redis has run since it started, scripts' own calls included (INFO commandstats)."""
    stats = store.info("commandstats")
    return sum(int(stat["calls"]) for stat in stats.values())


def connected_clients(store: redis.Redis) -> int:
    return int(store.info("clients")["connected_clients"])


def group_names(store: redis.Redis, stream: str) -> list[str]:
    """The consumer groups of one stream ([] when the stream does not exist)."""
    if not store.exists(stream):
        return []
    return [group["name"].decode() for group in store.xinfo_groups(stream)]


def memory_mib(pid: int, field: str = "VmRSS") -> float:
    """A process's resident memory now (VmRSS) or at its peak (VmHWM), in MiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1]) / 1024  # the kernel reports kB
    raise AssertionError(f"no {field} in /proc/{pid}/status")
