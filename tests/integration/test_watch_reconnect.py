"""A watch that closes while results keep coming strands none of them: the next watch of the group gets
every result at once, not after the closed one's lease (10 s) lapses."""

from __future__ import annotations

import asyncio
import time

import httpx
import pytest
from websockets.asyncio.client import connect

from tests.integration.conftest import ApiFactory, WorkerFactory

pytestmark = pytest.mark.integration

GROUP = {"X-EAS-QueueService-Redis-Gid": "reconnect"}
LEASE_SECONDS = 10  # watch.LEASE_MS
# Stranded results would come only once the closed watch's lease lapsed, ~10 s after it closed; all
# 60 results take ~0.3 s on a quiet machine. The bound is generous for a loaded one and still short of that.
PROMPT_SECONDS = 0.7 * LEASE_SECONDS


async def watch_for(url: str, count: int, put_more: int = 0) -> float:
    """Watch the sink until `count` results arrive, putting `put_more` items meanwhile; return how long it took."""
    ws_url = url.replace("http://", "ws://") + "/api/predict/echo/sink?_watch_=true&_auto_commit_=true&_window_=100"
    async with connect(ws_url, additional_headers=GROUP) as ws, httpx.AsyncClient(base_url=url) as http:
        started = time.monotonic()
        puts = [asyncio.create_task(http.post("/api/predict/echo", content=b"x")) for _ in range(put_more)]
        for _ in range(count):
            await asyncio.wait_for(ws.recv(), timeout=LEASE_SECONDS * 2)
        for put in puts:
            assert (await put).status_code == 200
        return time.monotonic() - started


def test_results_put_while_a_watch_closes_go_to_the_next_watch(api: ApiFactory, worker: WorkerFactory) -> None:
    server = api()
    worker("echo")
    took = []
    for _ in range(3):
        # The first watch leaves as soon as it has its results; more are being written right then.
        asyncio.run(watch_for(server.url, 20, put_more=20))
        took.append(asyncio.run(watch_for(server.url, 60, put_more=60)))
        assert took[-1] < PROMPT_SECONDS, f"the second watch waited {took[-1]:.1f} s: results were stranded"
    print(f"\nTIMING the next watch had all 60 results after {', '.join(f'{t:.2f}' for t in took)} s")
