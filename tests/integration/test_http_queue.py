"""The queue over plain HTTP, as curl or httpx users see it: put, then get the result from the sink.

Real redis-server, the API under uvicorn and `rq worker` processes: the tests that read only their own
requests share one stack (`served`), the others start their own (fixtures in conftest.py).
"""

from __future__ import annotations

import asyncio
import base64
import time
from collections import Counter
from collections.abc import Iterator

import httpx
import pytest

from queue_service.embedded_redis import RedisServer
from queue_service.testing import ManagedProcess, start_api, start_worker, write_services
from queue_service.wire import PROTOBUF_MEDIA_TYPE, decode_frame_list
from tests.conftest import ServicesFileFactory
from tests.integration.conftest import (
    ECHO,
    REQUEST_ID,
    STANDARD_SERVICES,
    Api,
    ApiFactory,
    WorkerFactory,
    stop_all,
    wait_until,
)

# One xdist worker runs the module, so `served` starts once.
pytestmark = [pytest.mark.integration, pytest.mark.xdist_group("http_queue")]


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Api]:
    """One redis-server, API and worker (echo, sleep) for the tests that read only their own requests.

    A test that needs an empty sink, its own worker or its own services file takes `api` and `worker`.
    """
    directory = tmp_path_factory.mktemp("http-queue")
    services = write_services(directory / "services.yaml", STANDARD_SERVICES)
    with RedisServer(data_dir=directory / "redis") as server:
        api_process, url = start_api(server.url, services, log_dir=directory / "logs")
        processes: list[ManagedProcess] = [api_process]
        try:
            processes.append(start_worker(server.url, services, ["echo", "sleep"], log_dir=directory / "logs"))
            yield Api(api_process, url)
        finally:
            stop_all(processes)


def put(http: httpx.Client, path: str, body: bytes, **params: str) -> tuple[int, str]:
    answer = http.post(path, content=body, params=params)
    assert answer.status_code == 200, answer.text
    return int(answer.text), answer.headers[REQUEST_ID]


def sink_request_ids(http: httpx.Client, service: str) -> list[str]:
    """The request ids of the results in a sink, in index order (without removing them)."""
    answer = http.get(f"/api/predict/{service}/sink", params={"_length_": "100"})
    return [item["tags"]["requestId"] for item in answer.json()] if answer.status_code == 200 else []


def test_put_then_get_the_same_bytes_from_the_sink_by_request_id(served: Api) -> None:
    service = served
    body = bytes(range(256)) * 4  # not UTF-8: the bytes must come back untouched
    with service.client() as http:
        answer = http.post("/api/predict/echo", content=body)
        assert answer.status_code == 200
        assert answer.text.isdigit() and int(answer.text) >= 1
        request_id = answer.headers[REQUEST_ID]
        assert len(request_id) >= 32

        result = http.get(
            "/api/predict/echo/sink", params={"requestId": request_id, "_raw_": "true", "_timeout_": "5s"}
        )
        assert result.status_code == 200
        assert result.content == body
        assert result.headers[REQUEST_ID] == request_id


def test_get_answers_json_or_protobuf_with_the_request_id_tag(served: Api) -> None:
    service = served
    with service.client() as http:
        _, request_id = put(http, "/api/predict/echo", b"hello", origin="curl")
        params = {"requestId": request_id, "_timeout_": "5s", "_auto_delete_": "false"}

        as_json = http.get("/api/predict/echo/sink", params=params)
        assert as_json.status_code == 200
        [item] = as_json.json()
        assert base64.b64decode(item["data"]) == b"hello"
        assert item["tags"] == {"origin": "curl", "requestId": request_id}
        assert "lastCode" not in item["tags"]

        as_protobuf = http.get("/api/predict/echo/sink", params=params, headers={"Accept": PROTOBUF_MEDIA_TYPE})
        assert as_protobuf.status_code == 200
        assert as_protobuf.headers["content-type"].startswith(PROTOBUF_MEDIA_TYPE)
        [frame] = decode_frame_list(as_protobuf.content)
        assert (frame.index, frame.data, frame.tags) == (item["index"], b"hello", item["tags"])


def test_get_answers_204_when_nothing_is_there_and_the_timeout_really_waits(served: Api) -> None:
    service = served
    with service.client() as http:
        started = time.monotonic()
        at_once = http.get("/api/predict/echo/sink", params={"requestId": "no-such-id", "_timeout_": "0s"})
        assert at_once.status_code == 204
        # At once: `0s` is not Redis's BLOCK 0 (forever), nor any long poll.
        assert time.monotonic() - started < 1.4

        started = time.monotonic()
        waited = http.get("/api/predict/echo/sink", params={"requestId": "no-such-id", "_timeout_": "1500ms"})
        elapsed = time.monotonic() - started
        assert waited.status_code == 204
        assert waited.content == b""
        # Not before its timeout, and not after another round of waiting (a long poll blocks 5 s at most).
        assert 1.4 <= elapsed < 4.5, f"the 1.5 s long poll answered after {elapsed:.2f} s"


def test_a_long_poll_returns_as_soon_as_the_result_arrives(served: Api) -> None:
    service = served
    with service.client() as http:
        _, request_id = put(http, "/api/predict/sleep", b"1")
        started = time.monotonic()
        result = http.get(
            "/api/predict/sleep/sink", params={"requestId": request_id, "_raw_": "true", "_timeout_": "10s"}
        )
        elapsed = time.monotonic() - started
    assert result.status_code == 200
    assert result.json() == {"slept": 1.0}
    # With the result, well before the timeout (~1.05 s on a quiet machine).
    assert 0.7 <= elapsed < 6, f"answered after {elapsed:.2f} s for a 1 s job and a 10 s timeout"


def test_a_processor_error_reaches_the_sink_with_last_code_400_and_its_message(served: Api) -> None:
    service = served
    with service.client() as http:
        _, request_id = put(http, "/api/predict/sleep", b"not a number")
        params = {"requestId": request_id, "_timeout_": "5s", "_auto_delete_": "false"}
        [item] = http.get("/api/predict/sleep/sink", params=params).json()
        assert item["tags"]["lastCode"] == "400"
        assert item["tags"]["requestId"] == request_id
        assert item["message"].startswith("ValueError: Sleep expects")
        assert b"not a number" in base64.b64decode(item["data"])

        raw = http.get("/api/predict/sleep/sink", params={**params, "_raw_": "true"})
        assert raw.headers["X-Eas-Queueservice-Last-Code"] == "400"


def test_a_priority_item_put_last_is_processed_first(api: ApiFactory, worker: WorkerFactory) -> None:
    service = api()
    with service.client() as http:
        normal = [put(http, "/api/predict/echo", f"normal {i}".encode())[1] for i in range(3)]
        _, urgent = put(http, "/api/predict/echo", b"urgent", _priority_="1")
        worker("echo")  # only now: all four wait when the worker starts
        sink = wait_until(lambda: len(ids := sink_request_ids(http, "echo")) == 4 and ids, 10, "4 results in the sink")
    # The sink's indexes are given out as results are written: its order is the processing order.
    assert sink == [urgent, *normal]


async def test_fifty_concurrent_putters_never_overshoot_max_queue_size(
    api: ApiFactory, services_file: ServicesFileFactory
) -> None:
    path = services_file([{"name": "bounded", "processor": ECHO, "metadata": {"rpc": {"max_queue_size": 10}}}])
    service = api(path)
    limits = httpx.Limits(max_connections=50)
    async with httpx.AsyncClient(base_url=service.url, limits=limits, timeout=30) as http:
        answers = await asyncio.gather(*(http.post("/api/predict/bounded", content=f"{i}".encode()) for i in range(50)))
        statuses = Counter(answer.status_code for answer in answers)
        attrs = (await http.get("/api/predict/bounded", params={"_attrs_": "true"})).json()
    assert statuses == {200: 10, 450: 40}
    assert attrs["stream.length"] == "10"
    assert attrs["stream.waiting"] == "10"


async def test_puts_complete_quickly_while_long_polls_wait(served: Api) -> None:
    service = served
    async with httpx.AsyncClient(base_url=service.url, timeout=60) as http:
        sink_polls = [
            asyncio.create_task(http.get("/api/predict/echo/sink", params={"requestId": "nobody", "_timeout_": "15s"}))
            for _ in range(5)
        ]
        await asyncio.sleep(0.3)  # the long polls are now blocked in Redis
        durations = []
        for i in range(20):
            started = time.monotonic()
            answer = await http.post("/api/predict/echo", content=f"{i}".encode())
            durations.append(time.monotonic() - started)
            assert answer.status_code == 200
        still_waiting = not any(poll.done() for poll in sink_polls)
        for poll in sink_polls:
            poll.cancel()
    print(f"\nTIMING 20 puts beside 5 long polls: slowest {max(durations):.3f} s, all {sum(durations):.3f} s")
    assert still_waiting, "the 15 s long polls answered before their timeout"
    # Not queued behind the long polls (that would take their 15 s); a few ms each on a quiet machine.
    assert max(durations) < 5, f"puts took {[f'{d:.3f}' for d in durations]}"


def test_a_five_second_long_poll_answers_204_after_five_seconds(served: Api) -> None:
    # `_timeout_=5s` is the official client's default for get.
    service = served
    with service.client(timeout=20) as http:
        started = time.monotonic()
        answer = http.get("/api/predict/echo/sink", params={"requestId": "nobody", "_timeout_": "5s"})
    elapsed = time.monotonic() - started
    assert answer.status_code == 204
    # At its timeout: not before, and not after a second wait.
    assert 4.9 <= elapsed < 8, f"answered after {elapsed:.2f} s"
