"""Issue 9, item 1: a long poll its client abandoned must never take (and delete) the result."""

from __future__ import annotations

import base64
import json
import time

import httpx
import pytest

from tests.integration.conftest import REQUEST_ID, ApiFactory, WorkerFactory
from tests.support.waiting import wait_until

pytestmark = pytest.mark.integration

SINK = "/api/predict/sleep/sink"
# What an abandoned poll does with a result, it does at once when the result arrives: give it this long.
ABANDONED_POLL_GRACE_SECONDS = 1.5


def test_an_abandoned_auto_deleting_long_poll_never_deletes_the_result(api: ApiFactory, worker: WorkerFactory) -> None:
    service = api()
    worker("sleep")
    with service.client() as http:
        put = http.post("/api/predict/sleep", content=b"2")
        assert put.status_code == 200, put.text
        request_id = put.headers[REQUEST_ID]

        # The official client's get: auto-delete, a long poll longer than its own HTTP timeout.
        with service.client(timeout=1) as impatient, pytest.raises(httpx.TimeoutException):
            impatient.get(SINK, params={"requestId": request_id, "_auto_delete_": "true", "_timeout_": "30s"})

        def sleep_finished() -> bool:
            # A worker writes the result, then commits the input item: an empty input queue means done.
            return http.get("/api/predict/sleep", params={"_attrs_": "true"}).json()["stream.length"] == "0"

        wait_until(sleep_finished, 20, "the 2 s sleep finished")
        time.sleep(ABANDONED_POLL_GRACE_SECONDS)
        retry = http.get(SINK, params={"requestId": request_id, "_auto_delete_": "true"})

    assert retry.status_code == 200, (
        f"the result of {request_id} is gone after the client gave up its long poll: {retry.status_code} {retry.text!r}"
    )
    [item] = retry.json()
    assert json.loads(base64.b64decode(item["data"])) == {"slept": 2.0}
    assert item["tags"]["requestId"] == request_id
