"""Hearing that an HTTP client left: a task that waits on the ASGI `receive` for `http.disconnect`.

uvicorn answers `receive()` with `http.disconnect` when the connection is lost (and also once the response
is complete, so the listener is stopped before the answer is sent). A waiting route sets a callback, e.g.
to wake its waiter, instead of polling.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable

from starlette.types import Receive


class ClientGone:
    """Listens for the client of one request to leave; `gone` tells, `on_gone` wakes whoever waits."""

    def __init__(self, receive: Receive) -> None:
        self.gone = False
        self._callbacks: list[Callable[[], None]] = []
        self._task = asyncio.create_task(self._listen(receive))

    async def _listen(self, receive: Receive) -> None:
        while (await receive())["type"] != "http.disconnect":
            pass
        self.gone = True
        for callback in self._callbacks:
            callback()

    def on_gone(self, callback: Callable[[], None]) -> None:
        self._callbacks.append(callback)

    async def wait(self) -> None:
        await asyncio.shield(self._task)

    def close(self) -> None:
        self._task.cancel()

    async def aclose(self) -> None:
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task
