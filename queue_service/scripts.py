"""The Lua scripts that make each queue operation atomic, loaded once per Redis client.

Every script in `lua/` is prepended with `lua/common.lua` (shared helpers). redis-py's
`register_script` sends EVALSHA and falls back to EVAL, so a restarted Redis needs no reload.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache
from importlib import resources
from typing import Any

NAMES = ("put", "take", "finish", "lease", "remove", "read", "search", "rate")


@cache
def source(name: str) -> str:
    folder = resources.files("queue_service") / "lua"
    return (folder / "common.lua").read_text() + "\n" + (folder / f"{name}.lua").read_text()


@dataclass(frozen=True, slots=True)
class Scripts:
    """Registered scripts of one client (sync `redis.Redis` or `redis.asyncio.Redis`)."""

    put: Any
    take: Any
    finish: Any
    lease: Any
    remove: Any
    read: Any
    search: Any
    rate: Any

    @classmethod
    def register(cls, client: Any) -> Scripts:
        return cls(**{name: client.register_script(source(name)) for name in NAMES})
