"""Promise 3: the API killed at any point of a put leaves the request fully accepted or absent, never half."""

from __future__ import annotations

import contextlib
import socket
import threading

import httpx
import pytest

from queue_service.store import keys
from queue_service.testing import start_api
from tests.failure.harness import Put, Stack

pytestmark = pytest.mark.integration


def stored_items(stack: Stack, service: str) -> list[tuple[int, str]]:
    """(index, request id) of each item in the input queue, checked against the request-id index."""
    qi = keys.input_queue(service)
    items = [
        (keys.index_of(entry_id), fields[b"rid"].decode())
        for stream in qi.streams
        for entry_id, fields in stack.store.xrange(stream)
    ]
    assert len({rid for _, rid in items}) == len(items), f"a request id stored twice: {items}"
    by_request_id = {rid.decode(): int(index) for rid, index in stack.store.hgetall(qi.ids).items()}
    assert by_request_id == {rid: index for index, rid in items}, "stream and request-id index disagree"
    return items


@pytest.mark.parametrize(("fault", "stored"), [("put.admitted", False), ("put.stored", True)])
def test_api_killed_during_a_put_leaves_it_accepted_or_absent(stack: Stack, fault: str, stored: bool) -> None:
    doomed = stack.start_api(env={"QS_FAULTS": fault})
    token, body = stack.order(sleep=0.1)
    with pytest.raises(httpx.TransportError):  # the connection dies with the process: no answer
        httpx.post(f"{doomed}/api/predict/work", content=body, timeout=10)
    assert stack.apis[0].wait(5) == -9
    items = stored_items(stack, "work")
    if stored:
        [(index, request_id)] = items  # fully there: an index, the request id, its body
        assert index == 1
        stack.accept("work", token, request_id, index)
    else:
        assert items == []
        assert stack.store.get(keys.input_queue("work").seq) is None  # no index was given out
    # A new API process and a worker: the stored request is processed once; the queue works on.
    stack.url = stack.start_api()
    stack.start_worker("work")
    after = stack.put("work", sleep=0.1)
    assert after.status_code == 200
    assert after.index == (2 if stored else 1)
    stack.wait_settled(15)
    assert stack.audit() == {200: 2 if stored else 1}


class ReplyDropper:
    """A TCP proxy in front of Redis that, once armed, lets a command through and drops its answer."""

    def __init__(self, redis_port: int, marker: bytes) -> None:
        self.redis_port, self.marker = redis_port, marker
        self.armed = threading.Event()
        self.dropped = threading.Event()
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        with contextlib.suppress(OSError):
            while True:
                client, _ = self.listener.accept()
                server = socket.create_connection(("127.0.0.1", self.redis_port))
                doomed = threading.Event()
                threading.Thread(target=self._pump, args=(client, server, doomed, True), daemon=True).start()
                threading.Thread(target=self._pump, args=(server, client, doomed, False), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket, doomed: threading.Event, to_redis: bool) -> None:
        with contextlib.suppress(OSError), src, dst:
            while data := src.recv(65536):
                if not to_redis and doomed.is_set():
                    self.dropped.set()
                    dst.shutdown(socket.SHUT_RDWR)  # the answer never arrives: the connection closes
                    return
                if to_redis and self.armed.is_set() and self.marker in data:
                    # Doomed before Redis can answer: set after sending, the answer may already be through.
                    self.armed.clear()
                    doomed.set()
                dst.sendall(data)

    def close(self) -> None:
        self.listener.close()


def test_connection_lost_after_the_put_ran_stores_the_request_once(stack: Stack) -> None:
    marker = b"answer-lost"
    proxy = ReplyDropper(stack.redis_server.port, marker)
    try:
        api, url = start_api(f"redis://127.0.0.1:{proxy.port}/0", stack.services_file, log_dir=stack.log_dir)
        stack.apis.append(api)
        stack.url = url
        assert stack.put("work", sleep=0).status_code == 200  # put.lua is loaded: the next put runs it
        proxy.armed.set()
        token, body = stack.order(sleep=0, note=marker.decode())
        answer = httpx.post(f"{url}/api/predict/work", content=body, timeout=20)
        if not proxy.dropped.is_set():
            pytest.fail("the proxy did not drop the answer: the test proves nothing")  # not an xfail
        stack.record(Put("work", token, answer))
        stored_items(stack, "work")  # one entry per request id
    finally:
        proxy.close()
    stack.start_worker("work")
    stack.wait_settled(15)
    stack.audit()
