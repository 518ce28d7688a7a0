"""The example processors, loaded the way a worker loads them."""

from __future__ import annotations

import json
import subprocess
import sys
import time

import pytest

from queue_service.store.model import Outcome
from workers.examples import LanguageId, Sleep
from workers.processor import APPLICATION_JSON, LoadedProcessor, load_processor

# On one xdist worker: the language model (module fixture below) is then loaded once, not once per worker.
pytestmark = pytest.mark.xdist_group("language_model")


def test_echo_returns_the_body_unchanged() -> None:
    echo = load_processor("workers.examples:Echo")
    body = bytes(range(256))
    assert echo.process(body) == Outcome(body)


@pytest.mark.parametrize("body", [b"0.05", b" 0.05\n", b'{"seconds": 0.05}'])
def test_sleep_sleeps_then_reports(body: bytes) -> None:
    sleep = load_processor("workers.examples:Sleep")
    started = time.monotonic()
    result = sleep.process(body)
    assert time.monotonic() - started >= 0.05
    assert result == Outcome(b'{"slept":0.05}', 200, APPLICATION_JSON)


def test_sleep_accepts_zero_and_integers() -> None:
    assert Sleep().process(b'{"seconds": 0}') == {"slept": 0.0}
    assert Sleep().process(b"0") == {"slept": 0.0}


@pytest.mark.parametrize(
    "body",
    [
        b"",
        b"soon",
        b"-1",
        b"nan",
        b"inf",
        b"1e999",
        b"[0.1]",
        b'{"seconds": "0.1"}',
        b'{"seconds": true}',
        b'{"seconds": -0.1}',
        b'{"secs": 0.1}',
        b'{"seconds": ',
        b"\xff\xfe",
    ],
)
def test_sleep_rejects_what_is_not_a_number_of_seconds(body: bytes) -> None:
    with pytest.raises(ValueError, match="non-negative finite number of seconds"):
        Sleep().process(body)


@pytest.fixture(scope="module")
def language_id() -> LoadedProcessor:
    loaded = load_processor("workers.examples:LanguageId")
    loaded.initialize()
    return loaded


@pytest.mark.parametrize(
    ("text", "language"),
    [
        ("The weather is lovely today and we are going for a walk in the park.", "en"),
        ("Le temps est magnifique aujourd'hui et nous allons nous promener dans le parc.", "fr"),
        ("Das Wetter ist heute herrlich und wir gehen im Park spazieren.", "de"),
        ("Hace un tiempo estupendo hoy y vamos a dar un paseo por el parque.", "es"),
    ],
)
def test_language_id_names_the_language(language_id: LoadedProcessor, text: str, language: str) -> None:
    result = language_id.process(text.encode())
    answer = json.loads(result.body)
    assert result.content_type == APPLICATION_JSON
    assert answer["language"] == language
    assert 0.9 < answer["score"] <= 1.0


def test_language_id_reads_json_text(language_id: LoadedProcessor) -> None:
    body = json.dumps({"text": "Ich habe heute keine Zeit, weil ich arbeiten muss."}).encode()
    assert json.loads(language_id.process(body).body)["language"] == "de"


@pytest.mark.parametrize("body", [b"", b"  \n", b"\xff\xfe\x00", b'{"text": 5}', b'{"words": "hi"}', b'{"text": ""}'])
def test_language_id_rejects_empty_or_non_utf8_text(language_id: LoadedProcessor, body: bytes) -> None:
    with pytest.raises(ValueError, match="non-empty UTF-8 text"):
        language_id.process(body)


def test_language_id_builds_its_model_once(monkeypatch: pytest.MonkeyPatch) -> None:
    from langid.langid import LanguageIdentifier

    original = LanguageIdentifier.from_modelstring
    builds: list[int] = []

    def counting_build(*args: object, **kwargs: object) -> LanguageIdentifier:
        builds.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(LanguageIdentifier, "from_modelstring", counting_build)
    loaded = load_processor("workers.examples:LanguageId")
    loaded.initialize()
    loaded.initialize()
    loaded.process(b"one sentence in English")
    loaded.process(b"une phrase en francais")
    assert len(builds) == 1


def test_language_id_without_langid_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "langid", None)
    monkeypatch.setitem(sys.modules, "langid.langid", None)
    with pytest.raises(ImportError, match=r"queue-service\[examples\]"):
        LanguageId().initialize()


def test_examples_module_imports_without_langid() -> None:
    # A fresh interpreter: importing the examples must not import the model's package.
    code = "import sys; sys.modules['langid'] = None; import workers.examples; print('ok')"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    assert done.stdout.strip() == "ok", done.stderr
