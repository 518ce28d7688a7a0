"""The dashboard's data, in process on a real Redis: who may see it, and that its numbers are the queues'.

The page itself, in a real browser against real processes, is tests/integration/test_dashboard_browser.py.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager

import httpx
import pytest
import redis
import redis.asyncio
from fastapi import FastAPI

from queue_service.api import create_app
from queue_service.api.dashboard import AnswerCounts
from queue_service.api.dashboard.answers import current_minute
from queue_service.api.metrics import Metrics
from queue_service.config import Settings, parse_services
from queue_service.store import keys
from queue_service.store.consumer import WorkerStore
from queue_service.store.model import Outcome
from queue_service.store.queues import QueueStore
from workers.worker import take_rules

TOKEN = "token-of-echo"
ADMIN = "admin-secret-token"
SERVICES = parse_services(
    {
        "services": [
            {
                "name": "echo",
                "processor": "workers.examples:Echo",
                "token": TOKEN,
                "metadata": {"rpc": {"max_queue_size": 3}},
            },
            {"name": "open", "processor": "workers.examples:Echo"},
        ]
    }
)
DATA_PATHS = ("/dashboard/api/overview", "/dashboard/api/failures", "/dashboard/api/request?id=x")


@pytest.fixture
def sync_redis(fresh_redis_url: str) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(fresh_redis_url)
    yield client
    client.close()


@pytest.fixture
async def async_redis(fresh_redis_url: str) -> AsyncIterator[redis.asyncio.Redis]:
    client = redis.asyncio.Redis.from_url(fresh_redis_url)
    yield client
    await client.aclose()


@asynccontextmanager
async def dashboard(
    redis_client: redis.asyncio.Redis, *, admin_token: str = "", client: tuple[str, int] = ("127.0.0.1", 50000)
) -> AsyncIterator[httpx.AsyncClient]:
    app: FastAPI = create_app(Settings(admin_token=admin_token), services=SERVICES, redis_client=redis_client)
    transport = httpx.ASGITransport(app=app, client=client)
    async with app.router.lifespan_context(app), httpx.AsyncClient(transport=transport, base_url="http://qs") as c:
        yield c


async def put(http: httpx.AsyncClient, body: bytes, service: str = "echo") -> httpx.Response:
    return await http.post(f"/api/predict/{service}", content=body, headers={"Authorization": TOKEN})


# --- access ----------------------------------------------------------------------------------


async def test_without_an_admin_token_the_dashboard_is_served_to_loopback_clients_only(
    async_redis: redis.asyncio.Redis,
) -> None:
    async with dashboard(async_redis) as local:
        assert (await local.get("/dashboard")).status_code == 200
        for path in DATA_PATHS[:2]:
            assert (await local.get(path)).status_code == 200
    async with dashboard(async_redis, client=("192.0.2.7", 50000)) as remote:
        for path in ("/dashboard", "/dashboard/static/dashboard.js", *DATA_PATHS):
            answer = await remote.get(path)
            assert answer.status_code == 403, path
            assert "QS_ADMIN_TOKEN" in answer.json()["detail"]


async def test_with_an_admin_token_the_data_needs_it_from_everyone_and_the_page_asks_for_it(
    async_redis: redis.asyncio.Redis,
) -> None:
    async with dashboard(async_redis, admin_token=ADMIN, client=("192.0.2.7", 50000)) as remote:
        # The page and its assets hold no data: they are served, and the page asks for the token.
        assert (await remote.get("/dashboard")).status_code == 200
        assert (await remote.get("/dashboard/static/dashboard.css")).status_code == 200
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": ADMIN}, {"Authorization": TOKEN}):
            for path in DATA_PATHS:
                answer = await remote.get(path, headers=headers)
                assert answer.status_code == 401, (path, headers)
                assert answer.headers["WWW-Authenticate"] == "Bearer"
        good = await remote.get("/dashboard/api/overview", headers={"Authorization": f"Bearer {ADMIN}"})
        assert good.status_code == 200
    # A token set: loopback clients need it too (a local proxy would make every client look local).
    async with dashboard(async_redis, admin_token=ADMIN) as local:
        assert (await local.get("/dashboard/api/overview")).status_code == 401


async def test_no_dashboard_answer_carries_a_service_token(async_redis: redis.asyncio.Redis) -> None:
    async with dashboard(async_redis) as http:
        request_id = (await put(http, b"payload")).headers["X-Eas-Queueservice-Request-Id"]
        answers = [await http.get(path) for path in ("/dashboard", "/dashboard/static/dashboard.js", *DATA_PATHS[:2])]
        answers.append(await http.get("/dashboard/api/request", params={"id": request_id}))
    for answer in answers:
        assert TOKEN not in answer.text


async def test_the_page_loads_nothing_from_elsewhere(async_redis: redis.asyncio.Redis) -> None:
    async with dashboard(async_redis) as http:
        page = await http.get("/dashboard")
    policy = page.headers["Content-Security-Policy"]
    assert "default-src 'none'" in policy and "script-src 'self'" in policy and "connect-src 'self'" in policy
    assert "http" not in page.text.replace("http-equiv", "")
    assert '<script src="/dashboard/static/dashboard.js"' in page.text


# --- the numbers ------------------------------------------------------------------------------


async def test_the_overview_numbers_are_the_queue_attributes(
    async_redis: redis.asyncio.Redis, sync_redis: redis.Redis
) -> None:
    worker = WorkerStore(sync_redis, "worker-a")
    worker.heartbeat(["echo"], ttl=30)
    async with dashboard(async_redis) as http:
        request_ids = [
            (await put(http, f"item {i}".encode())).headers["X-Eas-Queueservice-Request-Id"] for i in range(3)
        ]
        assert (await put(http, b"one too many")).status_code == 450
        taken = worker.take("echo", take_rules(SERVICES.by_name["echo"])).items[0]
        attrs = (
            await http.get("/api/predict/echo", params={"_attrs_": "true"}, headers={"Authorization": TOKEN})
        ).json()
        overview = (await http.get("/dashboard/api/overview")).json()
    echo = next(s for s in overview["services"] if s["name"] == "echo")
    assert echo["waiting"] == int(attrs["stream.waiting"]) == 2
    assert echo["inFlight"] == int(attrs["stream.inFlight"]) == 1
    assert echo["liveWorkers"] == int(attrs["workers.live"]) == 1
    assert f"{echo['backlogPerWorker']:.2f}" == attrs["workers.backlogPerWorker"]
    assert echo["lastIndex"] == int(attrs["stream.lastIndex"])
    (listed,) = [w for w in overview["workers"] if w["name"] == "worker-a"]
    assert listed["live"] is True and listed["services"] == ["echo"]
    (held,) = listed["holding"]
    assert (held["service"], held["index"], held["requestId"], held["deliveries"]) == (
        "echo",
        taken.index,
        request_ids[0],
        1,
    )


async def test_a_worker_whose_heartbeat_lapsed_is_listed_as_stale_with_what_it_still_holds(
    async_redis: redis.asyncio.Redis, sync_redis: redis.Redis
) -> None:
    worker = WorkerStore(sync_redis, "worker-gone")
    worker.heartbeat(["echo"], ttl=-1)  # its liveness lapsed a second ago: it died
    async with dashboard(async_redis) as http:
        await put(http, b"held by the dead")
        worker.take("echo", take_rules(SERVICES.by_name["echo"]))
        overview = (await http.get("/dashboard/api/overview")).json()
    (listed,) = [w for w in overview["workers"] if w["name"] == "worker-gone"]
    assert listed["live"] is False
    assert len(listed["holding"]) == 1
    assert next(s for s in overview["services"] if s["name"] == "echo")["liveWorkers"] == 0


async def test_failed_results_are_listed_with_their_code_and_message(
    async_redis: redis.asyncio.Redis, sync_redis: redis.Redis
) -> None:
    worker = WorkerStore(sync_redis, "worker-a")
    rules = take_rules(SERVICES.by_name["echo"])
    async with dashboard(async_redis) as http:
        ok_id = (await put(http, b"fine")).headers["X-Eas-Queueservice-Request-Id"]
        bad_id = (await put(http, b"broken")).headers["X-Eas-Queueservice-Request-Id"]
        worker.finish(worker.take("echo", rules).items[0], Outcome(b"fine"))
        worker.finish(worker.take("echo", rules).items[0], Outcome.failure(400, "ValueError('cannot parse')"))
        failures = (await http.get("/dashboard/api/failures")).json()
    assert [(f["requestId"], f["status"], f["message"]) for f in failures["failures"]] == [
        (bad_id, 400, "ValueError('cannot parse')")
    ]
    assert ok_id not in str(failures)
    assert failures["scans"]["echo"] == {"scanned": 2, "oldestAt": failures["scans"]["echo"]["oldestAt"], "failed": 1}


async def test_a_request_by_id_shows_its_state_timeline_and_result(
    async_redis: redis.asyncio.Redis, sync_redis: redis.Redis
) -> None:
    worker = WorkerStore(sync_redis, "worker-a")
    rules = take_rules(SERVICES.by_name["echo"])
    async with dashboard(async_redis) as http:
        request_id = (await put(http, b"hello")).headers["X-Eas-Queueservice-Request-Id"]
        queued = (await http.get("/dashboard/api/request", params={"id": request_id})).json()
        item = worker.take("echo", rules).items[0]
        running = (await http.get("/dashboard/api/request", params={"id": request_id, "service": "echo"})).json()
        worker.finish(item, Outcome(b"x" * 5000))
        done = (await http.get("/dashboard/api/request", params={"id": request_id})).json()
        unknown = await http.get("/dashboard/api/request", params={"id": "no-such-id"})
    assert queued["service"] == "echo" and queued["status"]["state"] == "queued"
    assert [e["event"] for e in queued["timeline"]] == ["accepted"]
    assert running["status"]["state"] == "running" and running["worker"] == "worker-a"
    assert [e["event"] for e in running["timeline"]] == ["accepted", "taken by a worker (delivery 1)"]
    assert done["status"]["statusCode"] == 200 and done["timeline"][-1]["event"] == "finished"
    result = done["result"]
    assert result["size"] == 5000 and result["truncated"] is True and result["preview"] == "x" * 4096
    assert result["link"] == f"/api/predict/echo/sink?requestId={request_id}&_raw_=true"
    assert unknown.status_code == 404


async def test_answer_counts_reach_the_minute_counters_added_up_across_api_processes(
    async_redis: redis.asyncio.Redis,
) -> None:
    store = QueueStore(async_redis)
    first, second = Metrics(), Metrics()
    counts = [AnswerCounts(first, store), AnswerCounts(second, store)]
    for _ in range(3):
        first.observe_request("echo", "put", 450, 0.001)
    first.observe_request("echo", "put", 200, 0.001)
    second.observe_request("echo", "put", 450, 0.001)
    second.observe_request("echo", "sync", 429, 0.001)
    for each in counts:
        await each.flush()
    await counts[0].flush()  # nothing new: nothing added twice
    (minute,) = await store.answers("echo", [current_minute()])
    assert minute == {"put:450": 4, "put:200": 1, "sync:429": 1}
    assert 0 < await async_redis.ttl(keys.answers("echo", current_minute())) <= 3600
