"""Issue 9, items 3 and 4: consumer group and consumer names are checked, and the workers' own are reserved.

A group name is `[A-Za-z0-9][A-Za-z0-9_.:@-]{0,63}`; any group or consumer name starting with
`qs-` belongs to the service (the workers' group is `qs-workers`), and `_search_` does not show
which worker holds an item.
"""

from __future__ import annotations

import base64
import json

import pytest

from tests.hostile.conftest import SharedStack
from tests.hostile.watching import GID_HEADER, UID_HEADER, observe_watch, ws_url
from tests.integration.conftest import REQUEST_ID, ApiFactory, WorkerFactory
from tests.support.waiting import wait_until

pytestmark = pytest.mark.integration

MALFORMED_GROUPS = {"300-chars": "g" * 300, "space": "my group", "slash": "a/b"}
SINK = "/api/predict/echo/sink"


@pytest.mark.parametrize("group", MALFORMED_GROUPS.values(), ids=MALFORMED_GROUPS.keys())
def test_a_watch_in_a_malformed_group_is_closed_with_1008_naming_the_header(
    shared_stack: SharedStack, group: str
) -> None:
    outcome = observe_watch(ws_url(shared_stack.api.url, SINK, _watch_="true"), {GID_HEADER: group})
    assert outcome.closed_for_policy(GID_HEADER), f"a watch with group {group[:40]!r}: {outcome}"


@pytest.mark.parametrize("group", MALFORMED_GROUPS.values(), ids=MALFORMED_GROUPS.keys())
@pytest.mark.parametrize(
    ("method", "params"),
    [("PUT", {"_indexes_": "1"}), ("GET", {"_search_": "true", "_index_": "1"})],
    ids=["commit", "search"],
)
def test_commit_and_search_in_a_malformed_group_get_400(
    shared_stack: SharedStack, group: str, method: str, params: dict[str, str]
) -> None:
    with shared_stack.api.client() as http:
        answer = http.request(method, SINK, params=params, headers={GID_HEADER: group})
    assert answer.status_code == 400, f"group {group[:40]!r}: {answer.status_code} {answer.text!r}"
    assert answer.json()["detail"]


def test_a_watch_in_the_workers_group_is_refused_and_a_worker_runs_the_item(
    api: ApiFactory, worker: WorkerFactory
) -> None:
    service = api()
    with service.client() as http:
        put = http.post("/api/predict/sleep", content=b"0.5")
        assert put.status_code == 200, put.text
        request_id = put.headers[REQUEST_ID]
        # Auto-commit: had the watch taken the item, the commit would delete the input with no result.
        url = ws_url(service.url, "/api/predict/sleep", _watch_="true", _auto_commit_="true")
        outcome = observe_watch(url, {GID_HEADER: "qs-workers", UID_HEADER: "thief"})
        worker("sleep")
        got = http.get("/api/predict/sleep/sink", params={"requestId": request_id, "_timeout_": "15s"}, timeout=30)

    problems = []
    if not (outcome.close_code == 1008 and outcome.close_reason):
        problems.append(f"a watch of the input queue in the group qs-workers was {outcome}, not closed with 1008")
    if got.status_code != 200:
        problems.append(f"no result for the item once a worker ran: {got.status_code} {got.text!r}")
    else:
        [item] = got.json()
        if "lastCode" in item["tags"] or json.loads(base64.b64decode(item["data"])) != {"slept": 0.5}:
            problems.append(f"the item was not processed normally: {item}")
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize(
    "headers",
    [{GID_HEADER: "qs-anything"}, {UID_HEADER: "qs-test-worker-1"}, {GID_HEADER: "eas", UID_HEADER: "qs-workers"}],
    ids=["group-qs-anything", "consumer-qs-test-worker", "consumer-qs-workers"],
)
def test_a_watch_with_a_reserved_qs_name_is_refused(shared_stack: SharedStack, headers: dict[str, str]) -> None:
    outcome = observe_watch(ws_url(shared_stack.api.url, "/api/predict/idle", _watch_="true"), headers)
    assert outcome.close_code == 1008 and outcome.close_reason, f"a watch with {headers}: {outcome}"


def test_search_does_not_show_which_worker_runs_an_item(api: ApiFactory, worker: WorkerFactory) -> None:
    service = api()
    running = worker("sleep")
    with service.client() as http:
        put = http.post("/api/predict/sleep", content=b"3")
        assert put.status_code == 200, put.text
        wait_until(
            lambda: http.get("/api/predict/sleep", params={"_attrs_": "true"}).json()["stream.inFlight"] == "1",
            10,
            "the worker took the item",
        )
        found = http.get("/api/predict/sleep", params={"_search_": "true", "_index_": put.text})
    assert found.status_code == 200, found.text
    position = found.json()
    assert position["IsPending"] is True, position
    assert position["ConsumerId"] == "", f"search shows the worker's name {running.name!r}: {position}"
