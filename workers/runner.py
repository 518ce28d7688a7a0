"""What a worker does with one input item: run the processor, map what happened to an Outcome.

The only code that touches the user's processor. A processor exception becomes status 400 with the
exception's message (the platform's contract); a processor may choose its own status by returning
`(body, status)`.
"""

from __future__ import annotations

import logging

from queue_service.store.model import Item, Outcome
from workers.context import RequestContext
from workers.processor import LoadedProcessor

log = logging.getLogger("queue_service.worker")


class ProcessingTimeout(BaseException):
    """The processor ran longer than `queue.max_processing_seconds`.

    A BaseException so that a processor's own `except Exception` cannot swallow it.
    """


def run_item(processor: LoadedProcessor, item: Item) -> Outcome:
    try:
        return processor.process(item.data, RequestContext.of(item))
    except Exception as exc:  # the user's code failed on this input: 400, and the worker goes on
        message = f"{type(exc).__name__}: {exc}"
        log.info("processor failed on %s: %s", item.request_id, message)
        return Outcome.failure(400, message)


def given_up(item: Item) -> Outcome:
    """The terminal answer of an item delivered queue.max_delivery times: its workers kept stopping."""
    return Outcome.failure(
        500, f"given up after {item.deliveries - 1} deliveries: the worker holding it stopped each time"
    )
