"""Redis URLs: every kind a user can name (one server, TLS, a socket, a Sentinel, a cluster), and no password shown."""

from __future__ import annotations

import importlib
import sys
from typing import Any

import pytest
import redis
import redis.asyncio
import redis.asyncio.cluster
import redis.asyncio.sentinel

from queue_service.embedded_redis import free_port
from queue_service.preflight import PreflightError, check_redis
from queue_service.store import connection
from queue_service.store.connection import BadRedisUrl, parse_url, redacted


def test_a_sentinel_url_names_its_sentinels_primary_database_and_both_logins() -> None:
    target = parse_url("redis+sentinel://app:s%40cret@10.0.0.1:26379,[::1]:26380/mymaster/2?sentinel_password=sp")
    assert target.kind == "sentinel"
    assert target.nodes == (("10.0.0.1", 26379), ("::1", 26380))
    assert (target.master, target.db, target.tls) == ("mymaster", 2, False)
    assert target.login == {"username": "app", "password": "s@cret"}
    assert target.sentinel_login == {"password": "sp"}
    assert parse_url("rediss+sentinel://h:1/m").tls
    assert parse_url("redis+sentinel://h:1/m").db == 0


def test_a_cluster_url_names_its_startup_nodes() -> None:
    target = parse_url("rediss+cluster://:pw@a:7000,b:7001?ssl_cert_reqs=none")
    assert (target.kind, target.nodes, target.tls) == ("cluster", (("a", 7000), ("b", 7001)), True)
    assert target.login == {"username": None, "password": "pw"}
    assert target.tls_options == {"ssl_cert_reqs": "none"}


@pytest.mark.parametrize("url", ["redis://h:6379/1", "rediss://h:6380/0", "unix:///run/redis.sock?db=3"])
def test_single_server_urls_are_redis_pys_own(url: str) -> None:
    assert parse_url(url).kind == "server"


@pytest.mark.parametrize(
    ("url", "says"),
    [
        ("http://h:1", "the scheme must be one of"),
        ("h:6379", "the scheme must be one of"),
        ("redis+sentinel://h:1", "ends in /<master name>"),
        ("redis+sentinel://h:1/m/x", "must be a number"),
        ("redis+sentinel://h/m", "is not host:port"),
        ("redis+cluster://h:1/2", "only database 0"),
        ("redis+cluster://u:pw@h:1?timeout=3", "unknown option(s) timeout"),
        ("redis+cluster://", "no host:port"),
    ],
)
def test_a_url_that_names_no_usable_redis_is_refused_saying_why(url: str, says: str) -> None:
    with pytest.raises(BadRedisUrl, match=says.replace("(", r"\(").replace(")", r"\)")) as caught:
        parse_url(url)
    assert "pw" not in str(caught.value)


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("redis://:hunter2@h:6379/0", "redis://:***@h:6379/0"),
        ("redis://user:hunter2@h:6379/0", "redis://user:***@h:6379/0"),
        ("unix:///s.sock?db=1&password=hunter2", "unix:///s.sock?db=1&password=***"),
        (
            "redis+sentinel://u:hunter2@a:1,b:2/m/0?sentinel_password=hunter2",
            "redis+sentinel://u:***@a:1,b:2/m/0?sentinel_password=***",
        ),
        ("redis://h:6379/0", "redis://h:6379/0"),
    ],
)
def test_passwords_never_show_in_a_redacted_url(url: str, shown: str) -> None:
    assert redacted(url) == shown


def test_a_target_never_shows_its_password_in_repr() -> None:
    assert "hunter2" not in repr(parse_url("redis+sentinel://u:hunter2@a:1/m?sentinel_password=hunter2"))
    assert "hunter2" not in repr(parse_url("redis://:hunter2@h:1/0"))


async def test_each_url_kind_builds_its_own_kind_of_client() -> None:
    sentinel = connection.api_client("redis+sentinel://127.0.0.1:1/m/0")
    assert isinstance(sentinel.connection_pool, redis.asyncio.sentinel.SentinelConnectionPool)
    assert isinstance(sentinel.connection_pool, redis.asyncio.BlockingConnectionPool)  # callers wait, not fail
    cluster = connection.api_client("redis+cluster://127.0.0.1:1")
    assert isinstance(cluster, redis.asyncio.cluster.RedisCluster)
    plain = connection.api_client("redis://127.0.0.1:1/0")
    assert isinstance(plain.connection_pool, redis.asyncio.BlockingConnectionPool)
    for client in (sentinel, cluster, plain):
        await client.aclose()
    assert isinstance(
        connection.worker_client("redis+sentinel://127.0.0.1:1/m/0").connection_pool,
        redis.sentinel.SentinelConnectionPool,
    )


def test_up_preflight_reaches_a_server_and_names_what_fails_without_the_password(fresh_redis_url: str) -> None:
    check_redis(fresh_redis_url)
    nobody = free_port()
    with pytest.raises(PreflightError) as caught:
        check_redis(f"redis+sentinel://:hunter2@127.0.0.1:{nobody}/mymaster/0", timeout=1)
    assert "cannot reach Redis at redis+sentinel://:***@127.0.0.1" in str(caught.value)
    assert "hunter2" not in str(caught.value)
    with pytest.raises(PreflightError, match=r"cannot use --redis-url: .*scheme"):
        check_redis("http://127.0.0.1:1")
    with pytest.raises(PreflightError, match=r"cannot reach Redis at redis\+cluster"):
        check_redis(f"redis+cluster://127.0.0.1:{nobody}", timeout=1)


def test_rqs_cli_gets_our_settings_and_on_a_cluster_our_cluster_client() -> None:
    assert connection.rq_cli_options("redis+sentinel://s:1/m/0") == ["-c", "workers.rq_settings"]
    assert connection.rq_cli_options("rediss+cluster://:pw@a:1,b:2") == [
        "--connection-class",
        "queue_service.store.connection.RqRedisCluster",
        "-c",
        "workers.rq_settings",
    ]
    # rq's CLI calls its connection class's from_url: ours reads cluster URLs only (a plain Redis is rq's own).
    with pytest.raises(BadRedisUrl, match=r"needs a redis\+cluster://"):
        connection.RqRedisCluster.from_url("redis://:hunter2@127.0.0.1:1/0")


def _rq_settings(monkeypatch: pytest.MonkeyPatch, url: str, argv: list[str], class_env: str = "") -> dict[str, Any]:
    """What rq's CLI reads of workers.rq_settings when it runs as `argv` with $QS_REDIS_URL = url."""
    monkeypatch.setenv("QS_REDIS_URL", url)
    monkeypatch.setenv("RQ_CONNECTION_CLASS", class_env)
    monkeypatch.setattr(sys, "argv", argv)
    monkeypatch.delitem(sys.modules, "workers.rq_settings", raising=False)
    try:
        return vars(importlib.import_module("workers.rq_settings"))
    finally:
        sys.modules.pop("workers.rq_settings", None)


def test_rq_settings_take_a_cluster_url_only_with_our_cluster_client_named(monkeypatch: pytest.MonkeyPatch) -> None:
    url = "redis+cluster://:hunter2@127.0.0.1:7000,127.0.0.1:7001"
    with pytest.raises(RuntimeError) as caught:
        _rq_settings(monkeypatch, url, ["rq", "worker", "-c", "workers.rq_settings", "echo"])
    assert "--connection-class queue_service.store.connection.RqRedisCluster" in str(caught.value)
    assert "hunter2" not in str(caught.value)
    for argv in (
        ["rq", "worker", "--connection-class", connection.RQ_CLUSTER_CONNECTION_CLASS, "-c", "workers.rq_settings"],
        ["rq", "info", f"--connection-class={connection.RQ_CLUSTER_CONNECTION_CLASS}", "-c", "workers.rq_settings"],
    ):
        assert _rq_settings(monkeypatch, url, argv)["REDIS_URL"] == url
    by_env = _rq_settings(
        monkeypatch, url, ["rq", "info", "-c", "workers.rq_settings"], connection.RQ_CLUSTER_CONNECTION_CLASS
    )
    assert by_env["REDIS_URL"] == url
