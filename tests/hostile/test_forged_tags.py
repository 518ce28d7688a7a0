"""Issue 9, item 8: a put cannot set the tags the service writes itself (`lastCode`, `requestId`)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.hostile.conftest import SharedStack
from tests.integration.conftest import REQUEST_ID

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def echo_served(shared_stack: SharedStack) -> Iterator[SharedStack]:
    shared_stack.start_worker("echo")
    yield shared_stack


@pytest.mark.parametrize(("tag", "forged"), [("lastCode", "500"), ("requestId", "forged-id")])
def test_a_put_that_sets_a_reserved_tag_is_refused(echo_served: SharedStack, tag: str, forged: str) -> None:
    with echo_served.api.client() as http:
        put = http.post("/api/predict/echo", params={tag: forged}, content=b"fine")
        seen = ""
        if put.status_code == 200:  # what the forgery did: the tags of the result
            got = http.get(
                "/api/predict/echo/sink",
                params={"requestId": put.headers[REQUEST_ID], "_timeout_": "10s", "_auto_delete_": "true"},
            )
            seen = f"; the result's tags: {got.json()[0]['tags'] if got.status_code == 200 else got.status_code}"
    assert put.status_code == 400, f"a put with {tag}={forged} answered {put.status_code} {put.text!r}{seen}"
    detail = put.json()["detail"]
    assert tag in detail and "reserved" in detail.lower(), detail
