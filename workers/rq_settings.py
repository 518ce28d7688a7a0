"""rq's settings module from $QS_REDIS_URL: `rq worker -c workers.rq_settings` / `rq info -c workers.rq_settings`.

rq's own `--url` reads only `redis://`, `rediss://` and `unix://`, and rq's CLI talks to Redis before our worker
class replaces its connection (it asks whether workers are suspended). With this module rq's CLI reaches the
same Redis as the worker for every URL kind we read: a Sentinel URL becomes rq's `SENTINEL` setting, any other
URL its `REDIS_URL`. The URL stays in the environment, so its password never shows on a command line.

A cluster URL becomes `REDIS_URL` too, which rq's CLI hands to its connection class: on a cluster that must be
ours, `--connection-class queue_service.store.connection.RqRedisCluster` (rq's `Redis.from_url` reads no cluster
URL, and rq's settings module cannot name a class). Without it this module stops with the exact command.
"""

from __future__ import annotations

import os
import sys
from typing import Any

from queue_service.store.connection import (
    COMMAND_TIMEOUT_SECONDS,
    RQ_CLUSTER_CONNECTION_CLASS,
    SENTINEL_TIMEOUT_SECONDS,
    parse_url,
    redacted,
)


def _connection_class_named() -> str:
    """The connection class rq's CLI was given (`--connection-class X`, `--connection-class=X` or
    $RQ_CONNECTION_CLASS): this module is read by rq's CLI, after it parsed its arguments."""
    argv = sys.argv[1:]
    for i, arg in enumerate(argv):
        if arg == "--connection-class" and i + 1 < len(argv):
            return argv[i + 1]
        if arg.startswith("--connection-class="):
            return arg.split("=", 1)[1]
    return os.environ.get("RQ_CONNECTION_CLASS", "")


def _settings(url: str) -> dict[str, Any]:
    target = parse_url(url)
    if target.kind == "server":
        return {"REDIS_URL": url}
    if target.kind == "cluster":
        # rq's default class (redis.Redis) reads no cluster URL; ours, or a subclass someone names, does.
        if _connection_class_named() in ("", "redis.Redis", "redis.StrictRedis", "redis.client.Redis"):
            raise RuntimeError(
                f"QS_REDIS_URL={redacted(url)} is a Redis Cluster: give rq's CLI our cluster client too, "
                f"`rq worker --connection-class {RQ_CLUSTER_CONNECTION_CLASS} -c workers.rq_settings ...` "
                "(the same for `rq info`; docs/scaling.md)"
            )
        return {"REDIS_URL": url}
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
