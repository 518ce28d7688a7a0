"""Go-style durations ("5s", "1m30s", "500ms") as the official clients send them in ``_timeout_``."""

from __future__ import annotations

import re

# Seconds per unit; Go accepts both the micro sign and the Greek mu for microseconds.
_UNITS = {
    "ns": 1e-9,
    "us": 1e-6,
    "\u00b5s": 1e-6,
    "\u03bcs": 1e-6,
    "ms": 1e-3,
    "s": 1.0,
    "m": 60.0,
    "h": 3600.0,
}
_NUMBER = r"(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)"  # ASCII only: \d would accept other scripts' digits
_BARE_NUMBER = re.compile(_NUMBER)
_COMPONENT = re.compile(rf"({_NUMBER})(ns|us|\u00b5s|\u03bcs|ms|s|m|h)")
_DURATION = re.compile(rf"(?:{_COMPONENT.pattern})+")


def parse_duration(text: str) -> float:
    """Seconds in ``text``: a Go duration ("1m30s", "0s") or a bare number of seconds ("5", "2.5")."""
    value = text.strip()
    # The Python client sends str(timeout), so a number given as a timeout arrives bare.
    if _BARE_NUMBER.fullmatch(value):
        return float(value)
    if not _DURATION.fullmatch(value):
        raise ValueError(f"invalid duration {text!r}: expected seconds or a Go duration like '5s', '500ms', '1m30s'")
    return sum(float(number) * _UNITS[unit] for number, unit in _COMPONENT.findall(value))
