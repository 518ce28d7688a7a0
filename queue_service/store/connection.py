"""Building Redis clients: the one place that turns a URL into the API's asyncio clients and a worker's client.

A URL names one server (`redis://`, `rediss://` for TLS, `unix://`), a Sentinel-watched primary
(`redis+sentinel://host:port[,host:port...]/<master>/<db>`) or a Redis Cluster
(`redis+cluster://host:port[,host:port...]`); `rediss+sentinel` and `rediss+cluster` are the same over TLS.
`user:password@` before the hosts is the data nodes' login; a Sentinel's own login, if it has one, is
`?sentinel_username=&sentinel_password=`. A client on a Sentinel asks it for the primary on every new
connection, so after a failover it reconnects to the new primary by itself; a cluster client follows the
slots (MOVED, ASK) by itself.

Every kind gets the same policy: a dropped connection is reconnected and the command retried a few times
with backoff, but a command that timed out is never resent (every script is idempotent per request id
anyway, so a resend after a lost answer stores nothing twice). Longer outages (Redis restarting, a failover)
are the caller's to ride out: `outage_retry` is the one policy for that.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal, TypeVar
from urllib.parse import parse_qsl, unquote, urlencode, urlsplit

import redis
import redis.asyncio
import redis.asyncio.cluster
import redis.asyncio.sentinel
import redis.cluster
import redis.sentinel
import tenacity
from redis.backoff import ExponentialBackoff

T = TypeVar("T")
# Redis away, or a cluster saying "not now" (a slot's keys moving past the client's retries or redirections,
# a shard failing over: TRYAGAIN, "TTL exhausted", CLUSTERDOWN): the command did not run, and it ends by itself.
REDIS_DOWN = (
    redis.ConnectionError,
    redis.TimeoutError,
    redis.exceptions.TryAgainError,
    redis.exceptions.ClusterError,
)
CONNECT_TIMEOUT_SECONDS = 2.0
# Short commands answer in microseconds; this bounds how long a frozen Redis can hold a caller (then 503).
COMMAND_TIMEOUT_SECONDS = 7.0
# Connections of the API for short commands: a command takes microseconds, so a few dozen serve thousands of
# concurrent requests (a caller waits for a free one), and a burst of clients cannot make the process hold
# hundreds of connections. Waits (long polls, watches, sync answers) hold none of these: they wait on one
# blocking connection per service (`blocking_client`).
API_POOL_SIZE = 64
API_POOL_WAIT_SECONDS = 5.0
# A Sentinel answers "where is the primary" in microseconds; one that does not within this is skipped.
SENTINEL_TIMEOUT_SECONDS = 1.0

Kind = Literal["server", "sentinel", "cluster"]
_SCHEMES: dict[str, tuple[Kind, bool]] = {
    "redis": ("server", False),
    "rediss": ("server", True),
    "unix": ("server", False),
    "redis+sentinel": ("sentinel", False),
    "rediss+sentinel": ("sentinel", True),
    "redis+cluster": ("cluster", False),
    "rediss+cluster": ("cluster", True),
}
# Query parameters of the Sentinel and cluster URLs (a single server's URL is redis-py's own, all of its).
_TLS_OPTIONS = {"ssl_ca_certs", "ssl_cert_reqs", "ssl_certfile", "ssl_keyfile", "ssl_check_hostname"}
_SENTINEL_OPTIONS = {"sentinel_username", "sentinel_password"}
_SECRET_OPTIONS = {"password", "sentinel_password"}


class BadRedisUrl(ValueError):
    """A URL that names no Redis we can use; the message says why (never with its password)."""


@dataclass(frozen=True)
class RedisTarget:
    """What a URL names: one server (its URL, for redis-py), a Sentinel's primary, or a cluster."""

    kind: Kind
    url: str = field(default="", repr=False)
    nodes: tuple[tuple[str, int], ...] = ()
    master: str = ""
    db: int = 0
    tls: bool = False
    # Kept out of repr(): a target in a log line or a traceback must not show a password.
    login: dict[str, Any] = field(default_factory=dict, repr=False)  # username, password of the data nodes
    sentinel_login: dict[str, Any] = field(default_factory=dict, repr=False)
    tls_options: dict[str, Any] = field(default_factory=dict)


def parse_url(url: str) -> RedisTarget:
    """Read a Redis URL (see the module's docstring); BadRedisUrl names what is wrong."""
    scheme = url.split("://", 1)[0].lower() if "://" in url else ""
    if scheme not in _SCHEMES:
        raise BadRedisUrl(f"{redacted(url)}: the scheme must be one of {', '.join(s + '://' for s in _SCHEMES)}")
    kind, tls = _SCHEMES[scheme]
    if kind == "server":
        return RedisTarget("server", url=url, tls=tls)  # redis-py reads it (and refuses what it cannot read)
    parts = urlsplit(url)
    userinfo, _, hosts = parts.netloc.rpartition("@")
    login: dict[str, Any] = {}
    if userinfo:
        user, _, password = userinfo.partition(":")
        login = {"username": unquote(user) or None, "password": unquote(password) or None}
    nodes = tuple(_node(each, url) for each in hosts.split(",") if each)
    if not nodes:
        raise BadRedisUrl(f"{redacted(url)}: no host:port given")
    query = dict(parse_qsl(parts.query))
    allowed = _TLS_OPTIONS | (_SENTINEL_OPTIONS if kind == "sentinel" else set())
    unknown = sorted(set(query) - allowed)
    if unknown:
        raise BadRedisUrl(
            f"{redacted(url)}: unknown option(s) {', '.join(unknown)} (known: {', '.join(sorted(allowed))})"
        )
    tls_options: dict[str, Any] = {k: v for k, v in query.items() if k in _TLS_OPTIONS}
    if "ssl_check_hostname" in tls_options:
        tls_options["ssl_check_hostname"] = tls_options["ssl_check_hostname"].lower() in ("1", "true", "yes")
    path = [unquote(p) for p in parts.path.split("/") if p]
    if kind == "cluster":
        if path and path != ["0"]:
            raise BadRedisUrl(f"{redacted(url)}: a cluster has only database 0 (no path after the hosts)")
        return RedisTarget("cluster", nodes=nodes, tls=tls, login=login, tls_options=tls_options)
    if not path or len(path) > 2:
        raise BadRedisUrl(f"{redacted(url)}: a Sentinel URL ends in /<master name>[/<db>]")
    try:
        db = int(path[1]) if len(path) == 2 else 0
    except ValueError:
        raise BadRedisUrl(f"{redacted(url)}: the database must be a number, not {path[1]!r}") from None
    sentinel_login = {
        "username": query.get("sentinel_username") or None,
        "password": query.get("sentinel_password") or None,
    }
    return RedisTarget(
        "sentinel",
        nodes=nodes,
        master=path[0],
        db=db,
        tls=tls,
        login=login,
        sentinel_login={k: v for k, v in sentinel_login.items() if v},
        tls_options=tls_options,
    )


def _node(text: str, url: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    if not host or not port.isdigit():
        raise BadRedisUrl(f"{redacted(url)}: {text!r} is not host:port")
    return host.strip("[]"), int(port)


def redacted(url: str) -> str:
    """The URL without its passwords (the login's and any `password` option), fit for a message or a log."""
    head, question, query = url.partition("?")
    scheme, sep, rest = head.partition("://")
    if sep:
        netloc, slash, path = rest.partition("/")
        userinfo, at, hosts = netloc.rpartition("@")
        if at and ":" in userinfo:
            userinfo = userinfo.split(":", 1)[0] + ":***"
        head = f"{scheme}://{userinfo}{at}{hosts}{slash}{path}"
    if question:
        shown = [(k, "***" if k in _SECRET_OPTIONS else v) for k, v in parse_qsl(query, keep_blank_values=True)]
        query = urlencode(shown, safe="*")
    return f"{head}{question}{query}"


def _retry() -> redis.asyncio.retry.Retry:
    return redis.asyncio.retry.Retry(ExponentialBackoff(cap=1.0, base=0.05), 3)


def _sync_retry() -> redis.retry.Retry:
    return redis.retry.Retry(ExponentialBackoff(cap=1.0, base=0.05), 3)


def _common(socket_timeout: float | None) -> dict[str, Any]:
    return {
        "socket_connect_timeout": CONNECT_TIMEOUT_SECONDS,
        "socket_timeout": socket_timeout,
        "socket_keepalive": True,
        "health_check_interval": 30,
        "retry_on_error": [redis.ConnectionError],
    }


def _tls(target: RedisTarget) -> dict[str, Any]:
    return {"ssl": True, **target.tls_options} if target.tls else {}


class _BlockingSentinelPool(redis.asyncio.sentinel.SentinelConnectionPool, redis.asyncio.BlockingConnectionPool):
    """A Sentinel's pool that makes a caller wait for a free connection (as the API's pool does), not fail."""


def _async_sentinel(target: RedisTarget, **kwargs: Any) -> redis.asyncio.Redis:
    sentinel = redis.asyncio.sentinel.Sentinel(
        list(target.nodes),
        sentinel_kwargs={
            "socket_connect_timeout": SENTINEL_TIMEOUT_SECONDS,
            "socket_timeout": SENTINEL_TIMEOUT_SECONDS,
            **target.sentinel_login,
            **_tls(target),
        },
    )
    return sentinel.master_for(target.master, db=target.db, **target.login, **_tls(target), **kwargs)


def _sync_sentinel(target: RedisTarget, **kwargs: Any) -> redis.Redis:
    sentinel = redis.sentinel.Sentinel(
        list(target.nodes),
        sentinel_kwargs={
            "socket_connect_timeout": SENTINEL_TIMEOUT_SECONDS,
            "socket_timeout": SENTINEL_TIMEOUT_SECONDS,
            **target.sentinel_login,
            **_tls(target),
        },
    )
    return sentinel.master_for(target.master, db=target.db, **target.login, **_tls(target), **kwargs)


# redis-py's cluster client rebuilds its slot table from scratch at every 5th MOVED by closing every node's
# connections, those other tasks are using too: a command in flight then fails (`'NoneType' object has no
# attribute 'writelines'`, seen here while a slot moved under load: a 500). With 0 each MOVED updates the one
# slot it names; a connection error still makes the client reload the whole table.
_CLUSTER_OPTIONS: dict[str, Any] = {"reinitialize_steps": 0}


def _async_cluster(target: RedisTarget, **kwargs: Any) -> redis.asyncio.RedisCluster:
    nodes = [redis.asyncio.cluster.ClusterNode(host, port) for host, port in target.nodes]
    return redis.asyncio.RedisCluster(startup_nodes=nodes, **_CLUSTER_OPTIONS, **target.login, **_tls(target), **kwargs)


def _sync_cluster(
    target: RedisTarget, cluster_class: type[redis.RedisCluster] = redis.RedisCluster, **kwargs: Any
) -> redis.RedisCluster:
    nodes = [redis.cluster.ClusterNode(host, port) for host, port in target.nodes]
    return cluster_class(startup_nodes=nodes, **_CLUSTER_OPTIONS, **target.login, **_tls(target), **kwargs)


@dataclass
class _PoolView:
    """What rq reads of a client's `connection_pool`: its connection settings (rq raises the socket timeout
    there, and compares them to tell connections apart) and the connection class (SSL or not)."""

    connection_kwargs: dict[str, Any]
    connection_class: type[redis.Connection]


class RqRedisCluster(redis.RedisCluster):
    """A worker's cluster client, shaped as rq 3.0 needs it: rq reads `connection.connection_pool`, which
    redis-py's cluster client has not (each node has a pool of its own). rq's other commands work on a
    cluster as they are: its pipelines are `pipeline()` without `transaction=True`, which a cluster client
    splits per node, and each of its commands names one key.

    rq's CLI builds its client with `--connection-class queue_service.store.connection.RqRedisCluster` from
    `--url` or from `workers.rq_settings` (`REDIS_URL`): `from_url` reads our cluster URLs, with our policy."""

    @classmethod
    def from_url(cls, url: str, **kwargs: Any) -> RqRedisCluster:  # type: ignore[override]
        client = worker_client(url)
        if not isinstance(client, RqRedisCluster):
            raise BadRedisUrl(f"{redacted(url)}: RqRedisCluster needs a redis+cluster:// or rediss+cluster:// URL")
        return client

    @property
    def connection_pool(self) -> _PoolView:
        # A copy: rq raises its socket timeout to its dequeue timeout (minutes) there, for its own blocking
        # reads, which a worker of ours never makes; our nodes keep COMMAND_TIMEOUT_SECONDS.
        options = dict(self.nodes_manager.connection_kwargs)
        connection_class = redis.SSLConnection if options.get("ssl") else redis.Connection
        return _PoolView(options, connection_class)


RQ_CLUSTER_CONNECTION_CLASS = f"{__name__}.RqRedisCluster"
RQ_SETTINGS = "workers.rq_settings"


def rq_cli_options(url: str) -> list[str]:
    """What gives rq's CLI (`rq worker`, `rq info`) the Redis of `url` when $QS_REDIS_URL holds it: our settings
    module, and on a cluster our cluster client as rq's connection class."""
    if parse_url(url).kind == "cluster":
        return ["--connection-class", RQ_CLUSTER_CONNECTION_CLASS, "-c", RQ_SETTINGS]
    return ["-c", RQ_SETTINGS]


def is_cluster(client: Any) -> bool:
    """A Redis Cluster client (sync or asyncio): multi-key commands must stay within one slot."""
    return isinstance(client, (redis.RedisCluster, redis.asyncio.RedisCluster))


def api_client(url: str, pool_size: int = API_POOL_SIZE) -> Any:
    """The API's client for short commands: a bounded pool; under a burst, callers wait for a connection.

    On a cluster the bound is per node, and a command past it fails (503) instead of waiting: redis-py's
    cluster client has no waiting pool."""
    target = parse_url(url)
    common = _common(COMMAND_TIMEOUT_SECONDS)
    if target.kind == "sentinel":
        return _async_sentinel(
            target,
            connection_pool_class=_BlockingSentinelPool,
            max_connections=pool_size,
            timeout=API_POOL_WAIT_SECONDS,
            retry=_retry(),
            **common,
        )
    if target.kind == "cluster":
        return _async_cluster(target, max_connections=pool_size, retry=_retry(), **common)
    pool = redis.asyncio.BlockingConnectionPool.from_url(
        url, max_connections=pool_size, timeout=API_POOL_WAIT_SECONDS, retry=_retry(), **common
    )
    return redis.asyncio.Redis(connection_pool=pool)


def blocking_client(url: str, block_seconds: float) -> Any:
    """A client for one long-lived blocking reader (XREAD BLOCK): its read timeout is above the block."""
    target = parse_url(url)
    common = _common(block_seconds + COMMAND_TIMEOUT_SECONDS)
    if target.kind == "sentinel":
        return _async_sentinel(target, retry=_retry(), **common)
    if target.kind == "cluster":
        return _async_cluster(target, retry=_retry(), **common)
    return redis.asyncio.Redis.from_url(url, retry=_retry(), **common)


def worker_client(url: str) -> Any:
    """A worker's client (rq's bookkeeping and ours share it). Blocking waits are short (a second).
    On a cluster: an `RqRedisCluster`, which rq can use."""
    options = {"retry": _sync_retry(), **_common(COMMAND_TIMEOUT_SECONDS)}
    target = parse_url(url)
    if target.kind == "cluster":
        return _sync_cluster(target, cluster_class=RqRedisCluster, **options)
    return sync_client(url, COMMAND_TIMEOUT_SECONDS, **options)


def sync_client(url: str, timeout: float, **kwargs: Any) -> Any:
    """A plain synchronous client of any URL kind, with `timeout` for connecting and for each command (checks,
    tools, tests). A cluster client connects here, at once, to learn the slots; the others on first use."""
    target = parse_url(url)
    options: dict[str, Any] = {
        "socket_connect_timeout": min(timeout, CONNECT_TIMEOUT_SECONDS),
        "socket_timeout": timeout,
    }
    options.update(kwargs)
    if target.kind == "sentinel":
        return _sync_sentinel(target, **options)
    if target.kind == "cluster":
        return _sync_cluster(target, **options)
    return redis.Redis.from_url(url, **options)


def worker_client_like(client: redis.Redis) -> redis.Redis:
    """A worker's client to the server `client` talks to (the one rq built from its --url), with our policy.
    A cluster client from `RqRedisCluster.from_url` has our policy already: it is kept."""
    if isinstance(client, RqRedisCluster):
        return client
    kwargs = dict(client.connection_pool.connection_kwargs)
    kwargs.update(_common(COMMAND_TIMEOUT_SECONDS), retry=_sync_retry())
    pool = redis.ConnectionPool(connection_class=client.connection_pool.connection_class, **kwargs)
    return redis.Redis(connection_pool=pool)


def outage_retry(
    seconds: float,
    on_retry: Callable[[tenacity.RetryCallState], None] | None = None,
    give_up: Callable[[], bool] | None = None,
) -> tenacity.Retrying:
    """Keep retrying a call while Redis is unreachable, for up to `seconds` (or until `give_up()`), backing off
    to 5 s between tries: how late a caller notices Redis is back."""
    stop: tenacity.stop.stop_base = tenacity.stop_after_delay(seconds)
    if give_up is not None:
        stop = stop | tenacity.stop_when_event_set(_Flag(give_up))  # type: ignore[arg-type]
    return tenacity.Retrying(
        retry=tenacity.retry_if_exception_type(REDIS_DOWN),
        stop=stop,
        wait=tenacity.wait_exponential_jitter(multiplier=0.2, max=5.0),
        before_sleep=on_retry,
        reraise=True,
    )


def riding_outages(
    call: Callable[[], T],
    seconds: float,
    on_retry: Callable[[tenacity.RetryCallState], None] | None = None,
    give_up: Callable[[], bool] | None = None,
) -> T:
    """`call()`, retried by `outage_retry` if Redis is unreachable. The first try goes without tenacity: its
    retry state per call cost ~8 % of a worker's CPU per job (issue 17), for a case that is rare."""
    try:
        return call()
    except REDIS_DOWN:
        pass
    return outage_retry(seconds, on_retry, give_up)(call)


class _Flag:
    """A callable seen as an Event by tenacity's stop_when_event_set."""

    def __init__(self, check: Callable[[], bool]) -> None:
        self.is_set = check
