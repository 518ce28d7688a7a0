"""What a worker does with one input item: run the processor, map the outcome to a status.

The only code that touches the user's processor. A processor exception becomes status 400
with the exception's message (the platform's contract); a processor may choose its own status
by returning `(body, status)`.
"""

from __future__ import annotations

import logging

from queue_service.consumer import Outcome, TakenItem
from workers.processor import LoadedProcessor

log = logging.getLogger("queue_service.worker")


class ProcessingTimeout(BaseException):
    """The processor ran longer than `queue.max_processing_seconds`.

    A BaseException so that a processor's own `except Exception` cannot swallow it.
    """


def run_item(processor: LoadedProcessor, item: TakenItem) -> Outcome:
    try:
        result = processor.process(item.data)
    except Exception as exc:  # the user's code failed on this input: 400, and the worker goes on
        message = f"{type(exc).__name__}: {exc}"
        log.info("processor failed on %s: %s", item.request_id, message)
        return Outcome(body=message.encode(), status=400, content_type="text/plain; charset=utf-8", message=message)
    return Outcome(body=result.body, status=result.status, content_type=result.content_type)
