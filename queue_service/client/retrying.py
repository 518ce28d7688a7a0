"""The client's retry policy: 429, 450 and 503 (and a lost connection) are tried again, a few times, not forever.

Bounded exponential backoff with jitter (tenacity's), never shorter than the server's Retry-After, at most
`max_attempts` attempts and `max_seconds` in all: the platform's advice is to retry a few 450s, never
indefinitely. The same policy drives the sync and the async client.
"""

from __future__ import annotations

from dataclasses import dataclass

import tenacity

from queue_service.client.errors import QueueFull, RateLimited, Unavailable, Unreachable

RETRIED = (QueueFull, RateLimited, Unavailable, Unreachable)


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    max_attempts: int = 5
    max_seconds: float = 60.0
    initial_seconds: float = 0.5
    max_wait_seconds: float = 10.0

    @classmethod
    def never(cls) -> RetryPolicy:
        return cls(max_attempts=1)

    def _wait(self) -> tenacity.wait.wait_base:
        backoff = tenacity.wait_exponential(
            multiplier=self.initial_seconds, max=self.max_wait_seconds
        ) + tenacity.wait_random(0, self.initial_seconds)

        def wait(state: tenacity.RetryCallState) -> float:
            error = state.outcome.exception() if state.outcome else None
            asked = getattr(error, "retry_after", None) or 0.0
            return min(max(backoff(state), asked), self.max_seconds)

        return wait  # type: ignore[return-value]

    def _options(self) -> dict[str, object]:
        return {
            "retry": tenacity.retry_if_exception_type(RETRIED),
            "stop": tenacity.stop_after_attempt(self.max_attempts) | tenacity.stop_after_delay(self.max_seconds),
            "wait": self._wait(),
            "reraise": True,
        }

    def sync(self) -> tenacity.Retrying:
        return tenacity.Retrying(**self._options())  # type: ignore[arg-type]

    def asynchronous(self) -> tenacity.AsyncRetrying:
        return tenacity.AsyncRetrying(**self._options())  # type: ignore[arg-type]
