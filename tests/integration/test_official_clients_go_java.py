"""The Go and Java SDKs' queue exchanges, each sent exactly as the client sends it, against a real stack.

Read from their public source (`eas/queue_client.go`, `eas/types/`; `QueueClient.java`,
`WebSocketWatcher.java`): the Go client encodes its query with `url.Values.Encode` (keys sorted), the Java
client builds it from a HashMap (any order, `_force_` before `_eos_` included). Both send the token raw in
`Authorization` and the consumer identity headers on every call. The clients' code is not in this repository.
"""

from __future__ import annotations

import json
import struct
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import httpx
import pytest
import redis
from websockets.sync.client import ClientConnection, connect

from queue_service.protocol import END_OF_STREAM_TAG, PRIORITY_HEADER
from queue_service.store import keys
from queue_service.wire import AttributesProto, DataFrame, decode_frame, decode_frame_list
from tests.conftest import ServicesFileFactory
from tests.integration.conftest import ECHO, Api, ApiFactory, WorkerFactory
from tests.support.counts import assert_counts_true
from tests.support.eas import run_eas
from tests.support.waiting import wait_until

pytestmark = pytest.mark.integration

TOKEN = "sdk-token-4c1d"
PROTOBUF = "application/vnd.google.protobuf"
SERVICES: list[dict[str, Any]] = [
    {"name": "echo", "processor": ECHO, "token": TOKEN},
    {"name": "paths", "processor": "tests.support.processors:RequestPath", "token": TOKEN},
    # No worker: what the tests put stays where they put it. Delivered twice, an item is given up.
    {"name": "idle", "processor": ECHO, "token": TOKEN, "queue": {"max_delivery": 2}},
]


@pytest.fixture
def sdk_services(services_file: ServicesFileFactory) -> Path:
    return services_file(SERVICES)


@pytest.fixture
def served(api: ApiFactory, sdk_services: Path) -> Api:
    return api(sdk_services)


def identity(uid: str | None = None, gid: str = "eas") -> dict[str, str]:
    """The headers both clients send on every call."""
    return {
        "Authorization": TOKEN,
        "X-EAS-QueueService-Redis-Uid": uid or str(uuid.uuid4()),
        "X-EAS-QueueService-Redis-Gid": gid,
    }


def go_query(**params: str) -> str:
    """Go's url.Values.Encode: keys sorted."""
    return urlencode(sorted(params.items()))


def put(http: httpx.Client, path: str, body: bytes, headers: dict[str, str] | None = None) -> int:
    answer = http.post(path, content=body, headers=headers or identity())
    assert answer.status_code == 200, answer.text
    return int(answer.text)


@contextmanager
def ws_watch(service: Api, path: str, uid: str, **params: str) -> Iterator[ClientConnection]:
    """The Go/Java/Python WebSocket watch: `ws://` on the queue's path, identity and Accept headers."""
    query = go_query(_watch_="true", **params)
    url = service.url.replace("http://", "ws://") + path + "?" + query
    with connect(url, additional_headers={**identity(uid), "Accept": PROTOBUF}) as ws:
        yield ws


def receive(ws: ClientConnection, count: int, timeout: float = 10) -> list[DataFrame]:
    return [decode_frame(ws.recv(timeout=timeout)) for _ in range(count)]


class FrameReader:
    """Go's lengthDelimitedFrameReader: each frame is a 4-byte big-endian length, then a DataFrameProto."""

    def __init__(self, chunks: Iterator[bytes]) -> None:
        self.chunks = chunks
        self.buffer = b""

    def _take(self, size: int) -> bytes:
        while len(self.buffer) < size:
            self.buffer += next(self.chunks)
        taken, self.buffer = self.buffer[:size], self.buffer[size:]
        return taken

    def frame(self) -> DataFrame:
        (length,) = struct.unpack(">I", self._take(4))
        return decode_frame(self._take(length))


def test_go_end_of_stream_lets_watchers_drain_then_sends_the_end_and_refuses_puts(
    served: Api, sync_redis: redis.Redis
) -> None:
    sink = "/api/predict/idle/sink"
    with served.client() as http:
        put_indexes = [put(http, sink, f"result {i}".encode()) for i in range(3)]
        # Go `End(ctx, false)`: POST with `_eos_=true` and no body.
        ended = http.post(f"{sink}?{go_query(_eos_='true')}", headers=identity())
        assert ended.status_code == 200, ended.text
        assert int(ended.text) == put_indexes[-1], "the stream ends after the last index given out"

        refused = http.post(sink, content=b"too late", headers=identity())
        assert refused.status_code == 400
        assert "has ended" in refused.json()["detail"]
        assert http.get(sink, params={"_attrs_": "true"}, headers=identity()).json()["stream.eos"] == ended.text

        # A watcher gets everything put before the end, then one frame that says the stream ended.
        with ws_watch(served, sink, "drainer", _index_="0", _window_="5", _auto_commit_="true") as ws:
            frames = receive(ws, 4)
            assert [f.index for f in frames[:3]] == put_indexes
            end = frames[3]
            assert (end.index, end.tags, end.data) == (0, {END_OF_STREAM_TAG: "true"}, b"")
            with pytest.raises(TimeoutError):
                ws.recv(timeout=1.5)  # nothing more, and the connection stays open: no reconnect storm

        # A truncate past the end reopens the queue.
        reopened = http.delete(
            f"{sink}?{go_query(_index_=str(int(ended.text) + 1), _trunc_='true')}", headers=identity()
        )
        assert reopened.status_code == 200
        assert put(http, sink, b"after the reopening") > put_indexes[-1]
    assert_counts_true(sync_redis, "idle")


def test_java_forced_end_of_stream_drops_what_is_left_and_watchers_see_the_end_at_once(
    served: Api, sync_redis: redis.Redis
) -> None:
    queue = "/api/predict/idle"
    with served.client() as http:
        for i in range(5):
            put(http, queue, f"job {i}".encode())
        # Java `end(true)`: its HashMap put `_force_` first.
        ended = http.post(f"{queue}?_force_=true&_eos_=true", headers=identity())
        assert ended.status_code == 200, ended.text
        attrs = http.get(queue, params={"_attrs_": "true"}, headers=identity()).json()
        assert attrs["stream.length"] == "0", "a forced end removes what is left"
        assert http.post(queue, content=b"x", headers=identity()).status_code == 400
        with ws_watch(served, queue, "late", _index_="0", _window_="5", _auto_commit_="false") as ws:
            [end] = receive(ws, 1, timeout=5)
        assert end.tags == {END_OF_STREAM_TAG: "true"}
        # A watcher idle before the end hears of it at once too (not at its next look, 30 s on).
        http.delete(f"{queue}?_index_={int(ended.text) + 1}&_trunc_=true", headers=identity())
        with ws_watch(served, queue, "idle", _index_="0", _window_="5", _auto_commit_="false") as ws:
            with pytest.raises(TimeoutError):
                ws.recv(timeout=1)  # open, nothing to deliver
            assert http.post(f"{queue}?_eos_=true", headers=identity()).status_code == 200
            [end] = receive(ws, 1, timeout=5)
        assert end.tags == {END_OF_STREAM_TAG: "true"}
    assert_counts_true(sync_redis, "idle")


def test_negative_commit_gives_the_item_back_to_the_group_then_ends_it_past_max_delivery(
    served: Api, sync_redis: redis.Redis
) -> None:
    queue = "/api/predict/idle"
    qi = keys.input_queue("idle")

    def held() -> tuple[str, int] | None:
        """The group's consumer holding the item and how often the group was delivered it (None: nobody now)."""
        rows = sync_redis.xpending_range(qi.normal, "eas", "-", "+", 1)
        if not rows or rows[0]["time_since_delivered"] > 60_000:  # a refused item waits for its next consumer
            return None
        return keys.consumer_id_of(rows[0]["consumer"].decode()), int(rows[0]["times_delivered"])

    with served.client() as http:
        answer = http.post(queue, content=b"work", headers=identity())
        index, request_id = int(answer.text), answer.headers["X-Eas-Queueservice-Request-Id"]
        watch = {"_index_": "0", "_window_": "1", "_auto_commit_": "false", "_index_only_": "false"}
        with ws_watch(served, queue, "first", **watch), ws_watch(served, queue, "second", **watch):
            holder, deliveries = wait_until(held, 10, "the item delivered to a consumer of the group")
            assert deliveries == 1
            # Go `Negative(ctx, types.Shutdown, reason, index)`: PUT, a form body and its Content-Type.
            refused = http.put(
                f"{queue}?{go_query(_indexes_=str(index), _negative_='true')}",
                content=urlencode({"_code_": "Shutdown", "_reason_": "instance draining"}),
                headers={**identity(holder), "Content-Type": "application/x-www-form-urlencoded"},
            )
            assert refused.status_code == 200, refused.text
            holder, deliveries = wait_until(
                lambda: (h := held()) is not None and h[1] >= 2 and h, 10, "the item delivered again to the group"
            )
            # Java `negative(index, "Shutdown", reason)`: the second refusal reaches max_delivery (2): it ends.
            ended = http.put(
                f"{queue}?_negative_=true&_indexes_={index}",
                content=b"_reason_=instance+draining&_code_=Shutdown",
                headers={**identity(holder), "Content-Type": "application/x-www-form-urlencoded"},
            )
            assert ended.status_code == 200, ended.text
        result = http.get(
            "/api/predict/idle/sink", params={"requestId": request_id, "_timeout_": "5s"}, headers=identity()
        )
    assert result.status_code == 200, result.text
    [item] = result.json()
    assert item["tags"] == {"requestId": request_id, "lastCode": "500"}
    assert item["message"] == "Shutdown: instance draining"
    assert sync_redis.xlen(qi.normal) == 0, "the input item is gone once it ended"
    assert_counts_true(sync_redis, "idle")


def test_java_count_answers_a_plain_integer_with_and_without_priority(served: Api) -> None:
    queue = "/api/predict/idle"
    with served.client() as http:
        for _ in range(3):
            put(http, queue, b"normal")
        for _ in range(2):
            http.post(f"{queue}?_priority_=5", content=b"urgent", headers=identity()).raise_for_status()
        put(http, queue + "?team=blue", b"tagged")
        # Java `count(null)`, `count(3, null)`, `count(tags)`: the body is read as a long.
        everything = http.get(f"{queue}?_count_=true", headers=identity())
        urgent = http.get(f"{queue}?_priority_=3&_count_=true", headers=identity())
        blue = http.get(f"{queue}?_count_=true&team=blue", headers=identity())
    assert (everything.status_code, everything.text) == (200, "6")
    assert urgent.text == "2"
    assert blue.text == "1"


def test_priority_as_java_and_go_send_it_goes_ahead_of_normal_items(served: Api) -> None:
    queue = "/api/predict/idle"
    with served.client() as http:
        attrs = http.get(queue, params={"_attrs_": "true"}, headers=identity()).json()
        header = attrs["meta.header.priority"]
        assert header == PRIORITY_HEADER
        put(http, queue, b"normal")
        # Java `put(data, 7, tags)`: `_priority_=7` in the query and the attributes' header.
        java = http.post(f"{queue}?_priority_=7", content=b"java", headers={**identity(), header: "7"})
        # Go `PutWithPriority(ctx, data, tags, 1)`: only the header the attributes name.
        go = http.post(queue, content=b"go", headers={**identity(), header: "1"})
        # A Go client that read the attributes before they named our header sends `_priority_`.
        cached = http.post(queue, content=b"cached", headers={**identity(), "_priority_": "1"})
        assert [java.status_code, go.status_code, cached.status_code] == [200, 200, 200]
        listed = http.get(
            queue,
            params={"_index_": "0", "_length_": "10", "_timeout_": "0s", "_raw_": "false", "_auto_delete_": "false"},
            headers={**identity(), "Accept": PROTOBUF},
        )
    assert [frame.data for frame in decode_frame_list(listed.content)] == [b"java", b"go", b"cached", b"normal"]


def test_go_http_watch_streams_length_prefixed_frames_within_its_window_and_releases_on_disconnect(
    served: Api,
) -> None:
    sink = "/api/predict/idle/sink"
    with served.client() as http:
        indexes = [put(http, sink, f"result {i}".encode()) for i in range(6)]
        # Go `Watch(ctx, 0, 5, false, false)` with `WebsocketWatch = false`.
        query = go_query(_auto_commit_="false", _index_="0", _index_only_="false", _watch_="true", _window_="5")
        headers = {**identity("http-watcher"), "Accept": PROTOBUF}
        with http.stream("GET", f"{sink}?{query}", headers=headers) as stream:
            assert stream.status_code == 200
            assert stream.headers["content-type"] == PROTOBUF
            reader = FrameReader(stream.iter_raw())
            first = [reader.frame() for _ in range(5)]
            assert [f.index for f in first] == indexes[:5]
            assert first[0].data == b"result 0"
            # The window is full: the sixth comes only after a commit.
            commit = http.put(f"{sink}?{go_query(_indexes_=str(first[0].index))}", headers=identity("http-watcher"))
            assert commit.status_code == 200
            assert reader.frame().index == indexes[5]
        # Gone without committing: another consumer of the group gets what it held, at once.
        with ws_watch(served, sink, "next", _index_="0", _window_="10", _auto_commit_="true") as ws:
            assert sorted(f.index for f in receive(ws, 5, timeout=5)) == indexes[1:]


def test_go_http_watch_with_auto_commit_empties_the_queue(served: Api) -> None:
    sink = "/api/predict/idle/sink"
    with served.client() as http:
        for i in range(10):
            put(http, sink, str(i).encode())
        query = go_query(_auto_commit_="true", _index_="0", _index_only_="true", _watch_="true", _window_="5")
        with http.stream("GET", f"{sink}?{query}", headers={**identity(), "Accept": PROTOBUF}) as stream:
            reader = FrameReader(stream.iter_raw())
            frames = [reader.frame() for _ in range(10)]
        assert all(frame.data == b"" for frame in frames), "index only: no data"
        wait_until(
            lambda: http.get(sink, params={"_attrs_": "true"}, headers=identity()).json()["stream.length"] == "0",
            10,
            "the sink empty",
        )


def test_attributes_carry_the_backend_consumer_rows_and_groups(
    served: Api, worker: WorkerFactory, sdk_services: Path
) -> None:
    worker("echo", services_file=sdk_services)
    sink = "/api/predict/echo/sink"
    with served.client() as http, ws_watch(served, sink, "row-1", _index_="0", _window_="3", _auto_commit_="false"):

        def attrs() -> dict[str, str]:
            return http.get(sink, params={"_attrs_": "true"}, headers=identity()).json()

        found = wait_until(lambda: (a := attrs()).get("consumers.status.total") == "1" and a, 10, "the watcher listed")
        assert found["meta.backend"] == "redis"
        assert found["consumers.stats.total"] == "1"
        assert found["groups.list"] == "eas"
        row = found["consumers.list.[0]"]
        assert row.startswith("Id: eas.row-1, ")
        assert "Status: Running" in row and "Window: 3" in row and "Slots: 3" in row and "AutoCommit: false" in row
        inputs = http.get("/api/predict/echo", params={"_attrs_": "true"}, headers={**identity(), "Accept": PROTOBUF})
    # Go reads them as AttributesProto; the worker is the input queue's consumer.
    proto = AttributesProto()
    proto.ParseFromString(inputs.content)
    attributes = dict(proto.attributes)
    for key in ("meta.backend", "meta.name", "meta.state", "meta.maxPayloadBytes", "meta.header.user",
                "meta.header.group", "meta.header.priority", "stream.length", "stream.approxMaxLength",
                "stream.lastEntry", "stream.firstEntry"):  # fmt: skip
        assert key in attributes, f"Go requires {key}"
    assert attributes["consumers.status.total"] == "1"
    assert attributes["consumers.list.[0]"].startswith("Id: qs-workers.")


def test_sub_paths_reach_the_processor_async_and_sync(served: Api, worker: WorkerFactory, sdk_services: Path) -> None:
    worker("paths", services_file=sdk_services)
    with served.client() as http:
        # Go `PutWithPath(ctx, data, "sub/path", tags)`.
        answer = http.post("/api/predict/paths/sub/path", content=b"async", headers=identity())
        assert answer.status_code == 200, answer.text
        request_id = answer.headers["X-Eas-Queueservice-Request-Id"]
        result = http.get(
            "/api/predict/paths/sink",
            params={"requestId": request_id, "_timeout_": "20s", "_raw_": "true"},
            headers=identity(),
        )
        # Go PredictClient with `SetRequestPath("sleep")` on service `paths/sync`.
        synced = http.post("/api/predict/paths/sync/sleep", content=b"sync", headers={"Authorization": TOKEN})
        sink_path = http.post("/api/predict/paths/sink/extra", content=b"x", headers=identity())
    assert json.loads(result.content) == {"path": "sub/path", "data": "async"}
    assert (synced.status_code, synced.json()) == (200, {"path": "sleep", "data": "sync"})
    assert sink_path.status_code == 404, "a path under the sink is no sub-path of the input queue"


DIRECT = """
import sys
from eas_prediction import QueueClient
from eas_prediction.predict_client import ENDPOINT_TYPE_DIRECT

address, token = sys.argv[1], sys.argv[2]
queue = QueueClient(address, "echo")
queue.set_endpoint_type(ENDPOINT_TYPE_DIRECT)
queue.set_token(token)
queue.init()
index, request_id = queue.put(b"direct")
print(index, request_id)
"""


def test_direct_mode_lists_this_api_and_the_python_client_uses_it(served: Api, sync_redis: redis.Redis) -> None:
    host_port = served.url.removeprefix("http://")
    with served.client() as http:
        # No token: the clients' discovery call sends none.
        python_path = http.get("/api/v1/servicediscovery/upstreams/echo")
        go_path = http.get("/exported/apis/eas.alibaba-inc.k8s.io/v1/upstreams/echo?internal=false")
        unknown = http.get("/api/v1/servicediscovery/upstreams/nosuch")
    host, port = host_port.rsplit(":", 1)
    assert python_path.json() == {"endpoints": {"items": [{"ip": host, "port": int(port), "weight": 100}]}}
    assert go_path.json() == python_path.json()
    assert unknown.status_code == 404
    ran = run_eas(DIRECT, host_port, TOKEN)
    assert ran.returncode == 0, ran.stderr
    index, _ = ran.stdout.split()
    assert sync_redis.xlen(keys.input_queue("echo").normal) >= 1 and int(index) >= 1


def test_java_get_of_nothing_answers_200_empty_at_its_timeout_and_json_still_gets_204(served: Api) -> None:
    queue = "/api/predict/idle/sink"
    with served.client() as http:
        # Java `get(0, 1, 1, true, null)`: only a 200 is an answer to it (a 204 it asks again, five times).
        started = time.monotonic()
        java = http.get(
            f"{queue}?_raw_=false&_length_=1&_auto_delete_=true&_index_=0&_timeout_=1s",
            headers={**identity(), "Accept": PROTOBUF},
        )
        waited = time.monotonic() - started
        # The PAI SDK's AsyncPredictor asks for JSON and takes 204 as "not yet".
        sdk = http.get(queue, params={"requestId": "nothing-yet", "_raw_": "false"}, headers={"Authorization": TOKEN})
    assert (java.status_code, java.content) == (200, b"")
    assert decode_frame_list(java.content) == []
    assert 0.9 <= waited < 4, f"the long poll answered after {waited:.2f} s"
    assert sdk.status_code == 204
