"""The webhook pieces that need no stack: addresses refused, backoff, what follows an attempt, the payload."""

from __future__ import annotations

import base64
import ipaddress
import json

import pytest

from queue_service.config import WebhookSettings
from queue_service.store.model import Delivery
from queue_service.webhooks.addresses import why_refused
from queue_service.webhooks.dispatcher import MAX_DELAY_SECONDS, backoff_seconds, plan_after
from queue_service.webhooks.payload import render
from queue_service.webhooks.sender import Answer

SECRET = "whsec_" + base64.b64encode(b"x" * 32).decode()


@pytest.mark.parametrize(
    ("address", "refused"),
    [
        ("127.0.0.1", "loopback"),
        ("10.0.0.5", "private"),
        ("192.168.1.1", "private"),
        ("172.16.0.1", "private"),
        ("169.254.169.254", "metadata"),
        ("100.100.100.200", "metadata"),
        ("::ffff:127.0.0.1", "loopback"),
        ("fd00:ec2::254", "metadata"),
        ("0.0.0.0", "unspecified"),
        ("100.64.0.1", "not a public address"),
        ("93.184.216.34", None),
    ],
)
def test_addresses_a_webhook_may_not_go_to(address: str, refused: str | None) -> None:
    reason = why_refused(ipaddress.ip_address(address))
    assert (reason is None) if refused is None else (reason is not None and refused in reason)


def test_backoff_doubles_with_jitter_and_is_bounded() -> None:
    assert [backoff_seconds(n, 30, rng=lambda: 0.5) for n in (1, 2, 3)] == [30, 60, 120]
    assert backoff_seconds(1, 30, rng=lambda: 0.0) == 15 and backoff_seconds(1, 30, rng=lambda: 1.0) == 45
    assert backoff_seconds(30, 30, rng=lambda: 1.0) == MAX_DELAY_SECONDS
    # Eight attempts: seven waits, about an hour with the defaults.
    assert 3000 < sum(backoff_seconds(n, 30, rng=lambda: 0.5) for n in range(1, 8)) < 4500


def test_what_follows_an_attempt() -> None:
    settings = WebhookSettings(secret=SECRET, max_attempts=3)
    assert plan_after(Answer(204), 1, settings, 0).outcome == "delivered"
    assert plan_after(Answer(410), 1, settings, 0).outcome == "gone"
    assert plan_after(Answer(500), 3, settings, 0).outcome == "dead"
    retry = plan_after(Answer(503, retry_after=600), 1, settings, 1000)
    assert retry.outcome == "retry" and retry.next_ms >= 1000 + 600_000  # Retry-After is honoured


def delivery(**fields: bytes) -> Delivery:
    base = {"event": b"completed", "rid": b"r-1", "ts": b"1700000000000", "code": b"200", "index": b"3"}
    return Delivery("echo", "1-0", "msg_r-1_1-0", 1, base | fields)


def test_a_binary_result_is_base64_and_a_large_one_a_link() -> None:
    binary = json.loads(render(delivery(data=b"\xff\x00", size=b"2")))["data"]
    linked = json.loads(render(delivery(size=b"999999"), public_url="https://qs.example"))["data"]

    assert binary["resultBase64"] == base64.b64encode(b"\xff\x00").decode() and "result" not in binary
    assert linked["resultUrl"] == "https://qs.example/api/predict/echo/sink?requestId=r-1&_raw_=true"


def test_an_expired_request_says_so() -> None:
    data = json.loads(render(delivery(code=b"408", end=b"expired")))["data"]
    assert (data["state"], data["lastCode"]) == ("expired", "408")


def test_a_dispatcher_sends_one_requests_deliveries_in_order_and_others_alongside(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import asyncio
    from typing import Any

    from queue_service.config import parse_services
    from queue_service.store.scripts import DeliveryBatch
    from queue_service.webhooks import dispatcher as dispatching

    def one(entry: str, rid: str, event: str) -> Delivery:
        fields = {"event": event.encode(), "rid": rid.encode(), "url": b"https://receiver.example/h", "ts": b"1"}
        return Delivery("svc", entry, f"msg_{entry}", 1, fields)

    batches = [[one("1-0", "a", "progress"), one("2-0", "b", "progress"), one("3-0", "a", "completed")]]
    sent: list[tuple[str, str]] = []
    recorded: list[str] = []

    class Store:
        async def take(self, service: str, **_: Any) -> DeliveryBatch:
            return DeliveryBatch(batches.pop(0) if batches else [], "3-0", None)

        async def done(self, delivery: Delivery, **_: Any) -> bool:
            recorded.append(delivery.entry_id)
            return True

        async def wait_for_new(self, service: str, after: str, seconds: float) -> None:
            await asyncio.sleep(0.01)

        async def maintain(self, *_: Any) -> None:
            return None

    async def post(client: Any, url: str, body: bytes, headers: dict[str, str], **_: Any) -> Answer:
        event = json.loads(body)["type"]
        rid = json.loads(body)["data"]["requestId"]
        if event == "request.progress" and rid == "a":
            await asyncio.sleep(0.2)  # the slow first attempt: its request's next one waits for it
        sent.append((rid, event))
        return Answer(status=200)

    monkeypatch.setattr(dispatching.sender, "post", post)
    services = parse_services(
        {"services": [{"name": "svc", "processor": "workers.examples:Echo", "webhook": {"secret": SECRET}}]}
    )

    async def run() -> None:
        dispatcher = dispatching.Dispatcher(Store(), services)  # type: ignore[arg-type]
        task = asyncio.create_task(dispatcher.run())
        while len(recorded) < 3:
            await asyncio.sleep(0.01)
        dispatcher.stop()
        await asyncio.wait_for(task, 5)

    asyncio.run(run())
    assert sent == [("b", "request.progress"), ("a", "request.progress"), ("a", "request.completed")]
