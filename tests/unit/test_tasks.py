"""`tasks.stop` ends a background task even when a cancel is swallowed (as redis-py 8.1 does mid-connect)."""

from __future__ import annotations

import asyncio

from queue_service import tasks


async def test_a_task_that_swallows_a_cancel_is_cancelled_again_until_it_ends() -> None:
    swallowed = 0

    async def loop_that_swallows_the_first_cancel() -> None:
        nonlocal swallowed
        while True:
            try:
                await asyncio.sleep(0.01)
            except asyncio.CancelledError:
                if swallowed:
                    raise
                swallowed += 1  # as a library that turns a cancel into an ordinary return would

    task = asyncio.create_task(loop_that_swallows_the_first_cancel())
    await asyncio.sleep(0.05)
    await asyncio.wait_for(tasks.stop(task), timeout=30)
    assert task.done() and swallowed == 1


async def test_a_task_that_never_stops_is_left_after_the_patience() -> None:
    released = asyncio.Event()

    async def stubborn() -> None:
        while not released.is_set():
            try:
                await asyncio.sleep(0.01)
            except asyncio.CancelledError:
                continue

    task = asyncio.create_task(stubborn())
    await asyncio.wait_for(tasks.stop(task, patience=0.5), timeout=30)
    assert not task.done()
    released.set()  # the test's own clean-up
    await asyncio.wait_for(task, timeout=30)
