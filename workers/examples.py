"""Example processors to start from: Echo, Sleep, BatchSim (a batching stand-in for a GPU), Tokens (streams
like an LLM), and LanguageId, a real small model on the CPU.

Run one with e.g. `--processor workers.examples:LanguageId`. LanguageId needs the `examples`
extra (`pip install 'queue-service[examples]'`); this module imports without it.
"""

from __future__ import annotations

import asyncio
import json
import math
import time
from collections.abc import AsyncIterator
from typing import Any

from workers.context import Progress


class Echo:
    """Returns each request body unchanged."""

    def initialize(self) -> None:
        """Nothing to load."""

    def process(self, data: bytes) -> bytes:
        return data


class Sleep:
    """Sleeps for the seconds in the body ("1.5" or {"seconds": 1.5}), then returns {"slept": x}."""

    EXPECTED = 'a non-negative finite number of seconds, as text ("1.5") or JSON {"seconds": 1.5}'

    def initialize(self) -> None:
        """Nothing to load."""

    def process(self, data: bytes) -> dict[str, float]:
        body = _read_body(data, self.EXPECTED)
        seconds = _seconds(body.get("seconds") if isinstance(body, dict) else _float(body), data)
        # time.sleep, not a busy loop: the worker's SIGALRM job timeout interrupts it.
        time.sleep(seconds)
        return {"slept": seconds}


class BatchSim:
    """A stand-in for a GPU model that batches: one call costs 20 ms plus 1 ms per item, whatever the body.

    With `metadata.rpc.batching` on, the worker calls `process_batch` with up to `max_batch_size` bodies;
    each result is `{"batch": n}`, the size of the batch it ran in. Alone, `process` takes 21 ms.
    """

    CALL_SECONDS = 0.020
    ITEM_SECONDS = 0.001

    def initialize(self) -> None:
        """Nothing to load."""

    def process(self, data: bytes) -> dict[str, int]:
        time.sleep(self.CALL_SECONDS + self.ITEM_SECONDS)
        return {"batch": 1}

    def process_batch(self, data: list[bytes]) -> list[dict[str, int]]:
        time.sleep(self.CALL_SECONDS + self.ITEM_SECONDS * len(data))
        return [{"batch": len(data)}] * len(data)


class Tokens:
    """Streams like an LLM: body "N D" yields N text chunks "t0 ", "t1 ", ... D ms apart (D defaults to 50),
    reporting progress i/N after chunk i. An async generator: one worker process streams `worker_threads`
    requests at once. Its result in the sink is the chunks joined: "t0 t1 ... ".
    """

    EXPECTED = '"N" or "N D": N chunks (0-1000000), D ms apart (0-60000, default 50)'
    MAX_CHUNKS = 1_000_000

    def initialize(self) -> None:
        """Nothing to load."""

    async def process(self, data: bytes) -> AsyncIterator[str | Progress]:
        count, delay_ms = self._parse(data)
        for i in range(count):
            if i and delay_ms:
                await asyncio.sleep(delay_ms / 1000)
            yield f"t{i} "
            yield Progress((i + 1) / count, f"{i + 1}/{count}")

    def _parse(self, data: bytes) -> tuple[int, float]:
        words = _read_body(data, self.EXPECTED)
        parts = words.split() if isinstance(words, str) else []
        try:
            count = int(parts[0])
            delay_ms = float(parts[1]) if len(parts) > 1 else 50.0
        except (IndexError, ValueError):
            raise ValueError(f"Tokens expects {self.EXPECTED}; got {_preview(data)}") from None
        if len(parts) > 2 or not 0 <= count <= self.MAX_CHUNKS or not 0 <= delay_ms <= 60_000:
            raise ValueError(f"Tokens expects {self.EXPECTED}; got {_preview(data)}")
        return count, delay_ms


class LanguageId:
    """Identifies the language of UTF-8 text (or {"text": ...}) with langid.py's bundled model."""

    EXPECTED = 'non-empty UTF-8 text, or JSON {"text": "..."}'

    def __init__(self) -> None:
        self._identifier: Any = None

    def initialize(self) -> None:
        """Load the model (shipped inside the langid package: nothing is downloaded), once."""
        if self._identifier is not None:
            return
        try:
            from langid.langid import LanguageIdentifier, model
        except ImportError as exc:
            raise ImportError("LanguageId needs the langid package: pip install 'queue-service[examples]'") from exc
        # norm_probs=True makes the score a probability in 0..1 instead of a log-likelihood.
        self._identifier = LanguageIdentifier.from_modelstring(model, norm_probs=True)

    def process(self, data: bytes) -> dict[str, Any]:
        body = _read_body(data, self.EXPECTED)
        text = body.get("text") if isinstance(body, dict) else body
        if not isinstance(text, str) or not text.strip():
            raise ValueError(f"LanguageId expects {self.EXPECTED}; got {_preview(data)}")
        self.initialize()
        language, score = self._identifier.classify(text)
        return {"language": language, "score": float(score)}


def _read_body(data: bytes, expected: str) -> str | dict[str, Any]:
    """The body as stripped text, or as a JSON object when it starts with '{'."""
    try:
        text = data.decode("utf-8").strip()
    except UnicodeDecodeError:
        raise ValueError(f"expected {expected}; got bytes that are not UTF-8: {_preview(data)}") from None
    if not text.startswith("{"):
        return text
    try:
        # Text starting with '{' that parses can only be a JSON object.
        body: dict[str, Any] = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(f"expected {expected}; got invalid JSON ({exc}): {_preview(data)}") from None
    return body


def _float(text: str) -> float | None:
    try:
        return float(text)
    except ValueError:
        return None


def _seconds(value: object, data: bytes) -> float:
    # bool is an int subclass, but {"seconds": true} is a mistake, not one second.
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(f"Sleep expects {Sleep.EXPECTED}; got {_preview(data)}")
    seconds = float(value)
    if not math.isfinite(seconds) or seconds < 0:
        raise ValueError(f"Sleep expects {Sleep.EXPECTED}; got {seconds}")
    return seconds


def _preview(data: bytes) -> str:
    return repr(data[:80]) + ("..." if len(data) > 80 else "")
