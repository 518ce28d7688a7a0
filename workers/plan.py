"""How a worker process runs each of its services: one item at a time, batches, or many requests at once.

- `one`: a sync processor, one item at a time in the main thread (a GPU model, CPU code that is not
  thread-safe): `queue-service up` starts `worker_threads` processes of it.
- `batch`: `metadata.rpc.batching` on: up to `max_batch_size` items per call of `process_batch`, one batch
  at a time in the main thread (`worker_threads` processes, like `one`).
- `concurrent`: an async `process`, an upstream, or a sync processor that declares `thread_safe = True`:
  one process holds `worker_threads` requests at once (`QS_WORKER_THREADS` sets it for one worker).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from queue_service.config import ServiceConfig
from workers.processor import LoadedProcessor, check_batching, check_single, load_processor

Mode = Literal["one", "batch", "concurrent"]


@dataclass(frozen=True, slots=True)
class ServicePlan:
    service: ServiceConfig
    processor: LoadedProcessor
    mode: Mode
    capacity: int  # requests held at once (concurrent), else 1
    want: int  # items asked for in one take

    @property
    def name(self) -> str:
        return self.service.name


def mode_of(processor: LoadedProcessor, batching: bool) -> Mode:
    if batching:
        return "batch"
    return "concurrent" if processor.concurrent else "one"


def plan_service(service: ServiceConfig, worker_threads: int | None = None) -> ServicePlan:
    """Load the service's processor (or build its upstream processor) and decide how it runs; a processor
    that cannot serve the service's settings is a ProcessorLoadError naming the key."""
    threads = worker_threads or service.rpc.worker_threads
    if service.upstream is not None:
        from workers.upstream import Upstream  # httpx, only for workers that forward

        processor = LoadedProcessor(Upstream(service.upstream, threads), f"upstream {service.upstream.url}")
    else:
        processor = load_processor(service.processor_path)
    if service.rpc.batching:
        check_batching(processor)
    else:
        check_single(processor)
    mode = mode_of(processor, service.rpc.batching)
    if mode == "concurrent":
        return ServicePlan(service, processor, mode, threads, threads)
    if mode == "batch":
        return ServicePlan(service, processor, mode, 1, service.rpc.max_batch_size)
    return ServicePlan(service, processor, mode, 1, 1)
