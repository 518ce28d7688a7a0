"""Start-up checks of `queue-service up`: the port, Redis and every processor, before anything runs.

Each check ends in a PreflightError whose message is the one line the user sees. The processors are
imported in a short-lived child (`python -m queue_service.preflight`), so `up` itself never loads a
user's model code, and the import runs in the same way as in a worker (same interpreter, same
working directory on sys.path).
"""

from __future__ import annotations

import difflib
import errno
import json
import os
import socket
import subprocess
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import redis
import redis.exceptions

from queue_service.store import connection
from queue_service.store.connection import redacted

if TYPE_CHECKING:  # the child loads processors only: no pydantic import for it
    from queue_service.config import ServiceConfig

# uvicorn's own default backlog: the API serves this socket as if it had bound it itself.
LISTEN_BACKLOG = 2048
REDIS_TIMEOUT_SECONDS = 3.0


class PreflightError(Exception):
    """A check failed; the message says what and why, in one line."""


# --- the port ------------------------------------------------------------------------------


def bind_listener(host: str, port: int) -> socket.socket:
    """The API's listening socket, bound and listening now, so a port in use is found before any start.

    uvicorn gets it with `--fd`: nobody can take the port between this check and the API's start.
    """
    try:
        family, kind, proto, _, address = socket.getaddrinfo(
            host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )[0]
    except socket.gaierror as exc:
        raise PreflightError(f"cannot listen on {host}:{port}: {exc.strerror}") from None
    sock = socket.socket(family, kind, proto)
    try:
        # As uvicorn does: a restart may bind while the last run's connections sit in TIME_WAIT.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen(LISTEN_BACKLOG)
    except OSError as exc:
        sock.close()
        if exc.errno == errno.EADDRINUSE:
            raise PreflightError(
                f"port {port} on {host} is already in use (another `queue-service up`?); choose another with --port"
            ) from None
        raise PreflightError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None
    sock.set_inheritable(True)
    return sock


# --- Redis ---------------------------------------------------------------------------------


def check_redis(url: str, timeout: float = REDIS_TIMEOUT_SECONDS) -> None:
    """One PING with a short timeout: a wrong --redis-url fails here, not in every worker forever.

    Any URL kind `store/connection.py` reads: a Sentinel URL must find its primary, a cluster URL its slots."""
    client = None
    try:
        client = connection.sync_client(url, timeout)
        client.ping()
    except connection.BadRedisUrl as exc:
        raise PreflightError(f"cannot use --redis-url: {exc}") from None
    except (redis.RedisError, redis.exceptions.RedisClusterException, ValueError) as exc:
        reason = str(exc) or type(exc).__name__
        raise PreflightError(f"cannot reach Redis at {redacted(url)}: {reason}") from None
    finally:
        if client is not None:
            client.close()


# --- the processors ------------------------------------------------------------------------


def check_processors(services: Sequence[ServiceConfig], timeout: float, env: dict[str, str] | None = None) -> set[str]:
    """Load every service's processor in one child process; the first failure names its service.

    Returns the services whose processor can hold several requests in one process (async, or declared
    thread-safe; an upstream always can, and needs no import): `up` starts one process for those.
    """
    concurrent = {service.name for service in services if service.upstream is not None and not service.rpc.batching}
    wanted = [
        {"service": service.name, "processor": service.processor, "batching": service.rpc.batching}
        for service in services
        if service.processor is not None
    ]
    if not wanted:
        return concurrent
    try:
        done = subprocess.run(
            [sys.executable, "-m", "queue_service.preflight"],
            input=json.dumps(wanted).encode(),
            capture_output=True,
            env=env,
            timeout=timeout,
            check=False,
        )
    except subprocess.TimeoutExpired:
        raise PreflightError(
            f"loading the processors took longer than {timeout:g} s (QS_UP_PREFLIGHT_TIMEOUT_SECONDS)"
        ) from None
    try:
        answer = json.loads(done.stdout.decode().strip().splitlines()[-1])
    except (ValueError, IndexError):
        # The child died without answering (a crash in C code at import, os._exit in user code).
        said = done.stderr.decode(errors="replace").strip().splitlines()
        detail = f": {said[-1]}" if said else ""
        raise PreflightError(f"loading the processors failed (exit code {done.returncode}){detail}") from None
    if answer.get("error"):
        raise PreflightError(f"service {answer['service']!r}: {answer['error']}")
    return concurrent | set(answer.get("concurrent", []))


def _load_each(wanted: list[dict[str, Any]]) -> dict[str, Any]:
    """In the child: load each processor as a worker would; the first failure, or the services whose
    processor runs concurrently."""
    from workers.processor import ProcessorLoadError, check_batching, check_single, load_processor

    concurrent = []
    for each in wanted:
        try:
            processor = load_processor(each["processor"])
            (check_batching if each["batching"] else check_single)(processor)
        except ProcessorLoadError as exc:
            return {"service": each["service"], "error": f"{exc}{_did_you_mean(each['processor'])}"}
        except Exception as exc:  # a processor's own constructor may raise anything
            return {"service": each["service"], "error": f"{each['processor']!r}: {type(exc).__name__}: {exc}"}
        if processor.concurrent and not each["batching"]:  # as workers/plan.py decides
            concurrent.append(each["service"])
    return {"concurrent": concurrent}


def _did_you_mean(path: str) -> str:
    """A hint for a misspelt attribute of a module that imported: ` (did you mean 'mod:Name'?)`."""
    module_name, _, attr_path = path.partition(":")
    module = sys.modules.get(module_name)
    first = attr_path.split(".")[0]
    if module is None or hasattr(module, first):
        return ""
    names = [name for name in dir(module) if not name.startswith("_")]
    close = difflib.get_close_matches(first, names, n=1)
    return f" (did you mean '{module_name}:{close[0]}'?)" if close else ""


def _child_main() -> None:
    wanted = json.loads(sys.stdin.read())
    # The answer goes to the real stdout; whatever user code prints while importing goes to stderr.
    answer_fd = os.dup(1)
    os.dup2(2, 1)
    answer = _load_each(wanted)
    with os.fdopen(answer_fd, "w") as out:
        out.write(json.dumps(answer) + "\n")


if __name__ == "__main__":
    _child_main()
