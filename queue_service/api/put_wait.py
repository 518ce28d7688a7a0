"""`Prefer: wait=<seconds>` on a put: the result in the answer if it is done in time, else 202 with the index.

The put is made first and stands whatever happens next (the client leaving, the wait bound reached): a put
is never lost to its wait. The wait is a long poll of the sink for the request id (`reads.long_poll`: no
Redis connection held while waiting; it counts against the open-wait bounds, and past them the answer is 202
at once).
"""

from __future__ import annotations

import dataclasses

from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response

from queue_service.api.errors import ApiError
from queue_service.api.preamble import QueueCall
from queue_service.api.reads import long_poll
from queue_service.api.waiters import for_request_id
from queue_service.protocol import INDEX_HEADER, LAST_CODE_HEADER, REQUEST_ID_HEADER, TOO_MANY_REQUESTS
from queue_service.store import keys
from queue_service.store.model import PutResult, Read

# The input index of the put, with a 200 that carries the result (whose own index is the sink's).
PUT_INDEX_HEADER = "X-Queueservice-Put-Index"


async def answer_when_done(request: Request, call: QueueCall, put: PutResult, seconds: float) -> Response:
    sink = dataclasses.replace(call, queue="sink", qk=keys.sink_queue(call.service.name))
    store = call.app.store
    applied = {"Preference-Applied": f"wait={seconds:g}"}

    async def read() -> Read:
        return await store.read(
            sink.qk, request_id=put.request_id, max_bytes=call.app.settings.max_answer_bytes, length=1
        )

    first = await read()
    frames = first.frames
    if not frames and seconds > 0:
        try:
            frames, _left = await long_poll(
                request, sink, read, first.last_index, for_request_id(put.request_id), seconds
            )
        except ApiError as exc:
            if exc.status != TOO_MANY_REQUESTS:
                raise
            frames = []  # no room to wait: the put stands, answered as not done yet
    if not frames:
        headers = {REQUEST_ID_HEADER: put.request_id, **applied}
        return PlainTextResponse(str(put.index), status_code=202, headers=headers)
    frame = frames[0]
    headers = {REQUEST_ID_HEADER: put.request_id, INDEX_HEADER: str(frame.index), PUT_INDEX_HEADER: str(put.index)}
    if "lastCode" in frame.tags:
        headers[LAST_CODE_HEADER] = frame.tags["lastCode"]
    return Response(frame.data, media_type="application/octet-stream", headers=headers | applied)
