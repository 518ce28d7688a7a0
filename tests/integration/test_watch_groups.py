"""Watch over WebSocket: consumer groups share a queue's items, each group sees every item.

The identity headers name the consumer and its group, as the official client sends them. Items
are put straight into a sink that no worker writes to, so each test knows exactly what is there.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from urllib.parse import urlencode

import httpx
import pytest
from websockets.sync.client import ClientConnection, connect

from queue_service.wire import DataFrame, decode_frame
from tests.integration.conftest import Api, ApiFactory

pytestmark = pytest.mark.integration

SINK = "/api/predict/echo/sink"


@contextmanager
def watching(service: Api, consumer: str, group: str, window: int, **tags: str) -> Iterator[ClientConnection]:
    query = {"_watch_": "true", "_index_": "0", "_window_": str(window), "_auto_commit_": "false", **tags}
    url = service.url.replace("http://", "ws://") + SINK + "?" + urlencode(query)
    headers = {"X-EAS-QueueService-Redis-Uid": consumer, "X-EAS-QueueService-Redis-Gid": group}
    with connect(url, additional_headers=headers) as ws:
        yield ws


def receive(ws: ClientConnection, count: int) -> list[DataFrame]:
    return [decode_frame(ws.recv(timeout=5)) for _ in range(count)]


def assert_nothing_more(ws: ClientConnection, seconds: float = 0.5) -> None:
    with pytest.raises(TimeoutError):
        ws.recv(timeout=seconds)


def put_items(http: httpx.Client, count: int, **tags: str) -> list[int]:
    return [int(http.post(SINK, content=f"item {i}".encode(), params=tags).text) for i in range(count)]


def indexes(frames: list[DataFrame]) -> set[int]:
    return {frame.index for frame in frames}


def test_consumers_of_a_group_share_items_and_another_group_sees_them_all(api: ApiFactory) -> None:
    service = api()
    with service.client() as http:
        put = set(put_items(http, 10))
    with (
        watching(service, "a", "g1", window=5) as a,
        watching(service, "b", "g1", window=5) as b,
        watching(service, "c", "g2", window=10) as c,
    ):
        got_a, got_b, got_c = receive(a, 5), receive(b, 5), receive(c, 10)
        assert_nothing_more(a)  # its window is full
        assert_nothing_more(b)
    assert not indexes(got_a) & indexes(got_b), "no item goes to two consumers of one group"
    assert indexes(got_a) | indexes(got_b) == put
    assert indexes(got_c) == put, "another group sees every item"
    assert {frame.data for frame in got_c} == {f"item {i}".encode() for i in range(10)}


def test_items_of_a_consumer_that_leaves_uncommitted_go_to_another_consumer_of_its_group(api: ApiFactory) -> None:
    service = api()
    with service.client() as http:
        put = set(put_items(http, 6))
        with watching(service, "b", "g1", window=3) as b:
            with watching(service, "a", "g1", window=3) as a:
                got_a = receive(a, 3)
            got_b = receive(b, 3)  # a has left without committing what it holds
            assert indexes(got_a) | indexes(got_b) == put
            assert_nothing_more(b)
            committed = http.put(SINK, params={"_indexes_": ",".join(str(i) for i in indexes(got_b))})
            assert committed.text == "OK"
            # The slots the commit freed are filled with what `a` left behind.
            assert indexes(receive(b, 3)) == indexes(got_a)
            assert_nothing_more(b)


def test_a_watcher_with_a_tag_filter_receives_only_matching_items(api: ApiFactory) -> None:
    service = api()
    with service.client() as http:
        red = set(put_items(http, 3, color="red"))
        put_items(http, 3, color="blue")
        red |= set(put_items(http, 2, color="red"))
    with watching(service, "r", "reds", window=10, color="red") as ws:
        frames = receive(ws, len(red))
        assert_nothing_more(ws)
    assert indexes(frames) == red
    assert all(frame.tags["color"] == "red" for frame in frames)
