"""The services file and process settings: typed, validated once at start-up.

A bad services file is refused before anything runs, with a message that names the key
(`services.0.metadata.rpc.max_queue_size: Input should be greater than 0`).
"""

from __future__ import annotations

import re
from functools import cached_property
from pathlib import Path
from typing import Annotated, Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

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


class Metadata(_Strict):
    rpc: RpcSettings = RpcSettings()


class SinkSettings(_Strict):
    max_length: Annotated[int, Field(gt=0)] = 10_000
    # Ours: the sink is bounded by bytes too (results held in Redis's memory); a full sink stops intake.
    max_bytes: Annotated[int, Field(gt=0)] = 512 * 1024 * 1024


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
    sink: SinkSettings = SinkSettings()


class ServiceConfig(_Strict):
    name: str
    processor: str
    token: str | None = None
    metadata: Metadata = Metadata()
    queue: QueueSettings = QueueSettings()

    @field_validator("name")
    @classmethod
    def _name_is_a_path_segment(cls, value: str) -> str:
        # 'default' is rq's name for "every queue": `rq worker ... default` would serve every service.
        if not SERVICE_NAME.match(value) or value in {"sink", "sync", "default"}:
            raise ValueError("must be 1-63 of A-Z a-z 0-9 _ . - (and not 'sink', 'sync' or 'default')")
        return value

    @field_validator("processor")
    @classmethod
    def _processor_is_an_import_path(cls, value: str) -> str:
        module, sep, attr = value.partition(":")
        if not sep or not module or not attr:
            raise ValueError("must be an import path 'module:attr', e.g. workers.examples:Echo")
        return value

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
    # API: open waits (long polls, streams) one process holds, in all and per service (429 past them).
    max_long_polls: Annotated[int, Field(gt=0)] = 256
    max_long_polls_per_service: Annotated[int, Field(gt=0)] = 128
    # API: Redis connections for short commands (waits hold none; see store/connection.py).
    redis_pool_size: Annotated[int, Field(gt=0, le=4096)] = 64
    # API: a request body must arrive within this many seconds (408 after): a trickling client is cut off.
    body_timeout_seconds: Annotated[float, Field(gt=0)] = 30.0
    # API: bytes of item data in one answer (a get, a watch take); always at least one item.
    max_answer_bytes: Annotated[int, Field(gt=0)] = 16 * 1024 * 1024
    # API: `host:port` this process registers for the clients' direct mode (service discovery); "" registers
    # nothing. `queue-service api` fills it from the address it serves when it is not set.
    advertise: str = ""

    def load_services(self) -> ServicesFile:
        return load_services(self.services)
