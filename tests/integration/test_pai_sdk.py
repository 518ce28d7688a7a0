"""The PAI Python SDK (`alipai`, `pai/predictor.py`), unchanged, against our API and rq workers.

The SDK learns a service's endpoint and token from a cloud session (`session.service_api.get(name)`); the
stand-in below answers that from here, and nothing of the SDK is patched. It runs in its own venv
(`tests/support/eas.py`: it pins protobuf<=3.20.3). Two things of ours it depends on: its `predict_async`
closes its HTTP session once the headers are in and reads the body later, so a small answer must come in one
write (queue_service/serve.py); and it polls every 5 s exactly, so idle connections must stay open longer.
"""

from __future__ import annotations

import json
import socket
import time
from pathlib import Path

import pytest

from tests.conftest import ServicesFileFactory
from tests.integration.conftest import ECHO, SLEEP, ApiFactory, WorkerFactory
from tests.support.eas import run_pai

pytestmark = pytest.mark.integration

TOKEN = "pai-sdk-token-77a0"
ASYNC_CALLS = 24

SDK = """
import asyncio, json, sys
from pai.predictor import AsyncPredictor, Predictor

url, token, async_calls = sys.argv[1], sys.argv[2], int(sys.argv[3])
PATHS = {"echo-sync": "/api/predict/echo/sync", "echo": "/api/predict/echo", "sleep": "/api/predict/sleep"}


class ServiceAPI:
    def get(self, name):
        endpoint = url + PATHS[name]
        config = {"metadata": {"type": "Async" if name != "echo-sync" else "Standard"}}
        return {"InternetEndpoint": endpoint, "IntranetEndpoint": endpoint, "AccessToken": token,
                "Status": "Running", "ServiceConfig": json.dumps(config)}


class StandInSession:
    # What the SDK asks its cloud session for, answered without a cloud.
    service_api = ServiceAPI()
    workspace_id, region_id = "ws", "local"


session = StandInSession()
out = {"sync": [], "threads": [], "async": [], "raw_async": [], "errors": []}

sync = Predictor("echo-sync", session=session)
for i in range(10):
    out["sync"].append(sync.predict({"n": i}) == {"n": i})

queued = AsyncPredictor("echo", session=session, max_workers=4)
tasks = [queued.predict({"n": i}) for i in range(5)]
out["threads"] = [task.result(timeout=60) == {"n": i} for i, task in enumerate(tasks)]
# A 6 s request: the SDK polls at 0, 5 and 10 s on one kept-alive connection, idle 5 s in between.
slow = AsyncPredictor("sleep", session=session)
out["slow"] = slow.predict(6).result(timeout=60)


async def one(i):
    try:
        return await queued.predict_async({"n": i}) == {"n": i}
    except Exception as exc:
        out["errors"].append(repr(exc))
        return False


async def raw(i):
    try:
        answer = await queued.raw_predict_async(json.dumps({"raw": i}).encode())
        return answer.status_code == 200 and json.loads(answer.content) == {"raw": i}
    except Exception as exc:
        out["errors"].append(repr(exc))
        return False


async def main():
    out["async"] = await asyncio.gather(*(one(i) for i in range(async_calls)))
    out["raw_async"] = await asyncio.gather(*(raw(i) for i in range(async_calls // 2)))


asyncio.run(main())
print(json.dumps(out))
"""


@pytest.fixture
def pai_services(services_file: ServicesFileFactory) -> Path:
    return services_file(
        [
            {"name": "echo", "processor": ECHO, "token": TOKEN, "metadata": {"rpc": {"keepalive": 20000}}},
            {"name": "sleep", "processor": SLEEP, "token": TOKEN},
        ]
    )


def test_the_pai_sdk_predictors_succeed_on_every_call(
    api: ApiFactory, worker: WorkerFactory, pai_services: Path
) -> None:
    service = api(pai_services)
    worker("echo", services_file=pai_services)
    worker("sleep", services_file=pai_services)

    ran = run_pai(SDK, service.url, TOKEN, str(ASYNC_CALLS))

    assert ran.returncode == 0, ran.stderr[-3000:]
    out = json.loads(ran.stdout.strip().splitlines()[-1])
    assert out["errors"] == [], f"{len(out['errors'])} failed calls, e.g. {out['errors'][:3]}"
    assert out["sync"] == [True] * 10, "Predictor (sync path)"
    assert out["threads"] == [True] * 5, "AsyncPredictor.predict"
    assert out["slow"] == {"slept": 6}, "AsyncPredictor.predict polling every 5 s"
    assert out["async"] == [True] * ASYNC_CALLS, "AsyncPredictor.predict_async"
    assert out["raw_async"] == [True] * (ASYNC_CALLS // 2), "AsyncPredictor.raw_predict_async"


def test_an_idle_connection_is_still_open_when_the_sdk_polls_again_after_five_seconds(
    api: ApiFactory, pai_services: Path
) -> None:
    service = api(pai_services)
    host, port = service.url.removeprefix("http://").rsplit(":", 1)
    poll = (
        b"GET /api/predict/echo/sink?requestId=not-yet&_raw_=false HTTP/1.1\r\n"
        b"Host: x\r\nAuthorization: " + TOKEN.encode() + b"\r\n\r\n"
    )
    with socket.create_connection((host, int(port)), timeout=10) as conn:
        conn.sendall(poll)
        assert conn.recv(65536).startswith(b"HTTP/1.1 204")
        time.sleep(6)  # the SDK's 5 s poll interval, and a little: uvicorn's default would have closed it at 5 s
        conn.sendall(poll)
        assert conn.recv(65536).startswith(b"HTTP/1.1 204"), "the idle connection was closed"
