"""Go-style durations from ``_timeout_``: what clients send parses, anything else is named in the error."""

from __future__ import annotations

import pytest

from queue_service.durations import parse_duration


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("5s", 5.0),
        ("0s", 0.0),
        ("0", 0.0),
        ("500ms", 0.5),
        ("1m30s", 90.0),
        ("1.5h", 5400.0),
        ("2us", 2e-6),
        ("2\u00b5s", 2e-6),
        ("3ns", 3e-9),
        ("1h2m3s4ms", 3723.004),
        (".5s", 0.5),
        ("5", 5.0),
        ("2.5", 2.5),
        (" 5s ", 5.0),
    ],
)
def test_client_timeouts_parse_to_seconds(text: str, seconds: float) -> None:
    assert parse_duration(text) == pytest.approx(seconds)


@pytest.mark.parametrize(
    "text", ["", " ", "-5s", "-1", "5x", "s", "5 s", "1.2.3s", "5sm", "inf", "nan", "1e3", "\u0665s"]
)
def test_anything_else_is_refused_naming_the_value(text: str) -> None:
    with pytest.raises(ValueError, match="invalid duration") as excinfo:
        parse_duration(text)

    assert repr(text) in str(excinfo.value)
