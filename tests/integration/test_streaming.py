"""A request's output streamed while it runs, on a real stack: what an SSE client (httpx-sse) sees of it, in
order and complete, resumed with Last-Event-ID at every point, through a worker's death, a cancel, a slow
reader, the byte cap, and on the sync path with 408 and 499."""

from __future__ import annotations

import base64
import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis
from httpx_sse import ServerSentEvent, connect_sse

from queue_service.store import keys
from queue_service.testing import ManagedProcess, start_api
from tests.conftest import ServicesFileFactory
from tests.integration.conftest import ECHO, REQUEST_ID, Api, WorkerFactory
from tests.support.counts import assert_counts_true
from tests.support.waiting import wait_until

pytestmark = pytest.mark.integration

TOKENS = "workers.examples:Tokens"
STREAMS = "tests.integration.processors:Streams"
CAP = 1000
KEEPALIVE = 0.5


@pytest.fixture
def standard_services(services_file: ServicesFileFactory) -> Path:
    """This module's services: the `worker` fixture serves them."""
    return services_file(
        [
            {"name": "llm", "processor": TOKENS, "metadata": {"rpc": {"worker_threads": 8, "keepalive": 20_000}}},
            {
                "name": "handover",  # a short lease: a killed worker's request is handed over within seconds
                "processor": TOKENS,
                "metadata": {"rpc": {"worker_threads": 2}},
                "queue": {"lease_seconds": 2},
            },
            {
                "name": "streams",
                "processor": STREAMS,
                "metadata": {"rpc": {"keepalive": 1000}},
                "queue": {"stream": {"max_bytes": CAP}, "lease_seconds": 2},
            },
            {"name": "later", "processor": TOKENS},  # no worker until a test starts one
            {"name": "echo", "processor": ECHO},
        ]
    )


@pytest.fixture
def stack(redis_url: str, standard_services: Path, tmp_path: Path, process_logs: list[ManagedProcess]) -> Api:
    env = {"QS_STREAM_KEEPALIVE_SECONDS": str(KEEPALIVE)}
    process, url = start_api(redis_url, standard_services, env=env, log_dir=tmp_path / "logs")
    process_logs.append(process)
    return Api(process, url)


@pytest.fixture
def http(stack: Api) -> Iterator[httpx.Client]:
    with stack.client() as client:
        yield client


def put(http: httpx.Client, service: str, body: bytes) -> tuple[int, str]:
    answer = http.post(f"/api/predict/{service}", content=body)
    assert answer.status_code == 200, answer.text
    return int(answer.text), answer.headers[REQUEST_ID]


def stream(
    http: httpx.Client, service: str, request_id: str, *, last_event_id: str = "", most: int | None = None
) -> list[ServerSentEvent]:
    """The events of a request's stream up to its done (or the first `most`), read with httpx-sse."""
    headers = {"Last-Event-ID": last_event_id} if last_event_id else {}
    params = {"requestId": request_id, "_stream_": "true"}
    seen: list[ServerSentEvent] = []
    with connect_sse(http, "GET", f"/api/predict/{service}/sink", params=params, headers=headers) as source:
        assert source.response.status_code == 200, source.response.read()
        for sse in source.iter_sse():
            seen.append(sse)
            if sse.event == "done" or (most is not None and len(seen) >= most):
                break
    return seen


def texts(events: list[ServerSentEvent]) -> list[str]:
    return [json.loads(e.data)["text"] for e in events if e.event == "chunk"]


def done(events: list[ServerSentEvent]) -> dict[str, Any]:
    assert events[-1].event == "done", [e.event for e in events]
    body: dict[str, Any] = json.loads(events[-1].data)
    return body


def result(http: httpx.Client, service: str, request_id: str) -> httpx.Response:
    return http.get(
        f"/api/predict/{service}/sink", params={"requestId": request_id, "_raw_": "true", "_timeout_": "20s"}
    )


def test_a_client_sees_every_token_in_order_with_progress_and_the_sink_has_them_joined(
    http: httpx.Client, worker: WorkerFactory, sync_redis: redis.Redis
) -> None:
    worker("llm")
    _, request_id = put(http, "llm", b"60 5")
    events = stream(http, "llm", request_id)
    assert texts(events) == [f"t{i} " for i in range(60)]
    fractions = [json.loads(e.data)["fraction"] for e in events if e.event == "progress"]
    assert fractions and fractions == sorted(fractions) and fractions[-1] == 1.0
    assert done(events) == {"statusCode": 200}
    ids = [e.id for e in events]
    assert all(ids) and len(set(ids)) == len(ids)
    answer = result(http, "llm", request_id)
    assert answer.content == "".join(f"t{i} " for i in range(60)).encode()
    assert "lastCode" not in answer.headers
    # Its stream expires a while after the end (queue.stream.ttl_seconds, 600 by default).
    ttl = sync_redis.pttl(keys.chunks("llm", request_id))
    assert 0 < ttl <= 600_000
    assert_counts_true(sync_redis, "llm")


def test_binary_chunks_come_as_base64_and_json_chunks_as_json(http: httpx.Client, worker: WorkerFactory) -> None:
    worker("streams")
    _, binary = put(http, "streams", b"bytes")
    chunks = [json.loads(e.data) for e in stream(http, "streams", binary) if e.event == "chunk"]
    assert [base64.b64decode(c["base64"]) for c in chunks] == [b"\x00\x01\xff", b"\xfe"]
    assert result(http, "streams", binary).content == b"\x00\x01\xff\xfe"
    _, lines = put(http, "streams", b"json")
    chunks = [json.loads(e.data) for e in stream(http, "streams", lines) if e.event == "chunk"]
    assert chunks == [{"json": {"token": "a"}}, {"json": [1, 2]}]
    assert result(http, "streams", lines).content == b'{"token":"a"}\n[1,2]\n'  # JSON chunks: JSON Lines


def test_last_event_id_resumes_exactly_after_it_mid_stream_and_after_done(
    http: httpx.Client, worker: WorkerFactory
) -> None:
    worker("llm")
    _, request_id = put(http, "llm", b"40 20")
    first = stream(http, "llm", request_id, most=9)  # the client's connection breaks after 9 events
    rest = stream(http, "llm", request_id, last_event_id=first[-1].id)
    everything = stream(http, "llm", request_id)  # after done: the whole stream replayed
    assert [(e.id, e.event, e.data) for e in first + rest] == [(e.id, e.event, e.data) for e in everything]
    assert texts(everything) == [f"t{i} " for i in range(40)]
    middle = everything[len(everything) // 2]
    assert [e.id for e in stream(http, "llm", request_id, last_event_id=middle.id)] == [
        e.id for e in everything[len(everything) // 2 + 1 :]
    ]
    # After its done, a reconnect gets 204: EventSource stops reconnecting.
    again = http.get(
        "/api/predict/llm/sink",
        params={"requestId": request_id, "_stream_": "true"},
        headers={"Last-Event-ID": everything[-1].id},
    )
    assert again.status_code == 204


def keepalives_then_events(http: httpx.Client, service: str, request_id: str, on_keepalive: Any) -> list[str]:
    """The raw lines of a stream opened before its request starts: `on_keepalive()` is called at the first
    keep-alive comment; returns once `done` came (or, when `on_keepalive` returns False, at once)."""
    lines: list[str] = []
    params = {"requestId": request_id, "_stream_": "true"}
    with http.stream("GET", f"/api/predict/{service}/sink", params=params) as answer:
        assert answer.status_code == 200 and answer.headers["content-type"].startswith("text/event-stream")
        for line in answer.iter_lines():
            lines.append(line)
            first_keepalive = line.startswith(":") and sum(1 for seen in lines if seen.startswith(":")) == 1
            if first_keepalive and on_keepalive() is False:
                return lines
            if line.startswith("event: done"):
                break
    return lines


def test_a_stream_opened_before_the_request_starts_sends_keepalives_and_resumes_before_it_starts(
    http: httpx.Client, worker: WorkerFactory
) -> None:
    _, request_id = put(http, "later", b"5 10")  # no worker serves `later` yet
    # Connected before it starts: keep-alive comments (no event, no id yet); the client leaves and comes back.
    first = keepalives_then_events(http, "later", request_id, lambda: False)
    assert first[-1].startswith(":") and not any(line.startswith("id:") for line in first)
    lines = keepalives_then_events(http, "later", request_id, lambda: worker("later"))
    data = [json.loads(line[len("data: ") :]) for line in lines if line.startswith("data: ")]
    assert [d["text"] for d in data if "text" in d] == [f"t{i} " for i in range(5)]
    assert texts(stream(http, "later", request_id)) == [f"t{i} " for i in range(5)]


def test_open_streams_count_against_the_open_wait_bounds(
    redis_url: str, standard_services: Path, tmp_path: Path, process_logs: list[ManagedProcess], worker: WorkerFactory
) -> None:
    env = {"QS_MAX_LONG_POLLS_PER_SERVICE": "2", "QS_STREAM_KEEPALIVE_SECONDS": str(KEEPALIVE)}
    process, url = start_api(redis_url, standard_services, env=env, log_dir=tmp_path / "limited")
    process_logs.append(process)
    with httpx.Client(base_url=url, timeout=30) as http:
        _, request_id = put(http, "later", b"1")
        params = {"requestId": request_id, "_stream_": "true"}
        with (
            http.stream("GET", "/api/predict/later/sink", params=params) as one,
            http.stream("GET", "/api/predict/later/sink", params=params) as two,
        ):
            assert one.status_code == two.status_code == 200
            third = http.get("/api/predict/later/sink", params=params)
            assert third.status_code == 429 and "QS_MAX_LONG_POLLS_PER_SERVICE" in third.json()["detail"]

        def slot_free() -> bool:  # closed streams give their slots back
            with http.stream("GET", "/api/predict/later/sink", params=params) as again:
                return again.status_code == 200

        wait_until(slot_free, 10, "a slot to be free again")
        # Answers that are no stream (204 after done) hold no slot either.
        worker("echo")
        _, finished = put(http, "echo", b"done soon")
        assert result(http, "echo", finished).status_code == 200
        after_done = {"Last-Event-ID": "done"}
        for _ in range(3):
            assert (
                http.get(
                    "/api/predict/echo/sink", params={**params, "requestId": finished}, headers=after_done
                ).status_code
                == 204
            )
        with (
            http.stream("GET", "/api/predict/later/sink", params=params) as one,
            http.stream("GET", "/api/predict/later/sink", params=params) as two,
        ):
            assert one.status_code == two.status_code == 200


def test_unknown_request_ids_get_404_saying_so(http: httpx.Client) -> None:
    answer = http.get("/api/predict/llm/sink", params={"requestId": "no-such-id", "_stream_": "true"})
    assert answer.status_code == 404 and "unknown" in answer.json()["detail"]
    assert http.get("/api/predict/llm", params={"requestId": "x", "_stream_": "true"}).status_code == 400


def test_a_request_that_streams_nothing_ends_with_its_result_as_one_chunk(
    http: httpx.Client, worker: WorkerFactory
) -> None:
    worker("echo")
    _, request_id = put(http, "echo", b"hello there")
    events = stream(http, "echo", request_id)
    assert [(e.event, e.id) for e in events] == [("chunk", "result"), ("done", "done")]
    assert texts(events) == ["hello there"] and done(events) == {"statusCode": 200}
    # Read with auto-delete, it has nothing left to replay: 404 that says why.
    http.get("/api/predict/echo/sink", params={"requestId": request_id, "_auto_delete_": "true"})
    gone = http.get("/api/predict/echo/sink", params={"requestId": request_id, "_stream_": "true"})
    assert gone.status_code == 404 and "already read" in gone.json()["detail"]


def test_progress_shows_in_status_search_and_the_stream(http: httpx.Client, worker: WorkerFactory) -> None:
    worker("streams")
    index, request_id = put(http, "streams", b"progress:40")

    def reported() -> dict[str, Any] | None:
        status = http.get("/api/predict/streams", params={"requestId": request_id, "_status_": "true"}).json()
        return status.get("progress") if status["state"] == "running" else None

    progress = wait_until(reported, 20, "progress in _status_")
    assert 0 < progress["fraction"] <= 1 and progress["message"].startswith("step ")
    search = http.get("/api/predict/streams", params={"_search_": "true", "_index_": str(index)}).json()
    assert search["IsPending"] is True and search["Progress"]["message"].startswith("step ")
    events = stream(http, "streams", request_id)
    reports = [json.loads(e.data) for e in events if e.event == "progress"]
    assert reports[-1]["fraction"] == 1.0 and reports[-1]["message"] == "step 40 of 40"
    assert texts(events) == ["reported"]  # no chunk streamed: its result is its one chunk, before done


def test_the_python_clients_status_has_the_progress_of_a_running_request(stack: Api, worker: WorkerFactory) -> None:
    from queue_service.client import Client

    worker("llm")
    with Client(stack.url, "llm") as client:
        submitted = client.put(b"40 50")
        running = wait_until(
            lambda: (found := client.status(submitted.request_id)).progress and found, 20, "progress in status()"
        )
        assert running.state == "running" and running.deliveries == 1
        assert 0 < running.progress["fraction"] <= 1 and running.progress["message"].endswith("/40")
        finished = client.result(submitted.request_id, wait=30)
        assert finished is not None and finished.ok
        assert client.status(submitted.request_id).progress is None  # ended: its state, not a report


def test_a_worker_killed_mid_stream_hands_the_request_over_and_the_client_sees_a_restart(
    http: httpx.Client, worker: WorkerFactory, sync_redis: redis.Redis
) -> None:
    workers = {process.name: process for process in (worker("handover"), worker("handover"))}
    _, request_id = put(http, "handover", b"60 100")
    before = stream(http, "handover", request_id, most=6)
    assert texts(before)

    def holder() -> str:
        for name, held in sync_redis.hgetall(keys.running("handover")).items():
            if request_id in held.decode():
                return str(name.decode())
        return ""

    running = wait_until(holder, 10, "the worker running it to say so")
    workers[running].kill()  # SIGKILL mid-stream: its lease lapses and the other worker runs the request again
    after = stream(http, "handover", request_id, last_event_id=before[-1].id)
    kinds = [e.event for e in after]
    assert "restart" in kinds, kinds
    restart = kinds.index("restart")
    assert json.loads(after[restart].data) == {"delivery": 2}
    # After the restart: the new delivery's chunks, all of them, from the start.
    assert texts(after[restart:]) == [f"t{i} " for i in range(60)]
    assert done(after) == {"statusCode": 200}
    assert result(http, "handover", request_id).content == "".join(f"t{i} " for i in range(60)).encode()
    # A client that connects now sees only the delivery that ran to the end.
    replay = stream(http, "handover", request_id)
    assert replay[0].event == "restart" and texts(replay) == [f"t{i} " for i in range(60)]
    assert_counts_true(sync_redis, "handover")


def test_a_request_cancelled_mid_stream_ends_its_stream_with_499_and_frees_the_worker(
    http: httpx.Client, worker: WorkerFactory, sync_redis: redis.Redis
) -> None:
    worker("handover")
    index, request_id = put(http, "handover", b"600 100")
    before = stream(http, "handover", request_id, most=3)
    assert http.delete("/api/predict/handover", params={"_indexes_": str(index)}).status_code == 200
    after = stream(http, "handover", request_id, last_event_id=before[-1].id)
    assert done(after)["statusCode"] == 499 and "cancelled" in done(after)["message"]
    started = time.monotonic()
    _, next_id = put(http, "handover", b"2 0")
    assert texts(stream(http, "handover", next_id)) == ["t0 ", "t1 "]
    assert time.monotonic() - started < 20
    assert_counts_true(sync_redis, "handover")


def test_past_the_cap_the_processor_is_told_and_the_stream_ends_with_413(
    http: httpx.Client, worker: WorkerFactory, tmp_path: Path, sync_redis: redis.Redis
) -> None:
    worker("streams")
    marks = tmp_path / "marks"
    _, request_id = put(http, "streams", f"fill:50:100:{marks}".encode())  # 5,000 bytes against a cap of 1,000
    events = stream(http, "streams", request_id)
    assert sum(len(t) for t in texts(events)) <= CAP
    ending = done(events)
    assert ending["statusCode"] == 413 and "queue.stream.max_bytes=1000" in ending["message"]
    assert marks.read_text() == "told: too large\n"
    answer = result(http, "streams", request_id)
    assert answer.headers["X-Eas-Queueservice-Last-Code"] == "413"
    entries = sync_redis.xrange(keys.chunks("streams", request_id))
    assert sum(len(fields.get(b"v", b"")) for _, fields in entries if fields[b"k"] == b"c") <= CAP


def test_a_slow_reader_does_not_slow_the_worker_and_the_api_memory_stays_bounded(
    http: httpx.Client, worker: WorkerFactory, stack: Api
) -> None:
    worker("llm")
    _, request_id = put(http, "llm", b"40000 0")  # ~40,000 chunks (+ progress), as fast as it can
    rss_before = _rss_mib(stack.process.pid)
    readers = []
    for _ in range(4):  # four clients that read nothing for now
        client = httpx.Client(base_url=stack.url, timeout=60)
        response = client.send(
            client.build_request("GET", "/api/predict/llm/sink", params={"requestId": request_id, "_stream_": "true"}),
            stream=True,
        )
        readers.append((client, response))
    started = time.monotonic()

    def finished() -> bool:
        status = http.get("/api/predict/llm", params={"requestId": request_id, "_status_": "true"}).json()
        return status["state"] == "succeeded"

    wait_until(finished, 60, "the request to finish while its readers stall")
    took = time.monotonic() - started
    rss_stalled = _rss_mib(stack.process.pid)
    counts = []
    for client, response in readers:  # now they read it all, slowly at first
        lines = response.iter_lines()
        count = 0
        for line in lines:
            if line.startswith('data: {"text"'):
                count += 1
            if line.startswith("event: done"):
                break
        counts.append(count)
        response.close()
        client.close()
    print(
        f"TIMING streaming: 40,000 chunks finished in {took:.2f}s with 4 stalled readers; "
        f"API RSS {rss_before:.0f} -> {rss_stalled:.0f} MiB"
    )
    assert counts == [40_000] * 4
    assert rss_stalled - rss_before < 100


def _rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


# --- the sync path -----------------------------------------------------------------------------------


def sync_events(http: httpx.Client, service: str, body: bytes) -> list[ServerSentEvent]:
    with connect_sse(http, "POST", f"/api/predict/{service}/sync", content=body) as source:
        assert source.response.status_code == 200, source.response.read()
        return list(source.iter_sse())


def test_a_sync_request_streams_the_same_events(http: httpx.Client, worker: WorkerFactory) -> None:
    worker("llm")
    worker("echo")
    events = sync_events(http, "llm", b"10 10")
    assert texts(events) == [f"t{i} " for i in range(10)] and done(events) == {"statusCode": 200}
    echoed = sync_events(http, "echo", b"plain result")
    assert texts(echoed) == ["plain result"] and done(echoed) == {"statusCode": 200}


def test_a_sync_stream_with_no_output_within_keepalive_gets_408_and_is_cancelled(
    http: httpx.Client, worker: WorkerFactory, stack: Api
) -> None:
    worker("streams")
    started = time.monotonic()
    answer = http.post("/api/predict/streams/sync", content=b"wait:30", headers={"Accept": "text/event-stream"})
    assert answer.status_code == 408 and "keepalive=1000ms" in answer.json()["detail"]
    assert time.monotonic() - started < 10
    # Cancelled: the worker is free for the next request long before the 30 s one would have ended.
    events = sync_events(http, "streams", b"json")
    assert done(events) == {"statusCode": 200} and time.monotonic() - started < 20


def test_a_sync_client_that_leaves_mid_stream_cancels_its_request(
    http: httpx.Client, worker: WorkerFactory, stack: Api
) -> None:
    running = worker("handover")
    with connect_sse(http, "POST", "/api/predict/handover/sync", content=b"600 100") as source:
        request_id = source.response.headers[REQUEST_ID]
        for sse in source.iter_sse():
            if sse.event == "chunk" and json.loads(sse.data)["text"] == "t2 ":
                break  # the client leaves
    wait_until(lambda: '"status": 499' in stack.process.log_text(), 20, "the API to log 499")
    line = next(line for line in stack.process.log_text().splitlines() if request_id in line and '"status"' in line)
    assert '"status": 499' in line and '"operation": "sync"' in line

    # The worker stopped the processor (600 chunks 100 ms apart would take a minute) and logged it cancelled.
    wait_until(
        lambda: f"request_id={request_id} status=499" in running.log_text(), 20, "the worker to stop the processor"
    )
    assert "(cancelled)" in running.log_text()


# --- the CLI, and an upstream that streams -------------------------------------------------------------


def test_put_wait_stream_prints_chunks_as_they_come_and_progress_on_the_terminal(
    stack: Api, worker: WorkerFactory
) -> None:
    from tests.integration.test_client_cli import Terminal

    worker("llm")
    terminal = Terminal()
    with terminal.spawn("put", "-s", "llm", "--wait", "--stream", "--url", stack.url) as process:
        assert process.stdin is not None and process.stdout is not None
        process.stdin.write(b"20 100")
        process.stdin.close()
        first = process.stdout.read(3)  # the first chunk, long before the last one (2 s later)
        terminal.wait_for(r"running, \d+% \(\d+/20\)")
        rest = process.stdout.read()
        process.wait(timeout=60)
    terminal.close()
    assert process.returncode == 0, terminal.text()
    assert first == b"t0 " and first + rest == "".join(f"t{i} " for i in range(20)).encode() + b"\n"
    assert "done in" in terminal.text()


def test_put_wait_without_stream_shows_the_progress_the_processor_reports(stack: Api, worker: WorkerFactory) -> None:
    from tests.integration.test_client_cli import Terminal

    worker("llm")
    terminal = Terminal()
    with terminal.spawn("put", "-s", "llm", "--wait", "--url", stack.url) as process:
        assert process.stdin is not None and process.stdout is not None
        process.stdin.write(b"20 150")  # 3 s: the progress line polls `_status_` every 0.5 s
        process.stdin.close()
        terminal.wait_for(r"running, \d+% \(\d+/20\)")
        out = process.stdout.read()
        process.wait(timeout=60)
    terminal.close()
    assert process.returncode == 0, terminal.text()
    assert out == "".join(f"t{i} " for i in range(20)).encode() + b"\n" and "done in" in terminal.text()


def test_an_upstream_answering_sse_or_chunked_is_passed_through_chunk_by_chunk(
    services_file: ServicesFileFactory, tmp_path: Path, process_logs: list[ManagedProcess], redis_url: str
) -> None:
    from queue_service.embedded_redis import free_port
    from queue_service.testing import start_worker
    from tests.integration.test_upstream import start_upstream

    port = free_port()
    process_logs.append(start_upstream(tmp_path, port))
    root = f"http://127.0.0.1:{port}"
    path = services_file(
        [
            {"name": "vllm", "upstream": {"url": f"{root}/sse/5/100"}},
            {"name": "chunked", "upstream": {"url": f"{root}/chunked/5/100"}},
        ]
    )
    api, url = start_api(redis_url, path, log_dir=tmp_path / "logs")
    process_logs.append(api)
    process_logs.append(start_worker(redis_url, path, log_dir=tmp_path / "logs"))
    with httpx.Client(base_url=url, timeout=30) as http:
        wait_until(lambda: http.get("/readyz").status_code == 200, 30, "the upstream workers to be live")
        _, request_id = put(http, "vllm", b'{"stream": true}')
        started = time.monotonic()
        arrivals: list[float] = []
        events = []
        with connect_sse(
            http, "GET", "/api/predict/vllm/sink", params={"requestId": request_id, "_stream_": "true"}
        ) as s:
            for sse in s.iter_sse():
                events.append(sse)
                arrivals.append(time.monotonic() - started)
                if sse.event == "done":
                    break
        chunks = [json.loads(e.data) for e in events if e.event == "chunk"]
        assert [c["json"]["choices"][0]["delta"]["content"] for c in chunks[:-1]] == [f"t{i} " for i in range(5)]
        assert chunks[-1] == {"text": "[DONE]"} and done(events) == {"statusCode": 200}
        assert arrivals[-1] - arrivals[0] > 0.3  # they came as the upstream sent them (100 ms apart), not at once
        lines = result(http, "vllm", request_id).content.split(b"\n")
        assert len(lines) == 6 and lines[-1] == b"[DONE]" and json.loads(lines[0])["choices"]
        _, request_id = put(http, "chunked", b"")
        events = stream(http, "chunked", request_id)
        assert "".join(texts(events)) == "t0 t1 t2 t3 t4 " and len(texts(events)) > 1
        assert result(http, "chunked", request_id).content == b"t0 t1 t2 t3 t4 "
