"""Auto-pipelining: script calls made concurrently by many requests go to Redis together, in one round trip.

Under a burst of puts, each put's EVALSHA as its own command cost a pool checkout, a socket write, a read
wake-up and redis-py's per-command wrapping: about a quarter of the API's CPU per put (py-spy, issue 17).
Here a call made while none is in flight goes at once, alone (a lone request waits for nothing: no added
latency); calls made while one is in flight wait for it to end and then all go in one pipeline. Batches
form by themselves under load and are as large as the load.

Each call keeps its own answer: its decoded result, or its own error (a Lua error, QueueFull...), raised in
its caller. A connection error fails the calls of that batch only, as it would have failed each of them.
The order of calls within a batch is the order they were made. A caller that is cancelled leaves its call
in the batch (it may still run, as a cancelled single command may have).
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any, TypeVar

from redis.exceptions import NoScriptError

from queue_service.store.scripts import Call, Scripts

T = TypeVar("T")
# A batch larger than this is split: one huge pipeline would hold Redis (and every other client) longer.
MAX_BATCH = 256


class AutoPipeline:
    """Script calls over one asyncio client, batched while one is in flight (`run` is `Scripts.run_async`)."""

    def __init__(self, scripts: Scripts, client: Any) -> None:
        self._scripts = scripts
        self._client = client
        self._waiting: list[tuple[Call[Any], asyncio.Future[Any]]] = []
        self._busy = False
        self._sending: set[asyncio.Task[None]] = set()  # referenced until done (the loop keeps weak ones)

    async def run(self, call: Call[T]) -> T:
        if not self._busy:
            self._busy = True
            try:
                return await self._scripts.run_async(call)
            finally:
                self._next()
        answer: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._waiting.append((call, answer))
        return call.decode(await answer)

    def _next(self) -> None:
        """The call or batch in flight has ended: send what waited meanwhile, or be idle."""
        if not self._waiting:
            self._busy = False
            return
        batch, self._waiting = self._waiting[:MAX_BATCH], self._waiting[MAX_BATCH:]
        task = asyncio.get_running_loop().create_task(self._send(batch))
        self._sending.add(task)
        task.add_done_callback(self._sending.discard)

    async def _send(self, batch: Sequence[tuple[Call[Any], asyncio.Future[Any]]]) -> None:
        try:
            answers = await raw_many(self._scripts, [call for call, _ in batch], self._client)
        except BaseException as exc:
            for _, answer in batch:
                if not answer.done():
                    answer.set_exception(exc if isinstance(exc, Exception) else ConnectionError("stopped"))
            if not isinstance(exc, Exception):
                raise
        else:
            for (_, answer), raw in zip(batch, answers, strict=True):
                if answer.done():  # its caller was cancelled
                    continue
                if isinstance(raw, Exception):
                    answer.set_exception(raw)
                else:
                    answer.set_result(raw)
        finally:
            self._next()


async def raw_many(scripts: Scripts, calls: Sequence[Call[Any]], client: Any) -> list[Any]:
    """The calls' raw answers (an error in place of a failed one), in one pipeline of EVALSHAs.

    As `Scripts.run_many`: a script Redis does not know (it restarted) is loaded and its calls sent again
    (NOSCRIPT means the call did not run)."""
    answers: list[Any] = [None] * len(calls)
    todo = list(range(len(calls)))
    for attempt in range(2):
        async with client.pipeline(transaction=False) as pipe:
            for i in todo:
                call = calls[i]
                pipe.execute_command("EVALSHA", scripts.sha(call.script), len(call.keys), *call.keys, *call.args)
            raw = await pipe.execute(raise_on_error=False)
        missing = []
        for i, answer in zip(todo, raw, strict=True):
            if isinstance(answer, NoScriptError) and attempt == 0:
                missing.append(i)
            else:
                answers[i] = answer
        if not missing:
            break
        for name in {calls[i].script for i in missing}:
            await client.script_load(scripts.source_of(name))
        todo = missing
    return answers
