"""Stopping a background task for sure.

redis-py 8.1 swallows a cancel that lands while a connection is being set up: the command then runs to its
end, and a task looping over Redis calls goes on as if never cancelled (reproduced here with the waiters'
XREAD; an API's shutdown in a test hung for 5 minutes; the class of bug of redis-py issue 2028). `stop`
cancels again until the task is gone, and gives up after `patience`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

log = logging.getLogger(__name__)

# Between two cancels: a swallowed one shows as the task still running after this.
RECANCEL_SECONDS = 0.2


async def stop(task: asyncio.Task[object] | None, patience: float = 10.0) -> None:
    """Cancel `task` and wait for it to end, cancelling again while it goes on; its outcome is dropped."""
    if task is None:
        return
    loop = asyncio.get_running_loop()
    deadline = loop.time() + patience
    while not task.done():
        task.cancel()
        await asyncio.wait({task}, timeout=min(RECANCEL_SECONDS, max(0.0, deadline - loop.time())))
        if loop.time() >= deadline and not task.done():
            log.warning("task %s did not stop within %.0fs; left running", task.get_name(), patience)
            return
    with contextlib.suppress(asyncio.CancelledError, Exception):
        task.result()
