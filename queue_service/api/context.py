"""What every route of one API process shares: settings, services, the store, the waiters and the limits."""

from __future__ import annotations

import uuid

from redis.asyncio import Redis
from starlette.requests import HTTPConnection

from queue_service.api.admission import RateLimiter, WaitLimiter
from queue_service.api.errors import ApiError
from queue_service.api.metrics import Metrics
from queue_service.api.waiters import Waiters
from queue_service.config import ServiceConfig, ServicesFile, Settings, durability
from queue_service.store.durability import refuse_on_a_cluster
from queue_service.store.queues import NewEntries, QueueStore


class App:
    def __init__(
        self, settings: Settings, services: ServicesFile, redis: Redis, reader: Redis, metrics: Metrics
    ) -> None:
        self.settings = settings
        self.services = services
        self.redis = redis
        self.metrics = metrics
        replicated = durability(services.services)
        refuse_on_a_cluster(redis, replicated)
        self.store = QueueStore(redis, replicated)
        # This process's reply channel: workers write its sync answers to a stream of that name.
        self.channel = uuid.uuid4().hex
        self.waiters = Waiters(self.store, NewEntries(reader), self.channel)
        self.rate = RateLimiter(self.store)
        self.waits = WaitLimiter(settings.max_long_polls, settings.max_long_polls_per_service)
        # Service -> when (monotonic) a sync put last found a live worker: sync.put_for_reply looks once a second.
        self.workers_seen: dict[str, float] = {}

    def service(self, name: str) -> ServiceConfig:
        try:
            return self.services.by_name[name]
        except KeyError:
            raise ApiError(404, f"service {name!r} not found") from None


def app_of(connection: HTTPConnection) -> App:
    app: App = connection.app.state.qs
    return app
