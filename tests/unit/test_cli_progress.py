"""The CLI's progress line shows what a processor reported while its request runs."""

from __future__ import annotations

from queue_service.client_cli import describe


def test_the_progress_line_shows_the_processors_last_report() -> None:
    running = {"state": "running", "deliveries": 1, "progress": {"fraction": 0.4, "message": "step 4 of 10"}}
    assert describe(running) == "running, 40% (step 4 of 10)"
    assert describe({**running, "progress": {"fraction": 1.0, "message": ""}}) == "running, 100%"
    assert describe({"state": "running", "deliveries": 2}) == "running (delivery 2)"
