"""The Processor protocol, and loading one from `module:attr` into a LoadedProcessor.

A processor is the user's code that a worker runs on each request body. It is loaded once per
worker process: the model is loaded in `initialize()`, never per request.
"""

from __future__ import annotations

import importlib
import inspect
import json
import reprlib
from collections.abc import Callable
from typing import Protocol

from queue_service.store.model import OCTET_STREAM, TEXT_PLAIN, Outcome
from workers.context import RequestContext
from workers.streaming import collect, collect_async

APPLICATION_JSON = "application/json"


class Processor(Protocol):
    """What a user's processor class looks like (plain `process(data)` functions are accepted too).

    Optional, beside these: `async def process` (the worker then holds several requests at once on one event
    loop), `thread_safe = True` (a sync `process` run in `worker_threads` threads of one process),
    `process_batch(list[bytes]) -> list[result]` (sync or async; used when `metadata.rpc.batching` is on),
    `accepts_batches = True` (no `process_batch`: `process` itself takes the list), and `healthy() -> bool`
    (the worker counts as live for the service only while it is true; called once a second: keep it cheap).
    """

    def initialize(self) -> None: ...

    def process(self, data: bytes) -> bytes | tuple[bytes, int]: ...


class ProcessorLoadError(Exception):
    """The import path does not name a usable processor; the worker cannot start."""


class ProcessorResultError(Exception):
    """The processor returned something that is not a result: a bug in the processor, not the request."""


class LoadedProcessor:
    """A processor as a worker uses it: initialized once, its results normalized to an Outcome."""

    __slots__ = (
        "_batch",
        "_batch_wants_context",
        "_healthy",
        "_initialize",
        "_initialized",
        "_process",
        "_wants_context",
        "accepts_batches",
        "batch_is_async",
        "batch_only",
        "is_async",
        "path",
        "streams",
        "target",
        "thread_safe",
    )

    def __init__(self, target: object, path: str) -> None:
        self.target = target
        self.path = path
        method = getattr(target, "process", None)
        batch_only = method is None and callable(getattr(target, "process_batch", None))
        if callable(method) or batch_only:
            initialize = getattr(target, "initialize", None)
            if initialize is not None and not callable(initialize):
                raise ProcessorLoadError(f"processor {path!r}: `initialize` is not callable")
            self._process: Callable[..., object] = method if callable(method) else self._no_process
            self._initialize: Callable[[], object] | None = initialize
        elif callable(target):
            self._process = target
            self._initialize = None
        else:
            raise ProcessorLoadError(
                f"processor {path!r} names a {type(target).__name__}, which is neither callable "
                "nor has a `process` method"
            )
        self._initialized = False
        self.batch_only = batch_only
        self._wants_context = _takes_two_arguments(self._process)
        # A generator `process` streams (workers/streaming.py); an async generator runs on the event loop.
        self.streams = inspect.isgeneratorfunction(self._process) or inspect.isasyncgenfunction(self._process)
        self.is_async = inspect.iscoroutinefunction(self._process) or inspect.isasyncgenfunction(self._process)
        # Declarations are read as `is True`: a stray truthy attribute must not change how the code runs.
        self.thread_safe = getattr(target, "thread_safe", False) is True
        self.accepts_batches = getattr(target, "accepts_batches", False) is True
        batch = getattr(target, "process_batch", None)
        if batch is not None and not callable(batch):
            raise ProcessorLoadError(f"processor {path!r}: `process_batch` is not callable")
        if batch is None and self.accepts_batches:
            batch = self._process  # `process` itself takes the list
        self._batch: Callable[..., object] | None = batch
        self._batch_wants_context = batch is not None and _takes_two_arguments(batch)
        self.batch_is_async = batch is not None and inspect.iscoroutinefunction(batch)
        healthy = getattr(target, "healthy", None)
        self._healthy: Callable[[], object] | None = healthy if callable(healthy) else None

    @property
    def concurrent(self) -> bool:
        """Whether one process may hold several requests of it at once (async, or declared thread-safe)."""
        return self.is_async or self.thread_safe

    @property
    def can_batch(self) -> bool:
        return self._batch is not None

    def initialize(self) -> None:
        """Run the processor's `initialize()` once; later calls do nothing."""
        if self._initialized:
            return
        if self._initialize is not None:
            self._initialize()
        # Set only after success, so a failed load is retried rather than silently skipped.
        self._initialized = True

    def healthy(self) -> bool:
        """What the processor's `healthy()` says (True without one); its exception counts as not healthy."""
        if self._healthy is None:
            return True
        try:
            return bool(self._healthy())
        except Exception:
            return False

    def process(self, data: bytes, context: RequestContext | None = None) -> Outcome:
        """Run a sync processor on one request body (and its context, if it takes one); its own exceptions propagate."""
        # Initializing here too means no caller can run a processor whose model is not loaded.
        self.initialize()
        value = self._call(data, context)
        if inspect.isgenerator(value):
            return collect(value, context)
        return normalize_result(value)

    async def process_async(self, data: bytes, context: RequestContext | None = None) -> Outcome:
        """Run an async processor (`async def process`) on one request body."""
        self.initialize()
        value = self._call(data, context)
        if inspect.isasyncgen(value):
            return await collect_async(value, context)
        if inspect.isgenerator(value):
            return collect(value, context)
        if inspect.isawaitable(value):
            value = await value
        return normalize_result(value)

    def _no_process(self, data: bytes) -> object:
        raise ProcessorResultError(f"processor {self.path!r} has only `process_batch`: it runs with batching on")

    def _call(self, data: bytes, context: RequestContext | None) -> object:
        if self._wants_context:
            return self._process(data, context)
        return self._process(data)

    def process_batch(self, data: list[bytes], contexts: list[RequestContext]) -> list[Outcome]:
        """Run a sync batch call: one Outcome per item (an item's failure in its place, the others kept)."""
        self.initialize()
        return batch_outcomes(self._call_batch(data, contexts), len(data))

    async def process_batch_async(self, data: list[bytes], contexts: list[RequestContext]) -> list[Outcome]:
        self.initialize()
        value = self._call_batch(data, contexts)
        if inspect.isawaitable(value):
            value = await value
        return batch_outcomes(value, len(data))

    def _call_batch(self, data: list[bytes], contexts: list[RequestContext]) -> object:
        if self._batch is None:
            raise ProcessorLoadError(f"processor {self.path!r} takes no batches")
        if self._batch_wants_context:
            return self._batch(data, contexts)
        return self._batch(data)


def batch_outcomes(value: object, size: int) -> list[Outcome]:
    """A batch call's results, one Outcome per item: an exception object (or a bad result) in an item's place
    fails that item with 400; a list of the wrong length is a bug of the call, raised for the whole batch."""
    if not isinstance(value, list | tuple) or len(value) != size:
        got = f"{len(value)} results" if isinstance(value, list | tuple) else _show(value)
        raise ProcessorResultError(f"process_batch returned {got} for a batch of {size}; expected a list of {size}")
    outcomes = []
    for each in value:
        if isinstance(each, BaseException):
            outcomes.append(Outcome.failure(400, failure_message(each)))
            continue
        try:
            outcomes.append(normalize_result(each))
        except ProcessorResultError as exc:
            outcomes.append(Outcome.failure(400, failure_message(exc)))
    return outcomes


def failure_message(exc: BaseException) -> str:
    """The message of a 400 for a processor's exception (the platform's contract: its type and text)."""
    return f"{type(exc).__name__}: {exc}"


def _takes_two_arguments(function: Callable[..., object]) -> bool:
    """Whether `function(data, context)` is how to call it (a second parameter, or *args)."""
    try:
        parameters = list(inspect.signature(function).parameters.values())
    except (TypeError, ValueError):  # some builtins have no signature: call them with the body only
        return False
    positional = [p for p in parameters if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    return len(positional) >= 2 or any(p.kind is p.VAR_POSITIONAL for p in parameters)


def normalize_result(value: object) -> Outcome:
    """Turn what a processor returned into an Outcome, or raise ProcessorResultError."""
    if isinstance(value, Outcome):  # the built-in processors choose the content type too
        return value
    if isinstance(value, tuple):
        if len(value) != 2:
            raise ProcessorResultError(
                f"processor returned a tuple of {len(value)} items {_show(value)}; expected (body, status)"
            )
        body, status = value
        # bool is an int subclass, but `(body, True)` is a bug, not status 1.
        if not isinstance(status, int) or isinstance(status, bool) or not 100 <= status <= 599:
            raise ProcessorResultError(
                f"processor returned status {_show(status)}; expected an int HTTP status in 100..599"
            )
        encoded, content_type = _encode(body)
        return Outcome(encoded, status, content_type)
    encoded, content_type = _encode(value)
    return Outcome(encoded, 200, content_type)


def _encode(value: object) -> tuple[bytes, str]:
    if isinstance(value, bytes | bytearray | memoryview):
        return bytes(value), OCTET_STREAM
    if isinstance(value, str):
        return value.encode(), TEXT_PLAIN
    if isinstance(value, dict | list):
        try:
            # ensure_ascii=False: clients get readable UTF-8, not \uXXXX escapes; NaN is not JSON.
            text = json.dumps(value, ensure_ascii=False, separators=(",", ":"), allow_nan=False)
        except (TypeError, ValueError) as exc:
            raise ProcessorResultError(f"processor returned {_show(value)}, not valid JSON: {exc}") from exc
        return text.encode(), APPLICATION_JSON
    if value is None:
        return b"", OCTET_STREAM
    raise ProcessorResultError(
        f"processor returned {_show(value)}; expected bytes, str, dict, list, None or (body, status)"
    )


def _show(value: object) -> str:
    return f"{type(value).__name__} {reprlib.repr(value)}"


def load_processor(path: str) -> LoadedProcessor:
    """Import `module:attr` (a class, an object with `process`, or a function) as a LoadedProcessor."""
    module_name, colon, attr_path = path.partition(":")
    if not colon or not module_name or not attr_path or ":" in attr_path:
        raise ProcessorLoadError(
            f"processor path {path!r} must be 'module:attr', with a colon between the module and the "
            "attribute (e.g. 'workers.examples:Echo')"
        )
    try:
        module = importlib.import_module(module_name)
    except Exception as exc:  # any failure while importing user code, not only ImportError
        raise ProcessorLoadError(
            f"processor {path!r}: cannot import module {module_name!r}: {type(exc).__name__}: {exc}"
        ) from exc
    target: object = module
    for name in attr_path.split("."):
        try:
            target = getattr(target, name)
        except AttributeError:
            raise ProcessorLoadError(f"processor {path!r}: {module_name!r} has no attribute {attr_path!r}") from None
    if inspect.isclass(target):
        target = _instantiate(target, path)
    return LoadedProcessor(target, path)


def check_single(processor: LoadedProcessor) -> None:
    """A processor with only `process_batch` needs `metadata.rpc.batching` on: refused at start-up otherwise."""
    if processor.batch_only:
        raise ProcessorLoadError(
            f"processor {processor.path!r} has `process_batch` but no `process`: turn metadata.rpc.batching on "
            "for its service, or add `process`"
        )


def check_batching(processor: LoadedProcessor) -> None:
    """A service with `metadata.rpc.batching` on needs a processor that takes batches: refused at start-up."""
    if not processor.can_batch:
        raise ProcessorLoadError(
            f"metadata.rpc.batching is on, but processor {processor.path!r} has no `process_batch` and does not "
            "declare `accepts_batches = True` (then its `process` gets the list of bodies); add one, or turn "
            "batching off"
        )


def _instantiate(cls: type, path: str) -> object:
    try:
        signature = inspect.signature(cls)
    except (TypeError, ValueError):  # some builtins have no signature; just try the call
        signature = None
    if signature is not None:
        try:
            signature.bind()
        except TypeError:
            raise ProcessorLoadError(
                f"processor {path!r}: class {cls.__name__} must be constructible with no arguments, "
                f"but its signature is {cls.__name__}{signature}"
            ) from None
    try:
        return cls()
    except Exception as exc:
        raise ProcessorLoadError(f"processor {path!r}: {cls.__name__}() raised {type(exc).__name__}: {exc}") from exc
