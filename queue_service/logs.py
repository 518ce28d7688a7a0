"""Log set-up for the API process: one JSON line per request on stderr, plain lines otherwise."""

from __future__ import annotations

import logging
import sys


def configure_logging(level: int = logging.INFO) -> None:
    """Attach stderr handlers once; a host application that configured logging keeps its own."""
    # The access log's messages are JSON already: print them bare, and not again via the parent.
    _attach(logging.getLogger("queue_service.access"), "%(message)s", level, propagate=False)
    _attach(logging.getLogger("queue_service"), "%(asctime)s %(levelname)s %(name)s: %(message)s", level)


def _attach(logger: logging.Logger, fmt: str, level: int, propagate: bool = True) -> None:
    if logger.handlers:
        return
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(fmt))
    logger.addHandler(handler)
    logger.setLevel(level)
    logger.propagate = propagate
