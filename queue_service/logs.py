"""Log set-up for the API process: one JSON line per request on stderr, plain lines otherwise."""

from __future__ import annotations

import logging
import sys


def configure_logging(level: int = logging.INFO) -> None:
    """Attach stderr handlers once; a host application that configured logging keeps its own."""
    access = logging.getLogger("queue_service.access")
    if not access.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(message)s"))
        access.addHandler(handler)
        access.setLevel(level)
        access.propagate = False
    root = logging.getLogger("queue_service")
    if not root.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        root.addHandler(handler)
        root.setLevel(level)
