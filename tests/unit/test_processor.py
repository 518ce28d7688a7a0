"""Loading a processor from `module:attr` and normalizing what it returns."""

from __future__ import annotations

import re
import sys
import textwrap
from pathlib import Path

import pytest

from queue_service.store.model import Outcome
from workers.context import RequestContext
from workers.processor import (
    APPLICATION_JSON,
    OCTET_STREAM,
    TEXT_PLAIN,
    LoadedProcessor,
    ProcessorLoadError,
    ProcessorResultError,
    load_processor,
)

USER_CODE = """
calls = {"init": 0, "constructed": 0}

class Counting:
    def __init__(self):
        calls["constructed"] += 1

    def initialize(self):
        calls["init"] += 1

    def process(self, data):
        return data.upper()

class WithoutInitialize:
    def process(self, data):
        return data[::-1]

class NeedsArguments:
    def __init__(self, model_dir):
        self.model_dir = model_dir

class BrokenConstructor:
    def __init__(self):
        raise RuntimeError("no GPU here")

class Instance:
    def process(self, data):
        return (data, 201)

instance = Instance()

def shout(data):
    return data.decode() + "!"

not_a_processor = 42

class Namespace:
    helper = staticmethod(shout)
"""


@pytest.fixture
def user_module(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    """A processor module as a user writes it, importable for this test only."""
    name = "user_processors"
    (tmp_path / f"{name}.py").write_text(textwrap.dedent(USER_CODE))
    (tmp_path / "user_broken.py").write_text("import no_such_dependency_qs\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    for module in (name, "user_broken"):
        monkeypatch.delitem(sys.modules, module, raising=False)
    return name


def test_class_is_instantiated_once_and_initialized_once(user_module: str) -> None:
    loaded = load_processor(f"{user_module}:Counting")
    calls = sys.modules[user_module].calls
    loaded.initialize()
    loaded.initialize()
    assert loaded.process(b"abc") == Outcome(b"ABC")
    assert loaded.process(b"def").body == b"DEF"
    assert calls == {"init": 1, "constructed": 1}


def test_process_initializes_when_nobody_did(user_module: str) -> None:
    loaded = load_processor(f"{user_module}:Counting")
    loaded.process(b"x")
    assert sys.modules[user_module].calls["init"] == 1


def test_class_without_initialize_is_accepted(user_module: str) -> None:
    loaded = load_processor(f"{user_module}:WithoutInitialize")
    loaded.initialize()
    assert loaded.process(b"abc").body == b"cba"


def test_object_with_process_method(user_module: str) -> None:
    loaded = load_processor(f"{user_module}:instance")
    assert loaded.process(b"made") == Outcome(b"made", 201)


def test_plain_function(user_module: str) -> None:
    loaded = load_processor(f"{user_module}:shout")
    loaded.initialize()
    assert loaded.process(b"hi") == Outcome(b"hi!", 200, TEXT_PLAIN)


def test_dotted_attribute_after_the_colon(user_module: str) -> None:
    assert load_processor(f"{user_module}:Namespace.helper").process(b"a").body == b"a!"


def test_initialize_failure_is_retried_on_next_call() -> None:
    class Flaky:
        attempts = 0

        def initialize(self) -> None:
            Flaky.attempts += 1
            if Flaky.attempts == 1:
                raise OSError("model file busy")

        def process(self, data: bytes) -> bytes:
            return data

    loaded = LoadedProcessor(Flaky(), "test:Flaky")
    with pytest.raises(OSError):
        loaded.initialize()
    loaded.initialize()
    loaded.initialize()
    assert Flaky.attempts == 2


def _returning(value: object) -> LoadedProcessor:
    return LoadedProcessor(lambda data: value, "test:returning")


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (b"raw", Outcome(b"raw")),
        (bytearray(b"raw"), Outcome(b"raw")),
        (memoryview(b"raw"), Outcome(b"raw")),
        ("héllo", Outcome("héllo".encode(), 200, TEXT_PLAIN)),
        (
            {"text": "héllo", "n": [1, 2]},
            Outcome('{"text":"héllo","n":[1,2]}'.encode(), 200, APPLICATION_JSON),
        ),
        ([1, "日本"], Outcome('[1,"日本"]'.encode(), 200, APPLICATION_JSON)),
        (None, Outcome(b"", 200, OCTET_STREAM)),
        ((b"gone", 404), Outcome(b"gone", 404)),
        (("accepted", 202), Outcome(b"accepted", 202, TEXT_PLAIN)),
        (({"error": "bad"}, 422), Outcome(b'{"error":"bad"}', 422, APPLICATION_JSON)),
        ((None, 204), Outcome(b"", 204)),
    ],
)
def test_return_values_are_normalized(value: object, expected: Outcome) -> None:
    result = _returning(value).process(b"")
    assert result == expected
    assert type(result.body) is bytes


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ((b"x", 99), "status int 99"),
        ((b"x", 600), "100..599"),
        ((b"x", "200"), "status str '200'"),
        ((b"x", True), "status bool True"),
        ((b"x", 200, "extra"), "tuple of 3 items"),
        ((b"x",), "tuple of 1 items"),
        (((b"x", 200), 200), "returned tuple"),
        ({1, 2}, "returned set"),
        (42, "returned int 42"),
        ({"when": object()}, "not valid JSON"),
        ({"score": float("nan")}, "not valid JSON"),
    ],
)
def test_bad_return_values_are_explained(value: object, message: str) -> None:
    with pytest.raises(ProcessorResultError, match=re.escape(message)):
        _returning(value).process(b"")


def test_exceptions_from_process_propagate_unchanged() -> None:
    error = ValueError("expected a number")

    def reject(data: bytes) -> bytes:
        raise error

    with pytest.raises(ValueError) as raised:
        LoadedProcessor(reject, "test:reject").process(b"x")
    assert raised.value is error


@pytest.mark.parametrize(
    ("path", "message"),
    [
        ("workers.examples.Echo", "must be 'module:attr', with a colon"),
        ("workers.examples", "must be 'module:attr', with a colon"),
        (":Echo", "must be 'module:attr'"),
        ("workers.examples:", "must be 'module:attr'"),
        ("no_such_module_qs:Thing", "cannot import module 'no_such_module_qs'.*No module named"),
        ("user_broken:Thing", "cannot import module 'user_broken'.*no_such_dependency_qs"),
        ("{mod}:Missing", "has no attribute 'Missing'"),
        ("{mod}:Namespace.missing", "has no attribute 'Namespace.missing'"),
        ("{mod}:NeedsArguments", r"constructible with no arguments.*NeedsArguments\(model_dir\)"),
        ("{mod}:BrokenConstructor", r"BrokenConstructor\(\) raised RuntimeError: no GPU here"),
        ("{mod}:not_a_processor", "int, which is neither callable nor has a `process` method"),
    ],
)
def test_load_errors_name_the_path(user_module: str, path: str, message: str) -> None:
    path = path.format(mod=user_module)
    with pytest.raises(ProcessorLoadError, match=message) as raised:
        load_processor(path)
    assert repr(path) in str(raised.value)


def test_a_processor_that_takes_a_second_parameter_gets_the_request_context() -> None:
    class WithContext:
        def process(self, data: bytes, context: RequestContext) -> str:
            return f"{context.request_id} {context.path} {context.tags['user']} {data.decode()}"

    context = RequestContext("rid-1", "svc", 7, path="v1/chat", tags={"user": "ana"})
    assert LoadedProcessor(WithContext(), "m:WithContext").process(b"hi", context).body == b"rid-1 v1/chat ana hi"


def test_a_processor_of_the_body_alone_is_called_with_the_body_alone() -> None:
    def upper(data: bytes) -> bytes:
        return data.upper()

    assert LoadedProcessor(upper, "m:upper").process(b"hi", RequestContext("r", "s", 1)).body == b"HI"
