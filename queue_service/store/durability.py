"""Waiting for replicas: a write acknowledged only once a replica has it (`queue.durability: replicated`).

Redis replicates asynchronously, so a primary that dies can take its last writes with it. `WAIT n timeout`
blocks until n replicas confirm everything the *same connection* wrote, so the script and the WAIT go in one
pipeline (one connection, in order). The API does it after a put (here); a worker's finishes end their pipeline
with a WAIT (`Scripts.run_many`).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, TypeVar

import redis
import redis.asyncio

from queue_service.store.model import NotReplicated
from queue_service.store.scripts import Call, Scripts

T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class Replicated:
    """How many replicas must confirm a service's writes, and for how long to wait for them."""

    replicas: int
    timeout_ms: int


# Service name -> its rule; services not named are acknowledged once the primary has the write.
Durability = Mapping[str, Replicated]


def refuse_on_a_cluster(client: Any, durability: Durability) -> None:
    """A cluster client sends WAIT to every primary, not on the connection that wrote: `replicated` cannot be
    kept there yet, so a services file that asks for it on a cluster is refused at start, not silently weak."""
    if durability and isinstance(client, (redis.asyncio.RedisCluster, redis.RedisCluster)):
        raise ValueError(
            f"queue.durability: replicated ({', '.join(sorted(durability))}) is not supported on a Redis Cluster "
            "yet; use it with a Sentinel-watched primary"
        )


def _checked(acknowledged: Any, rule: Replicated) -> None:
    if int(acknowledged) < rule.replicas:
        raise NotReplicated(int(acknowledged), rule.replicas, rule.timeout_ms)


async def run_replicated_async(scripts: Scripts, redis: Any, call: Call[T], rule: Replicated) -> T:
    """Run `call` on the API's asyncio client and wait for `rule.replicas` to have it; NotReplicated if not."""
    async with redis.pipeline(transaction=False) as pipe:
        await scripts.queue_async(call, pipe)
        pipe.wait(rule.replicas, rule.timeout_ms)
        raw, acknowledged = await pipe.execute()
    result = call.decode(raw)  # a refusal (QueueFull...) wrote nothing: no replica needed
    _checked(acknowledged, rule)
    return result
