"""The services file and process settings: typed, validated once at start-up.

A bad services file is refused before anything runs, with a message that names the key
(`services.0.metadata.rpc.max_queue_size: Input should be greater than 0`).
"""

from __future__ import annotations

import base64
import binascii
import re
from collections.abc import Iterable
from functools import cached_property
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from queue_service.durations import parse_duration
from queue_service.store.durability import Replicated

SERVICE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$")


class _Strict(BaseModel):
    # Unknown keys are refused: a typo in `max_queue_sise` must not silently mean "default".
    model_config = ConfigDict(extra="forbid", frozen=True)


class RpcSettings(_Strict):
    """The platform's `metadata.rpc.*` keys."""

    keepalive: Annotated[int, Field(gt=0, description="ms a sync request may take, queue wait included")] = 5000
    worker_threads: Annotated[int, Field(gt=0, le=1024)] = 5
    max_queue_size: Annotated[int, Field(gt=0)] = 64
    rate_limit: Annotated[float, Field(ge=0, description="requests per second per service; 0 = off")] = 0
    # Dynamic batching (the platform's keys): up to max_batch_size items per call of the processor's
    # `process_batch`; a busy worker waits at most max_batch_timeout ms from its first item for more.
    batching: bool = False
    max_batch_size: Annotated[int, Field(ge=1, le=1024)] = 16
    max_batch_timeout: Annotated[int, Field(ge=0, le=60_000, description="ms")] = 20


class Metadata(_Strict):
    rpc: RpcSettings = RpcSettings()


class SinkSettings(_Strict):
    max_length: Annotated[int, Field(gt=0)] = 10_000
    # Ours: the sink is bounded by bytes too (results held in Redis's memory); a full sink stops intake.
    max_bytes: Annotated[int, Field(gt=0)] = 512 * 1024 * 1024


# The longest deadline a request can have (`_ttl_`, queue.request_ttl).
MAX_TTL_SECONDS = 7 * 24 * 3600
WEBHOOK_EVENTS = ("start", "progress", "output", "completed")


class WebhookSettings(_Strict):
    """Ours: the service's webhook (queue_service/webhooks/, docs/webhooks.md). Without `url`, only requests
    that name one (`_webhook_`) get webhooks; either way they are signed with `secret`."""

    url: str | None = None
    events: list[str] = ["completed"]
    # Standard Webhooks' secret form: `whsec_` + base64 of 24-64 random bytes. Required: receivers must be
    # able to verify what they get.
    secret: str
    # Attempts per delivery before it is a dead letter; with the default backoff, 8 span about an hour.
    max_attempts: Annotated[int, Field(ge=1, le=30)] = 8
    # The first retry's delay; each next one doubles (with jitter), up to an hour.
    backoff_seconds: Annotated[float, Field(ge=0, le=3600)] = 30
    # One attempt, from connecting to the answer: a receiver that hangs is cut off after it.
    timeout_seconds: Annotated[float, Field(gt=0, le=300)] = 10
    # Results up to this size are in the payload (base64 when not UTF-8); larger ones only as a link.
    max_result_bytes: Annotated[int, Field(ge=0, le=16 * 1024 * 1024)] = 256 * 1024
    # Allow URLs that resolve to loopback, private, link-local or metadata addresses (refused otherwise).
    allow_private: bool = False

    @field_validator("url")
    @classmethod
    def _is_an_http_url(cls, value: str | None) -> str | None:
        if value is not None:
            parts = urlsplit(value)
            if parts.scheme not in ("http", "https") or not parts.hostname:
                raise ValueError("must be an http:// or https:// URL with a host")
        return value

    @field_validator("events")
    @classmethod
    def _known_events(cls, value: list[str]) -> list[str]:
        unknown = [event for event in value if event not in WEBHOOK_EVENTS]
        if unknown or not value:
            raise ValueError(f"must be a non-empty list of {', '.join(WEBHOOK_EVENTS)}; got {value}")
        return value

    @field_validator("secret")
    @classmethod
    def _a_standard_webhooks_secret(cls, value: str) -> str:
        body = value.removeprefix("whsec_")
        try:
            key = base64.b64decode(body + "==", validate=False)
        except (binascii.Error, ValueError):
            key = b""
        if not value.startswith("whsec_") or not 24 <= len(key) <= 64:
            raise ValueError(
                "must be 'whsec_' + base64 of 24-64 random bytes, e.g. "
                "python -c \"import base64,os; print('whsec_' + base64.b64encode(os.urandom(32)).decode())\""
            )
        return value


class StreamSettings(_Strict):
    """Ours: the output a request streams while it runs (`GET .../sink?_stream_=true`; workers/streaming.py)."""

    # Bytes of streamed chunks one delivery of a request may write; past it the request fails with 413.
    max_bytes: Annotated[int, Field(gt=0)] = 16 * 1024 * 1024
    # How long a request's stream stays readable (replayed) after the request ended.
    ttl_seconds: Annotated[float, Field(gt=0)] = 600


class QueueSettings(_Strict):
    """The platform's `queue.*` keys, plus ours (documented in README)."""

    max_payload_size_kb: Annotated[int, Field(gt=0)] = 8 * 1024
    max_delivery: Annotated[int, Field(gt=0, description="deliveries before an item is given up")] = 3
    # Ours: a worker renews its lease on the item it holds every lease/3; a dead worker's item is
    # handed to another worker once the lease lapses. Not a processing time limit.
    lease_seconds: Annotated[float, Field(ge=1, le=300)] = 10
    # Ours: longest a processor may run on one item; 0 = no limit.
    max_processing_seconds: Annotated[float, Field(ge=0)] = 0
    # Ours: client consumer groups per queue (watches); past it, the group unseen longest is replaced.
    max_groups: Annotated[int, Field(gt=0, le=1024)] = 32
    # Ours: "primary" acknowledges a put (and a worker's result) once the primary has it; "replicated" only
    # once a replica confirmed it too (WAIT 1), so a failover cannot lose it. Waits at most
    # replication_timeout_ms, then 503 (the put) or a retry (the result). Needs a replica (Sentinel).
    durability: Literal["primary", "replicated"] = "primary"
    replication_timeout_ms: Annotated[int, Field(gt=0, le=60_000)] = 1000
    # Ours: a request still waiting this long after its put never runs (lastCode 408); 0 = no deadline. Seconds
    # or a Go duration ("10m"); a put's `_ttl_` replaces it for that request.
    request_ttl: Annotated[float, Field(ge=0, le=MAX_TTL_SECONDS)] = 0
    sink: SinkSettings = SinkSettings()
    stream: StreamSettings = StreamSettings()

    @field_validator("request_ttl", mode="before")
    @classmethod
    def _a_duration(cls, value: Any) -> Any:
        return parse_duration(value) if isinstance(value, str) else value


class UpstreamSettings(_Strict):
    """Ours: an HTTP model server the built-in upstream processor forwards each item to (workers/upstream.py)."""

    url: str
    # Path answered with a 2xx while the server can take requests; null: no check (always healthy).
    health: str | None = "/health"
    # Seconds one attempt may take, from connecting to the last byte of the answer (504 after the retries).
    timeout: Annotated[float, Field(gt=0)] = 600
    connect_timeout: Annotated[float, Field(gt=0)] = 5
    # Further attempts after a connection error or a timeout, with backoff doubling from backoff_seconds.
    retries: Annotated[int, Field(ge=0, le=10)] = 2
    backoff_seconds: Annotated[float, Field(ge=0)] = 0.5
    health_interval_seconds: Annotated[float, Field(gt=0)] = 1.0
    # Sent with every forwarded request, e.g. the model server's own API key.
    headers: dict[str, str] = {}

    @field_validator("url")
    @classmethod
    def _is_an_http_url(cls, value: str) -> str:
        parts = urlsplit(value)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError("must be an http:// or https:// URL with a host, e.g. http://127.0.0.1:8080")
        return value.rstrip("/")

    @field_validator("health")
    @classmethod
    def _is_a_path(cls, value: str | None) -> str | None:
        if value is not None and not value.startswith("/"):
            raise ValueError("must be a path starting with '/', e.g. /health (or null: no check)")
        return value


# What an upstream service runs: the built-in processor that forwards to `upstream.url`.
UPSTREAM_PROCESSOR = "workers.upstream:Upstream"


class ServiceConfig(_Strict):
    name: str
    processor: str | None = None
    upstream: UpstreamSettings | None = None
    token: str | None = None
    metadata: Metadata = Metadata()
    queue: QueueSettings = QueueSettings()
    webhook: WebhookSettings | None = None

    @field_validator("name")
    @classmethod
    def _name_is_a_path_segment(cls, value: str) -> str:
        # 'default' is rq's name for "every queue": `rq worker ... default` would serve every service.
        if not SERVICE_NAME.match(value) or value in {"sink", "sync", "default"}:
            raise ValueError("must be 1-63 of A-Z a-z 0-9 _ . - (and not 'sink', 'sync' or 'default')")
        return value

    @field_validator("processor")
    @classmethod
    def _processor_is_an_import_path(cls, value: str | None) -> str | None:
        if value is None:
            return value
        module, sep, attr = value.partition(":")
        if not sep or not module or not attr:
            raise ValueError("must be an import path 'module:attr', e.g. workers.examples:Echo")
        return value

    @model_validator(mode="after")
    def _a_processor_or_an_upstream(self) -> ServiceConfig:
        if self.processor is None and self.upstream is None:
            raise ValueError("a service needs `processor` (an import path) or `upstream` ({url: ...})")
        if self.processor is not None and self.upstream is not None:
            raise ValueError("a service has `processor` or `upstream`, not both")
        if self.upstream is not None and self.rpc.batching:
            raise ValueError("metadata.rpc.batching: an upstream gets one request per call; batching is for processors")
        return self

    @property
    def processor_path(self) -> str:
        """The import path of what the workers run: the processor, or the built-in upstream processor."""
        return self.processor or UPSTREAM_PROCESSOR

    @property
    def rpc(self) -> RpcSettings:
        return self.metadata.rpc

    @property
    def max_payload_bytes(self) -> int:
        return self.queue.max_payload_size_kb * 1024


class ServicesFile(_Strict):
    services: list[ServiceConfig]

    @model_validator(mode="after")
    def _names_are_unique(self) -> ServicesFile:
        seen: set[str] = set()
        for service in self.services:
            if service.name in seen:
                raise ValueError(f"service name {service.name!r} is used twice")
            seen.add(service.name)
        if not self.services:
            raise ValueError("at least one service is needed")
        return self

    @cached_property
    def by_name(self) -> dict[str, ServiceConfig]:
        return {service.name: service for service in self.services}


def durability(services: Iterable[ServiceConfig]) -> dict[str, Replicated]:
    """The store's replication rule of each service with `queue.durability: replicated`."""
    return {
        service.name: Replicated(1, service.queue.replication_timeout_ms)
        for service in services
        if service.queue.durability == "replicated"
    }


class ConfigError(Exception):
    """The services file cannot be used; the message names the file and the key."""


# The built-in default of `queue-service up` without --services: open, so a warning is printed.
DEFAULT_SERVICES: dict[str, Any] = {
    "services": [{"name": "echo", "processor": "workers.examples:Echo"}],
}


def parse_services(raw: Any, source: str = "services file") -> ServicesFile:
    try:
        return ServicesFile.model_validate(raw)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(part) for part in error['loc']) or '(top level)'}: {error['msg']}" for error in exc.errors()
        )
        raise ConfigError(f"{source}: {problems}") from None


def load_services(path: str | Path | None) -> ServicesFile:
    """Load the services file at `path`, or the built-in default when `path` is None."""
    if path is None:
        return parse_services(DEFAULT_SERVICES, "built-in default")
    try:
        raw = yaml.safe_load(Path(path).read_text())
    except OSError as exc:
        raise ConfigError(f"cannot read services file {path}: {exc.strerror}") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"services file {path} is not valid YAML: {exc}") from None
    return parse_services(raw, str(path))


class Settings(BaseSettings):
    """Process settings from QS_* environment variables (shared by the API, workers and CLI)."""

    model_config = SettingsConfigDict(env_prefix="QS_", extra="ignore")

    redis_url: str = "redis://127.0.0.1:6379/0"
    services: Path | None = None
    # How far a signed request's Date may be from the server clock (replay window).
    max_clock_skew_seconds: float = 900
    # Workers: how long a stop (SIGTERM) waits for the item in hand before handing it back.
    # Below Kubernetes' default 30 s termination grace, so the hand-back happens before SIGKILL.
    shutdown_grace_seconds: float = 25
    # Workers: requests one process holds at once for a processor that can (async, an upstream, or a
    # sync one that says `thread_safe = True`); unset: each service's metadata.rpc.worker_threads.
    worker_threads: Annotated[int | None, Field(gt=0, le=1024)] = None
    # API: open waits (long polls, streams) one process holds, in all and per service (429 past them).
    max_long_polls: Annotated[int, Field(gt=0)] = 256
    max_long_polls_per_service: Annotated[int, Field(gt=0)] = 128
    # API: Redis connections for short commands (waits hold none; see store/connection.py).
    redis_pool_size: Annotated[int, Field(gt=0, le=4096)] = 64
    # API: a request body must arrive within this many seconds (408 after): a trickling client is cut off.
    body_timeout_seconds: Annotated[float, Field(gt=0)] = 30.0
    # API: bytes of item data in one answer (a get, a watch take); always at least one item.
    max_answer_bytes: Annotated[int, Field(gt=0)] = 16 * 1024 * 1024
    # Workers: streamed chunks and progress are written at most once per this many ms per process (the first
    # after a quiet spell at once), or as soon as this many are waiting: one round trip for many tokens.
    stream_flush_ms: Annotated[float, Field(ge=0, le=1000)] = 5.0
    stream_flush_chunks: Annotated[int, Field(gt=0)] = 256
    # Workers: a one-at-a-time worker with a backlog of short items keeps one item in reserve and writes each
    # result while the next item runs (no round trip between two items); false: one item held at a time.
    worker_prefetch: bool = True
    # API: an SSE stream with nothing to send sends a keep-alive comment this often.
    stream_keepalive_seconds: Annotated[float, Field(gt=0)] = 10.0
    # API: the Bearer token of /dashboard. Empty: the dashboard is served to loopback clients only.
    admin_token: str = ""
    # Webhooks: the API's address as receivers reach it, for the link to a result too large for a payload
    # (webhook.max_result_bytes); empty: the link is a path only.
    public_url: str = ""
    # API: `host:port` this process registers for the clients' direct mode (service discovery); "" registers
    # nothing. `queue-service api` fills it from the address it serves when it is not set.
    advertise: str = ""

    def load_services(self) -> ServicesFile:
        return load_services(self.services)
