"""The HTTP API over fakeredis, as a client of the queue protocol sees it: bodies, status codes and headers."""

from __future__ import annotations

import asyncio
import base64
import uuid
from collections.abc import AsyncIterator

import fakeredis
import httpx
import pytest
from queue_service.consumer import InputConsumer, Outcome, TakenItem

from queue_service.api import create_app
from queue_service.config import Settings, parse_services
from queue_service.wire import PROTOBUF_MEDIA_TYPE, AttributesProto, decode_frame_list

TOKEN = "token-of-echo"
AUTH = {"Authorization": TOKEN}
ECHO = "/api/predict/echo"
SERVICES = parse_services(
    {
        "services": [
            {
                "name": "echo",
                "processor": "workers.examples:Echo",
                "token": TOKEN,
                "metadata": {"rpc": {"max_queue_size": 3}},
                "queue": {"max_payload_size_kb": 1},
            },
            {"name": "other", "processor": "workers.examples:Echo", "token": "token-of-other"},
        ]
    }
)
REQUEST_ID = "X-Eas-Queueservice-Request-Id"


@pytest.fixture
def server() -> fakeredis.FakeServer:
    return fakeredis.FakeServer()


@pytest.fixture
async def client(server: fakeredis.FakeServer) -> AsyncIterator[httpx.AsyncClient]:
    app = create_app(Settings(), services=SERVICES, redis_client=fakeredis.FakeAsyncRedis(server=server))
    transport = httpx.ASGITransport(app=app)
    async with app.router.lifespan_context(app), httpx.AsyncClient(transport=transport, base_url="http://qs") as c:
        yield c


@pytest.fixture
def worker(server: fakeredis.FakeServer) -> InputConsumer:
    return InputConsumer(fakeredis.FakeRedis(server=server), "worker-1")


async def put(client: httpx.AsyncClient, body: bytes = b"x", query: str = "", path: str = ECHO) -> httpx.Response:
    response = await client.post(f"{path}{query}", content=body, headers=AUTH)
    assert response.status_code == 200, response.text
    return response


# --- put and get --------------------------------------------------------------------------


async def test_put_answers_the_index_and_the_request_id(client: httpx.AsyncClient) -> None:
    first = await put(client)
    second = await put(client)

    assert (first.text, second.text) == ("1", "2")
    request_ids = {first.headers[REQUEST_ID], second.headers[REQUEST_ID]}
    assert len(request_ids) == 2
    assert all(uuid.UUID(rid).version == 4 for rid in request_ids)


async def test_put_then_get_by_request_id(client: httpx.AsyncClient) -> None:
    await put(client, b"other")
    wanted = await put(client, b"\x00\xff not text", "?user=ana&lang=en")

    response = await client.get(ECHO, params={"requestId": wanted.headers[REQUEST_ID]}, headers=AUTH)

    assert response.status_code == 200
    assert response.headers["content-type"] == "application/json"
    assert response.json() == [
        {
            "index": 2,
            "tags": {"user": "ana", "lang": "en", "requestId": wanted.headers[REQUEST_ID]},
            "data": base64.b64encode(b"\x00\xff not text").decode(),
            "message": "",
        }
    ]


async def test_get_with_the_protobuf_accept_header_answers_a_data_frame_list(client: httpx.AsyncClient) -> None:
    first = await put(client, b"one", "?k=v")
    await put(client, b"two")

    response = await client.get(ECHO, params={"_length_": "5"}, headers=AUTH | {"Accept": PROTOBUF_MEDIA_TYPE})

    assert response.headers["content-type"] == PROTOBUF_MEDIA_TYPE
    frames = decode_frame_list(response.content)
    assert [(f.index, f.data) for f in frames] == [(1, b"one"), (2, b"two")]
    assert frames[0].tags == {"k": "v", "requestId": first.headers[REQUEST_ID]}


async def test_get_raw_answers_the_bare_bytes_of_one_item(client: httpx.AsyncClient) -> None:
    put_response = await put(client, b"\x89PNG\x00\xff")
    await put(client, b"second")

    response = await client.get(ECHO, params={"_raw_": "true", "_length_": "5"}, headers=AUTH)

    assert response.status_code == 200
    assert response.content == b"\x89PNG\x00\xff"
    assert response.headers["X-Eas-Queueservice-Index"] == "1"
    assert response.headers[REQUEST_ID] == put_response.headers[REQUEST_ID]


async def test_get_of_an_empty_queue_answers_204(client: httpx.AsyncClient) -> None:
    response = await client.get(ECHO, params={"_timeout_": "0s"}, headers=AUTH)

    assert response.status_code == 204
    assert response.content == b""


async def test_get_waits_up_to_its_timeout_for_a_result(client: httpx.AsyncClient) -> None:
    async def put_result_later() -> None:
        await asyncio.sleep(0.2)
        await put(client, b"result", path=f"{ECHO}/sink")

    response, _ = await asyncio.gather(
        client.get(f"{ECHO}/sink", params={"_timeout_": "5s"}, headers=AUTH), put_result_later()
    )

    assert response.status_code == 200
    assert base64.b64decode(response.json()[0]["data"]) == b"result"


async def test_get_with_auto_delete_returns_an_item_only_once(client: httpx.AsyncClient) -> None:
    await put(client, b"once")

    first = await client.get(ECHO, params={"_auto_delete_": "true"}, headers=AUTH)
    second = await client.get(ECHO, params={"_auto_delete_": "true"}, headers=AUTH)

    assert [base64.b64decode(item["data"]) for item in first.json()] == [b"once"]
    assert second.status_code == 204


async def test_get_with_a_tag_filter(client: httpx.AsyncClient) -> None:
    await put(client, b"a", "?user=ana")
    await put(client, b"b", "?user=bob")

    response = await client.get(ECHO, params={"user": "bob", "_length_": "10"}, headers=AUTH)

    assert [item["index"] for item in response.json()] == [2]


async def test_a_worker_result_is_read_from_the_sink_by_request_id(
    client: httpx.AsyncClient, worker: InputConsumer
) -> None:
    request_id = (await put(client, b"bad input")).headers[REQUEST_ID]
    item = worker.take(SERVICES.by_name["echo"])
    assert isinstance(item, TakenItem)
    worker.finish(item, Outcome(b"ValueError: bad", status=400, message="ValueError: bad"))

    response = await client.get(f"{ECHO}/sink", params={"requestId": request_id, "_raw_": "true"}, headers=AUTH)

    assert response.content == b"ValueError: bad"
    assert response.headers["X-Eas-Queueservice-Last-Code"] == "400"
    assert response.headers[REQUEST_ID] == request_id


# --- delete, commit, truncate, attributes, search -----------------------------------------


async def indexes(client: httpx.AsyncClient) -> list[int]:
    response = await client.get(ECHO, params={"_length_": "100"}, headers=AUTH)
    return [item["index"] for item in response.json()] if response.status_code == 200 else []


async def test_delete_by_indexes_answers_ok(client: httpx.AsyncClient) -> None:
    for _ in range(3):
        await put(client)

    response = await client.delete(ECHO, params={"_indexes_": "1,3"}, headers=AUTH)

    assert (response.status_code, response.text) == (200, "OK")
    assert await indexes(client) == [2]


async def test_commit_by_indexes_answers_ok(client: httpx.AsyncClient) -> None:
    for _ in range(3):
        await put(client)

    response = await client.put(ECHO, params={"_indexes_": "2"}, headers=AUTH)

    assert (response.status_code, response.text) == (200, "OK")
    assert await indexes(client) == [1, 3]


async def test_truncate_answers_ok_and_removes_the_items_below_the_index(client: httpx.AsyncClient) -> None:
    for _ in range(3):
        await put(client)

    response = await client.delete(ECHO, params={"_index_": "3", "_trunc_": "true"}, headers=AUTH)

    assert (response.status_code, response.text) == (200, "OK")
    assert await indexes(client) == [3]


async def test_attributes_answer_a_json_object_of_strings(client: httpx.AsyncClient) -> None:
    await put(client)
    await put(client)

    response = await client.get(ECHO, params={"_attrs_": "true"}, headers=AUTH)

    attrs = response.json()
    assert all(isinstance(value, str) for value in attrs.values())
    assert attrs["meta.name"] == "echo"
    assert attrs["meta.maxPayloadBytes"] == "1024"
    assert attrs["stream.length"] == "2"
    assert attrs["stream.approxMaxLength"] == "3"
    assert (attrs["stream.firstEntry"], attrs["stream.lastEntry"]) == ("1", "2")


async def test_attributes_in_protobuf_with_the_accept_header(client: httpx.AsyncClient) -> None:
    await put(client)

    response = await client.get(ECHO, params={"_attrs_": "true"}, headers=AUTH | {"Accept": PROTOBUF_MEDIA_TYPE})

    attrs = AttributesProto()
    attrs.ParseFromString(response.content)
    assert response.headers["content-type"] == PROTOBUF_MEDIA_TYPE
    assert (attrs.attributes["meta.name"], attrs.attributes["stream.length"]) == ("echo", "1")


async def test_search_tells_how_many_wait_ahead(client: httpx.AsyncClient) -> None:
    for _ in range(3):
        await put(client)

    response = await client.get(ECHO, params={"_search_": "true", "_index_": "3"}, headers=AUTH)

    assert response.json() == {"ConsumerId": "", "IsPending": False, "WaitCount": 2}


async def test_search_of_an_absent_index_is_404_no_data_in_stream(client: httpx.AsyncClient) -> None:
    response = await client.get(ECHO, params={"_search_": "true", "_index_": "9"}, headers=AUTH)

    assert response.status_code == 404
    assert response.json() == {"detail": "no data in stream"}


# --- refusals -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("authorization", "status"),
    [
        (None, 401),
        ("not-the-token", 401),
        ("token-of-other", 401),  # another service's token opens only that service
        (f"Bearer {TOKEN}", 200),
        (TOKEN, 200),
    ],
)
async def test_put_needs_this_services_token(client: httpx.AsyncClient, authorization: str | None, status: int) -> None:
    headers = {"Authorization": authorization} if authorization else {}

    response = await client.post(ECHO, content=b"x", headers=headers)

    assert response.status_code == status
    if status == 401:
        assert "detail" in response.json()


async def test_every_operation_needs_the_token(client: httpx.AsyncClient) -> None:
    wrong = {"Authorization": "Bearer nope"}
    responses = [
        await client.get(ECHO, headers=wrong),
        await client.get(ECHO, params={"_attrs_": "true"}, headers=wrong),
        await client.delete(ECHO, params={"_indexes_": "1"}, headers=wrong),
        await client.put(ECHO, params={"_indexes_": "1"}, headers=wrong),
        await client.get(f"{ECHO}/sink", headers=wrong),
    ]

    assert [r.status_code for r in responses] == [401] * len(responses)


async def test_unknown_service_is_404_naming_it(client: httpx.AsyncClient) -> None:
    response = await client.post("/api/predict/nosuch", content=b"x", headers=AUTH)

    assert response.status_code == 404
    assert response.json() == {"detail": "service 'nosuch' not found"}


async def test_unknown_path_is_404(client: httpx.AsyncClient) -> None:
    response = await client.get("/api/predictions/echo", headers=AUTH)

    assert response.status_code == 404
    assert "/api/predictions/echo" in response.json()["detail"]


async def test_a_method_the_path_does_not_take_is_405_with_allow(client: httpx.AsyncClient) -> None:
    response = await client.get(f"{ECHO}/sync", headers=AUTH)

    assert response.status_code == 405
    assert response.headers["Allow"] == "POST"
    assert "GET" in response.json()["detail"]


async def test_405_on_a_queue_path_lists_every_method_it_takes(client: httpx.AsyncClient) -> None:
    response = await client.patch(ECHO, headers=AUTH)

    assert response.status_code == 405
    allowed = {m.strip() for m in response.headers["Allow"].split(",")}
    assert {"GET", "POST", "PUT", "DELETE"} <= allowed
    assert "PATCH" not in allowed


async def test_body_over_max_payload_size_is_413(client: httpx.AsyncClient) -> None:
    fits = await client.post(ECHO, content=b"x" * 1024, headers=AUTH)
    too_big = await client.post(ECHO, content=b"x" * 1025, headers=AUTH)

    assert fits.status_code == 200
    assert too_big.status_code == 413
    assert "1024" in too_big.json()["detail"]


async def test_streamed_body_over_max_payload_size_is_413(client: httpx.AsyncClient) -> None:
    async def chunks() -> AsyncIterator[bytes]:  # no Content-Length: the size shows only while reading
        for _ in range(3):
            yield b"x" * 512

    response = await client.post(ECHO, content=chunks(), headers=AUTH)

    assert response.status_code == 413
    assert await indexes(client) == []


async def test_put_into_a_full_queue_is_450(client: httpx.AsyncClient) -> None:
    for _ in range(3):
        await put(client)

    response = await client.post(ECHO, content=b"x", headers=AUTH)

    assert response.status_code == 450
    assert "full" in response.json()["detail"]
    assert await indexes(client) == [1, 2, 3]


@pytest.mark.parametrize(
    ("method", "query", "named"),
    [
        ("GET", "?_index_=abc", "_index_"),
        ("GET", "?_index_=-1", "_index_"),
        ("GET", "?_length_=0", "_length_"),
        ("GET", "?_raw_=maybe", "_raw_"),
        ("GET", "?_timeout_=soon", "_timeout_"),
        ("GET", "?_foo_=1", "_foo_"),
        ("POST", "?_foo_=1", "_foo_"),
        ("POST", "?_priority_=high", "_priority_"),
        ("DELETE", "?_indexes_=1,x", "_indexes_"),
        ("DELETE", "", "_indexes_"),
        ("PUT", "?_indexes_=0", "_indexes_"),
    ],
)
async def test_a_malformed_parameter_is_400_naming_it(
    client: httpx.AsyncClient, method: str, query: str, named: str
) -> None:
    response = await client.request(method, f"{ECHO}{query}", content=b"x" if method == "POST" else None, headers=AUTH)

    assert response.status_code == 400
    assert named in response.json()["detail"]


async def test_a_refused_put_stores_nothing(client: httpx.AsyncClient) -> None:
    await client.post(f"{ECHO}?_foo_=1", content=b"x", headers=AUTH)
    await client.post(ECHO, content=b"x", headers={"Authorization": "wrong"})

    assert await indexes(client) == []


# --- request id header --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("method", "path", "headers", "status"),
    [
        ("GET", ECHO, AUTH, 204),
        ("GET", f"{ECHO}?_attrs_=true", AUTH, 200),
        ("GET", f"{ECHO}?_index_=x", AUTH, 400),
        ("GET", ECHO, {}, 401),
        ("GET", "/api/predict/nosuch", AUTH, 404),
        ("GET", "/nowhere", AUTH, 404),
        ("GET", f"{ECHO}/sync", AUTH, 405),
        ("GET", "/healthz", {}, 200),
    ],
)
async def test_every_response_carries_a_request_id(
    client: httpx.AsyncClient, method: str, path: str, headers: dict[str, str], status: int
) -> None:
    response = await client.request(method, path, headers=headers)

    assert response.status_code == status
    assert uuid.UUID(response.headers[REQUEST_ID])


async def test_distinct_requests_get_distinct_request_ids(client: httpx.AsyncClient) -> None:
    ids = {(await client.get(ECHO, headers=AUTH)).headers[REQUEST_ID] for _ in range(5)}

    assert len(ids) == 5


async def test_an_internal_error_is_500_with_the_request_id(server: fakeredis.FakeServer) -> None:
    redis = fakeredis.FakeAsyncRedis(server=server)
    await redis.set("qs:{echo}:input:seq", "not a number")  # breaks the next put inside Redis
    app = create_app(Settings(), services=SERVICES, redis_client=redis)
    transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
    async with app.router.lifespan_context(app), httpx.AsyncClient(transport=transport, base_url="http://qs") as c:
        response = await c.post(ECHO, content=b"x", headers=AUTH)

    assert response.status_code == 500
    assert response.headers[REQUEST_ID] in response.json()["detail"]


# --- metrics ------------------------------------------------------------------------------


def metric(text: str, name: str, **labels: str) -> float:
    """The value of one sample of the Prometheus text `text`."""
    wanted = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
    for line in text.splitlines():
        if line.startswith("#"):
            continue
        sample, _, value = line.rpartition(" ")
        sample_name, _, sample_labels = sample.partition("{")
        found = ",".join(sorted(sample_labels.rstrip("}").split(","))) if sample_labels else ""
        if sample_name == name and found == wanted:
            return float(value)
    raise AssertionError(f"no sample {name}{{{wanted}}} in /metrics")


async def test_metrics_show_queue_state_refusals_and_worker_timings(
    client: httpx.AsyncClient, worker: InputConsumer
) -> None:
    for _ in range(3):
        await put(client)
    refused = await client.post(ECHO, content=b"x", headers=AUTH)
    assert refused.status_code == 450
    taken = worker.take(SERVICES.by_name["echo"])
    assert isinstance(taken, TakenItem)
    worker.finish(taken, Outcome(b"done"), processing_seconds=0.2)

    text = (await client.get("/metrics")).text

    assert metric(text, "queue_service_waiting_items", service="echo") == 2
    assert metric(text, "queue_service_sink_items", service="echo") == 1
    assert metric(text, "queue_service_requests_total", service="echo", operation="put", status="200") == 3
    assert metric(text, "queue_service_requests_total", service="echo", operation="put", status="450") == 1
    assert metric(text, "queue_service_processing_seconds_count", service="echo") == 1
    assert metric(text, "queue_service_processing_seconds_bucket", service="echo", le="0.25") == 1
    assert metric(text, "queue_service_processing_seconds_bucket", service="echo", le="0.1") == 0
    assert metric(text, "queue_service_oldest_waiting_age_seconds", service="echo") >= 0


async def test_metrics_do_not_grow_a_label_per_unknown_service_name(client: httpx.AsyncClient) -> None:
    await client.post("/api/predict/no-such-service", content=b"x", headers=AUTH)
    assert "no-such-service" not in (await client.get("/metrics")).text
