"""Issue 9, item 9: no answer redirects to a host the client named in its Host header."""

from __future__ import annotations

import pytest

from tests.integration.conftest import ApiFactory

pytestmark = pytest.mark.integration


def test_a_trailing_slash_never_redirects_to_the_host_header(api: ApiFactory) -> None:
    service = api()
    with service.client(follow_redirects=False) as http:
        answer = http.get("/api/predict/echo/sink/", headers={"Host": "evil.example"})
    location = answer.headers.get("location", "")
    assert not 300 <= answer.status_code < 400, f"{answer.status_code} to {location!r}"
    assert "evil.example" not in location, location
