"""Issue 9, items 7 and 11: malformed indexes and lengths are 400 (or a refused watch), never 500.

An index is a whole number in ASCII digits up to 2^63-1; above that it names no item and is
refused with 400 naming the parameter. A valid index with nothing there answers as any empty
index does.
"""

from __future__ import annotations

import pytest

from tests.hostile.conftest import SharedStack
from tests.hostile.watching import observe_watch, ws_url

pytestmark = pytest.mark.integration

MAX_INDEX = 2**63 - 1
# Valid, with nothing there. 1e14 is what Lua prints for 100000000000000 as a number.
VALID_INDEXES = {"1e14": "100000000000000", "max": str(MAX_INDEX)}
OVER_INDEXES = {"2^63": str(MAX_INDEX + 1), "2^64": str(2**64)}
QUEUES = {"input": "/api/predict/echo", "sink": "/api/predict/echo/sink"}

# Each operation: HTTP method, the parameter that carries the index, other parameters, and the
# answer to a valid index with nothing there.
OPERATIONS = {
    "get": ("GET", "_index_", {}, 204),
    "search": ("GET", "_index_", {"_search_": "true"}, 404),
    "truncate": ("DELETE", "_index_", {"_trunc_": "true"}, 200),
    "delete": ("DELETE", "_indexes_", {}, 200),
    "commit": ("PUT", "_indexes_", {}, 200),
}


@pytest.mark.parametrize("queue", QUEUES.values(), ids=QUEUES.keys())
@pytest.mark.parametrize("operation", OPERATIONS)
@pytest.mark.parametrize("index", VALID_INDEXES.values(), ids=VALID_INDEXES.keys())
def test_a_huge_valid_index_answers_as_an_empty_one(
    shared_stack: SharedStack, queue: str, operation: str, index: str
) -> None:
    method, name, extra, expected = OPERATIONS[operation]
    with shared_stack.api.client() as http:
        answer = http.request(method, queue, params={name: index, **extra})
    assert answer.status_code == expected, f"{method} {name}={index}: {answer.status_code} {answer.text!r}"
    if expected == 200:
        assert answer.text == "OK"


@pytest.mark.parametrize("queue", QUEUES.values(), ids=QUEUES.keys())
@pytest.mark.parametrize("operation", OPERATIONS)
@pytest.mark.parametrize("index", OVER_INDEXES.values(), ids=OVER_INDEXES.keys())
def test_an_index_over_the_maximum_is_400_naming_the_parameter(
    shared_stack: SharedStack, queue: str, operation: str, index: str
) -> None:
    method, name, extra, _ = OPERATIONS[operation]
    with shared_stack.api.client() as http:
        answer = http.request(method, queue, params={name: index, **extra})
    assert answer.status_code == 400, f"{method} {name}={index}: {answer.status_code} {answer.text!r}"
    assert name in answer.json()["detail"], answer.text


@pytest.mark.parametrize("index", ["abc", str(2**64)], ids=["abc", "2^64"])
def test_a_watch_with_a_bad_index_is_closed_with_1008_naming_it(shared_stack: SharedStack, index: str) -> None:
    url = ws_url(shared_stack.api.url, "/api/predict/echo/sink", _watch_="true", _index_=index)
    outcome = observe_watch(url)
    assert outcome.closed_for_policy("_index_"), f"a watch with _index_={index}: {outcome}"


@pytest.mark.parametrize(
    "params",
    # Arabic-Indic digits: int() takes them, an index must not.
    [{"_raw_": "true", "_length_": "abc"}, {"_index_": "\u0661\u0662"}, {"_length_": "\u0661"}],
    ids=["raw-length-abc", "arabic-indic-index", "arabic-indic-length"],
)
def test_a_malformed_length_or_a_non_ascii_number_is_400(shared_stack: SharedStack, params: dict[str, str]) -> None:
    with shared_stack.api.client() as http:
        answer = http.get("/api/predict/echo/sink", params=params)
    assert answer.status_code == 400, f"{params}: {answer.status_code} {answer.text!r}"
    assert answer.json()["detail"], answer.text
