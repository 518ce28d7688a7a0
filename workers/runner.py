"""What a worker does with its input items: run the processor, map what happened to one Outcome per item.

The only code that touches the user's processor. A processor exception becomes status 400 with the
exception's message (the platform's contract); a processor may choose its own status by returning
`(body, status)`. In a batch each item keeps its own result: an exception object in an item's place fails
that item only, an exception of the whole call fails every item of the batch.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Coroutine, Sequence
from typing import Any

from queue_service.store.model import EXPIRED_MESSAGE, Item, Outcome
from workers.processor import LoadedProcessor, failure_message
from workers.streaming import context_for

log = logging.getLogger("queue_service.worker")

# Runs a coroutine to its end from a thread that is not the event loop's (the worker's loop thread).
RunCoroutine = Callable[[Coroutine[Any, Any, list[Outcome]]], list[Outcome]]


class ProcessingTimeout(BaseException):
    """The processor ran longer than `queue.max_processing_seconds`.

    A BaseException so that a processor's own `except Exception` cannot swallow it.
    """


def _failed(item: Item, exc: Exception) -> Outcome:
    message = failure_message(exc)
    log.info("processor failed on %s: %s", item.request_id, message)
    return Outcome.failure(400, message)


def run_item(processor: LoadedProcessor, item: Item) -> Outcome:
    try:
        return processor.process(item.data, context_for(item))
    except Exception as exc:  # the user's code failed on this input: 400, and the worker goes on
        return _failed(item, exc)


async def run_item_async(processor: LoadedProcessor, item: Item) -> Outcome:
    try:
        return await processor.process_async(item.data, context_for(item))
    except Exception as exc:
        return _failed(item, exc)


def run_batch(processor: LoadedProcessor, items: Sequence[Item], run_coroutine: RunCoroutine) -> list[Outcome]:
    """One call of the processor's batch method for `items`; one Outcome per item, in order."""
    data = [item.data for item in items]
    contexts = [context_for(item) for item in items]
    try:
        if processor.batch_is_async:
            return run_coroutine(processor.process_batch_async(data, contexts))
        return processor.process_batch(data, contexts)
    except Exception as exc:  # the whole call failed: every item of the batch gets its message
        message = failure_message(exc)
        log.info("processor failed on a batch of %d (%s...): %s", len(items), items[0].request_id, message)
        return [Outcome.failure(400, message)] * len(items)


def expired(item: Item) -> Outcome:
    """The terminal answer of an item whose deadline passed before a worker could run it."""
    if item.deliveries <= 1:
        return Outcome.failure(408, EXPIRED_MESSAGE)
    # Its first worker was lost after starting it; past the deadline it is not started again.
    return Outcome.failure(408, f"{EXPIRED_MESSAGE} again: its worker was lost, and its deadline passed")


def given_up(item: Item) -> Outcome:
    """The terminal answer of an item delivered queue.max_delivery times: its workers kept stopping."""
    return Outcome.failure(
        500, f"given up after {item.deliveries - 1} deliveries: the worker holding it stopped each time"
    )
