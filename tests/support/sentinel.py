"""A Redis Sentinel setup for tests: one primary, one replica (or more), three Sentinels, on free ports of 127.0.0.1.

The servers are the same redis-server binary the embedded default runs (`find_redis_server`), the Sentinels
that binary with `--sentinel`. It stops only the processes it started. The failover is fast (the primary is
down after 1 s unseen), so a test that kills the primary sees the replica promoted within seconds.
"""

from __future__ import annotations

import time
from pathlib import Path
from types import TracebackType

import redis

from queue_service.embedded_redis import RedisServer

MASTER = "qs-primary"
QUORUM = 2
DOWN_AFTER_MS = 1000
FAILOVER_TIMEOUT_MS = 5000
READY_SECONDS = 60.0


class SentinelSetup:
    """Primary, replica and three Sentinels; `url` is the `redis+sentinel://` URL that names the primary."""

    def __init__(
        self, base_dir: Path, *, replicas: int = 1, sentinels: int = 3, down_after_ms: int = DOWN_AFTER_MS
    ) -> None:
        self.base_dir = base_dir
        self.replica_count = replicas
        self.down_after_ms = down_after_ms
        self.sentinel_count = sentinels
        self.servers: list[RedisServer] = []  # primary first, at the start
        self.sentinels: list[RedisServer] = []

    @property
    def url(self) -> str:
        hosts = ",".join(f"127.0.0.1:{s.port}" for s in self.sentinels)
        return f"redis+sentinel://{hosts}/{MASTER}/0"

    def start(self) -> SentinelSetup:
        try:
            primary = RedisServer(data_dir=self.base_dir / "node-0").start()
            self.servers.append(primary)
            for number in range(1, self.replica_count + 1):
                replica = RedisServer(
                    data_dir=self.base_dir / f"node-{number}",
                    extra_args=["--replicaof", "127.0.0.1", str(primary.port)],
                ).start()
                self.servers.append(replica)
            for replica in self.servers[1:]:
                self._wait(lambda r=replica: self._linked(r), "the replicas in sync with the primary")
            for number in range(self.sentinel_count):
                config = [
                    f"sentinel monitor {MASTER} 127.0.0.1 {primary.port} {QUORUM}",
                    f"sentinel down-after-milliseconds {MASTER} {self.down_after_ms}",
                    f"sentinel failover-timeout {MASTER} {FAILOVER_TIMEOUT_MS}",
                    f"sentinel parallel-syncs {MASTER} 1",
                ]
                sentinel = RedisServer(data_dir=self.base_dir / f"sentinel-{number}", config=config, sentinel=True)
                self.sentinels.append(sentinel.start())
            self._wait(self._sentinels_agree, "every Sentinel seeing the replica and the other Sentinels")
        except BaseException:
            self.stop()
            raise
        return self

    # --- what the Sentinels say -----------------------------------------------------------

    def _ask(self, sentinel: RedisServer) -> redis.Redis:
        return redis.Redis(host="127.0.0.1", port=sentinel.port, socket_timeout=1, socket_connect_timeout=1)

    def primary_port(self, sentinel: RedisServer | None = None) -> int | None:
        """The primary's port as one Sentinel (the first live one by default) names it now."""
        for each in [sentinel] if sentinel else self.sentinels:
            if not each.is_running():
                continue
            client = self._ask(each)
            try:
                address = client.sentinel_get_master_addr_by_name(MASTER)
                return int(address[1]) if address else None
            except redis.RedisError:
                continue
            finally:
                client.close()
        return None

    def primary(self) -> RedisServer:
        port = self.primary_port()
        [server] = [s for s in self.servers if s.port == port]
        return server

    def _sentinels_agree(self) -> bool:
        for sentinel in self.sentinels:
            client = self._ask(sentinel)
            try:
                state = client.sentinel_master(MASTER)
            except redis.RedisError:
                return False
            finally:
                client.close()
            if (
                int(state["num-slaves"]) < self.replica_count
                or int(state["num-other-sentinels"]) < self.sentinel_count - 1
            ):
                return False
        return True

    @staticmethod
    def _linked(replica: RedisServer) -> bool:
        client = redis.Redis(host="127.0.0.1", port=replica.port, socket_timeout=1)
        try:
            info = client.info("replication")
            return info.get("role") == "slave" and info.get("master_link_status") == "up"
        except redis.RedisError:
            return False
        finally:
            client.close()

    def _wait(self, check: object, what: str, timeout: float = READY_SECONDS) -> None:
        assert callable(check)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if check():
                return
            time.sleep(0.1)
        raise TimeoutError(f"Sentinel setup: not {what} within {timeout:g} s")

    # --- failing over ---------------------------------------------------------------------

    def kill_primary(self) -> RedisServer:
        """SIGKILL the primary (no shutdown, no last sync); returns it."""
        primary = self.primary()
        primary.kill()
        return primary

    def wait_failover(self, old: RedisServer, timeout: float = READY_SECONDS) -> RedisServer:
        """Wait until every live Sentinel names a new primary that answers as one; returns it."""

        def promoted() -> bool:
            ports = {self.primary_port(s) for s in self.sentinels if s.is_running()}
            if len(ports) != 1 or old.port in ports:
                return False
            [server] = [s for s in self.servers if s.port in ports]
            client = redis.Redis(host="127.0.0.1", port=server.port, socket_timeout=1)
            try:
                return client.info("replication").get("role") == "master"
            except redis.RedisError:
                return False
            finally:
                client.close()

        self._wait(promoted, "a new primary named by every Sentinel", timeout)
        return self.primary()

    def rejoin(self, old: RedisServer, timeout: float = READY_SECONDS) -> None:
        """Start a killed server again as a replica of the new primary and wait until it is in sync: what an
        operator or a pod's start script does (ask a Sentinel for the primary, start with --replicaof it).
        Left to itself, a Sentinel converts a returning old primary only 8 s after it sees it (its wait for
        newer configurations), and an empty old primary back before the failover would lose everything."""
        new = self.primary()
        old.extra_args = ["--replicaof", "127.0.0.1", str(new.port)]  # the only extra argument a node has
        old.restart()
        self._wait(lambda: self._linked(old), "the old primary back as a replica in sync", timeout)

    def stop(self) -> None:
        for server in [*self.sentinels, *self.servers]:
            server.stop()

    def __enter__(self) -> SentinelSetup:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, traceback: TracebackType | None
    ) -> None:
        self.stop()
