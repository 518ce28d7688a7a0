"""The failure tests' processor: records every call, and misbehaves when the request asks it to.

Each call appends a `start` line and (unless the process dies first) an `end` line to the file
named by $QS_TEST_CALLS, so the audit can tell how many times each request ran, in which process,
and whether a run completed. The body is a JSON order:

    {"token": "t-1", "sleep": 0.5}                       sleep, then answer {"token", "pid"}
    {"token": "t-2", "sleep": 0.1, "once": "/tmp/m",     the first run (the one that creates the
     "first": {"sleep": 30} | {"c_hang": true}           marker file) does `first` instead
              | {"c_stall": 5}}

`c_hang` is a processor stuck in C code: `sum(range(...))` is one C call that holds the GIL and
never checks for signals, so neither SIGALRM's handler nor the worker's lease thread can run
(`re` and ctypes calls were tried: CPython 3.11 interrupts both on SIGALRM). `c_stall` is a
bounded stall: libc's sleep called through ctypes.PyDLL, which keeps the GIL (no signal comes).
"""

from __future__ import annotations

import asyncio
import ctypes
import json
import os
import time
from typing import Any

CALLS_ENV = "QS_TEST_CALLS"
# Far more additions than any test waits for (hours of one C loop).
ENDLESS = 10**14


class Chaos:
    def initialize(self) -> None:
        self.calls = os.environ[CALLS_ENV]

    def process(self, data: bytes) -> dict[str, Any]:
        order = json.loads(data)
        token = order["token"]
        if order.get("once") and _first_run(order["once"]):
            order = {**order, **order.get("first", {})}
        self._record("start", token)
        outcome = "raised"
        try:
            if order.get("c_hang"):
                sum(range(ENDLESS))
            if order.get("c_stall"):  # PyDLL keeps the GIL through the call: the whole process stalls
                ctypes.PyDLL(None).sleep(int(order["c_stall"]))
            time.sleep(float(order.get("sleep", 0)))
            outcome = "ok"
            return {"token": token, "pid": os.getpid()}
        finally:
            self._record("end", token, outcome)

    def _record(self, event: str, token: str, outcome: str = "") -> None:
        line = json.dumps({"event": event, "token": token, "pid": os.getpid(), "t": time.time(), "outcome": outcome})
        # One O_APPEND write per line: lines of concurrent workers never interleave.
        fd = os.open(self.calls, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, (line + "\n").encode())
        finally:
            os.close(fd)


class AsyncChaos(Chaos):
    """Chaos as an async processor: one worker process holds `worker_threads` of its requests at once."""

    async def process(self, data: bytes) -> dict[str, Any]:  # type: ignore[override]
        order = json.loads(data)
        token = order["token"]
        if order.get("once") and _first_run(order["once"]):
            order = {**order, **order.get("first", {})}
        self._record("start", token)
        outcome = "raised"
        try:
            if order.get("c_hang"):  # blocks the event loop, and the whole process with it (the GIL)
                sum(range(ENDLESS))
            await asyncio.sleep(float(order.get("sleep", 0)))
            outcome = "ok"
            return {"token": token, "pid": os.getpid()}
        finally:
            self._record("end", token, outcome)


class BatchChaos(Chaos):
    """Chaos with batching: one `process_batch` call runs the orders of a batch together, sleeping the
    longest `sleep` of them; each result also says the size of the batch it ran in."""

    def process_batch(self, data: list[bytes]) -> list[dict[str, Any]]:
        orders = [json.loads(body) for body in data]
        for order in orders:
            self._record("start", order["token"])
        outcome = "raised"
        try:
            time.sleep(max(float(order.get("sleep", 0)) for order in orders))
            outcome = "ok"
            return [{"token": order["token"], "pid": os.getpid(), "batch": len(orders)} for order in orders]
        finally:
            for order in orders:
                self._record("end", order["token"], outcome)


def _first_run(marker: str) -> bool:
    try:
        os.close(os.open(marker, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644))
    except FileExistsError:
        return False
    return True
