"""rq's settings module from $QS_REDIS_URL: `rq worker -c workers.rq_settings` / `rq info -c workers.rq_settings`.

rq's own `--url` reads only `redis://`, `rediss://` and `unix://`, and rq's CLI talks to Redis before our worker
class replaces its connection (it asks whether workers are suspended). With this module rq's CLI reaches the
same Redis as the worker for every URL kind we read: a Sentinel URL becomes rq's `SENTINEL` setting, any other
URL its `REDIS_URL`. The URL stays in the environment, so its password never shows on a command line.
A cluster URL is refused: rq's registration runs a MULTI across slots (rq issue 1942); see docs/scaling.md.
"""

from __future__ import annotations

import os
from typing import Any

from queue_service.store.connection import COMMAND_TIMEOUT_SECONDS, SENTINEL_TIMEOUT_SECONDS, parse_url, redacted


def _settings(url: str) -> dict[str, Any]:
    target = parse_url(url)
    if target.kind == "server":
        return {"REDIS_URL": url}
    if target.kind == "cluster":
        raise RuntimeError(
            f"QS_REDIS_URL={redacted(url)}: rq workers cannot run on a Redis Cluster yet (rq's registration "
            "spans slots); point workers at a Sentinel or a single primary (docs/scaling.md)"
        )
    tls = {"ssl": True, **target.tls_options} if target.tls else {}
    return {
        "SENTINEL": {
            "INSTANCES": list(target.nodes),
            "MASTER_NAME": target.master,
            "DB": target.db,
            "USERNAME": target.login.get("username"),
            "PASSWORD": target.login.get("password"),
            "SOCKET_TIMEOUT": COMMAND_TIMEOUT_SECONDS,
            "SSL": target.tls,
            "CONNECTION_KWARGS": {k: v for k, v in tls.items() if k != "ssl"},
            "SENTINEL_KWARGS": {
                "socket_connect_timeout": SENTINEL_TIMEOUT_SECONDS,
                "socket_timeout": SENTINEL_TIMEOUT_SECONDS,
                **target.sentinel_login,
                **tls,
            },
        }
    }


_URL = os.environ.get("QS_REDIS_URL")
if not _URL:
    raise RuntimeError("workers.rq_settings reads QS_REDIS_URL, which is not set")
globals().update(_settings(_URL))
