"""What a processor declares (async, thread-safe, batches, health) and how a batch's results become one
Outcome per item; the services file's keys for batching, concurrency and upstreams."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from queue_service.config import ConfigError, parse_services
from queue_service.store.model import Outcome
from workers.context import RequestContext
from workers.plan import plan_service
from workers.processor import (
    LoadedProcessor,
    ProcessorLoadError,
    ProcessorResultError,
    batch_outcomes,
    check_batching,
)


def service(**settings: Any) -> Any:
    return parse_services({"services": [{"name": "svc", **settings}]}).services[0]


def refusal(**settings: Any) -> str:
    with pytest.raises(ConfigError) as caught:
        service(**settings)
    return str(caught.value)


def test_each_item_of_a_batch_keeps_its_own_result_and_failure() -> None:
    outcomes = batch_outcomes([b"a", ValueError("bad item"), (b"no", 422), {"ok": 1}, object()], 5)

    assert outcomes[0] == Outcome(b"a")
    assert (outcomes[1].status, outcomes[1].message) == (400, "ValueError: bad item")
    assert (outcomes[2].body, outcomes[2].status) == (b"no", 422)
    assert outcomes[3].body == b'{"ok":1}'
    assert outcomes[4].status == 400 and "expected bytes" in outcomes[4].message  # a bad result: that item only


def test_a_batch_answer_of_the_wrong_length_is_a_bug_of_the_whole_call() -> None:
    with pytest.raises(ProcessorResultError, match="returned 2 results for a batch of 3"):
        batch_outcomes([b"a", b"b"], 3)


def test_what_a_processor_declares_is_read_once_at_load() -> None:
    class Async:
        async def process(self, data: bytes) -> bytes:
            return data

    class Threaded:
        thread_safe = True

        def process(self, data: bytes) -> bytes:
            return data

    class Truthy:
        thread_safe = "yes"  # only True counts: a stray attribute must not change how the code runs

        def process(self, data: bytes) -> bytes:
            return data

    assert LoadedProcessor(Async(), "m:Async").is_async
    assert LoadedProcessor(Threaded(), "m:Threaded").concurrent
    assert not LoadedProcessor(Truthy(), "m:Truthy").concurrent
    assert asyncio.run(LoadedProcessor(Async(), "m:Async").process_async(b"hi")).body == b"hi"


def test_batches_go_to_process_batch_or_to_a_process_that_accepts_the_list() -> None:
    class WithBatch:
        def process(self, data: bytes) -> bytes:
            return data

        def process_batch(self, data: list[bytes], contexts: list[RequestContext]) -> list[str]:
            return [f"{c.request_id}:{d.decode()}" for d, c in zip(data, contexts, strict=True)]

    class Lists:
        accepts_batches = True

        def process(self, data: list[bytes]) -> list[str]:
            return [str(len(data))] * len(data)

    contexts = [RequestContext("r1", "svc", 1), RequestContext("r2", "svc", 2)]
    assert [o.body for o in LoadedProcessor(WithBatch(), "m:W").process_batch([b"a", b"b"], contexts)] == [
        b"r1:a",
        b"r2:b",
    ]
    assert [o.body for o in LoadedProcessor(Lists(), "m:L").process_batch([b"a", b"b"], contexts)] == [b"2", b"2"]


def test_batching_for_a_processor_that_takes_no_batches_is_refused_naming_the_key() -> None:
    with pytest.raises(
        ProcessorLoadError, match=r"metadata\.rpc\.batching is on, but processor 'workers\.examples:Echo'"
    ):
        plan_service(service(processor="workers.examples:Echo", metadata={"rpc": {"batching": True}}))
    check_batching(plan_service(service(processor="workers.examples:BatchSim")).processor)


def test_a_processor_with_only_process_batch_needs_batching_on() -> None:
    class OnlyBatches:
        def process_batch(self, data: list[bytes]) -> list[bytes]:
            return data

    processor = LoadedProcessor(OnlyBatches(), "m:OnlyBatches")
    assert processor.batch_only and processor.can_batch


def test_how_each_kind_of_service_runs_in_a_worker() -> None:
    one = plan_service(service(processor="workers.examples:Echo", metadata={"rpc": {"worker_threads": 7}}))
    batch = plan_service(
        service(processor="workers.examples:BatchSim", metadata={"rpc": {"batching": True, "max_batch_size": 16}})
    )
    upstream = plan_service(service(upstream={"url": "http://127.0.0.1:9"}, metadata={"rpc": {"worker_threads": 8}}))
    by_hand = plan_service(service(upstream={"url": "http://127.0.0.1:9"}), worker_threads=3)

    assert (one.mode, one.capacity, one.want) == ("one", 1, 1)
    assert (batch.mode, batch.capacity, batch.want) == ("batch", 1, 16)
    assert (upstream.mode, upstream.capacity, upstream.want) == ("concurrent", 8, 8)
    assert by_hand.capacity == 3  # QS_WORKER_THREADS


def test_the_batching_keys_are_the_platforms_with_their_bounds() -> None:
    rpc = service(processor="m:P", metadata={"rpc": {"batching": True, "max_batch_size": 32}}).rpc
    assert (rpc.batching, rpc.max_batch_size, rpc.max_batch_timeout) == (True, 32, 20)
    assert "services.0.metadata.rpc.max_batch_size: " in refusal(
        processor="m:P", metadata={"rpc": {"max_batch_size": 0}}
    )
    assert "services.0.metadata.rpc.max_batch_timeout: " in refusal(
        processor="m:P", metadata={"rpc": {"max_batch_timeout": -1}}
    )


def test_an_upstream_service_is_checked_at_start_up() -> None:
    upstream = service(upstream={"url": "http://127.0.0.1:8080/", "health": "/ping", "timeout": 30}).upstream
    assert upstream is not None and (upstream.url, upstream.health, upstream.timeout) == (
        "http://127.0.0.1:8080",
        "/ping",
        30,
    )
    assert "services.0.upstream.url: " in refusal(upstream={"url": "127.0.0.1:8080"})
    assert "services.0.upstream.health: " in refusal(upstream={"url": "http://h", "health": "health"})
    assert "services.0.upstream.retries: " in refusal(upstream={"url": "http://h", "retries": -1})
    assert "not both" in refusal(processor="m:P", upstream={"url": "http://h"})
    assert "batching" in refusal(upstream={"url": "http://h"}, metadata={"rpc": {"batching": True}})
