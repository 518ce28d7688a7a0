"""Issue 9, item 6: one answer is bounded in bytes (16 MiB by default), and a sink can be bounded by bytes too."""

from __future__ import annotations

import base64

import pytest

from queue_service.testing import ProcessStartError
from tests.conftest import ServicesFileFactory
from tests.hostile.conftest import ApiWithEnv
from tests.hostile.probes import MIB, memory_mib
from tests.integration.conftest import ECHO

pytestmark = pytest.mark.integration

SINK = "/api/predict/big/sink"
ITEM = b"x" * (4 * MIB)
ITEMS = 25
MAX_ANSWER_BYTES = 16 * MIB  # the default of QS_MAX_ANSWER_BYTES
PEAK_RSS_BOUND_MIB = 400
SINK_MAX_BYTES = 10 * MIB
BIG_ITEMS = {"max_payload_size_kb": 5000}  # room for 4 MiB items


def test_one_get_answers_at_most_16_mib_and_the_api_stays_small(
    api_with_env: ApiWithEnv, services_file: ServicesFileFactory
) -> None:
    service = api_with_env(services_file([{"name": "big", "processor": ECHO, "queue": BIG_ITEMS}]))
    with service.client(timeout=120) as http:
        for _ in range(ITEMS):
            put = http.post(SINK, content=ITEM)
            assert put.status_code == 200, put.text
        got = http.get(SINK, params={"_length_": str(ITEMS)})
    assert got.status_code == 200, got.text[:200]
    frames = got.json()
    carried = sum(len(base64.b64decode(frame["data"])) for frame in frames)
    peak = memory_mib(service.process.pid, "VmHWM")
    print(
        f"\nRELIABILITY get _length_={ITEMS} of {ITEMS} x {len(ITEM) / MIB:.0f} MiB: {len(frames)} items, "
        f"{carried / MIB:.0f} MiB of data answered; API peak RSS {peak:.0f} MiB"
    )
    problems = []
    if not frames or carried > MAX_ANSWER_BYTES:
        problems.append(
            f"one get of _length_={ITEMS} answered {len(frames)} items, {carried / MIB:.0f} MiB of data "
            f"({len(got.content) / MIB:.0f} MiB of JSON); at most {MAX_ANSWER_BYTES // MIB} MiB and at least one item"
        )
    if peak >= PEAK_RSS_BOUND_MIB:
        problems.append(f"the API's peak RSS reached {peak:.0f} MiB (bound {PEAK_RSS_BOUND_MIB})")
    assert not problems, "\n".join(problems)


def test_a_sink_bounded_by_bytes_refuses_the_item_that_would_exceed_it(
    api_with_env: ApiWithEnv, services_file: ServicesFileFactory
) -> None:
    queue = {**BIG_ITEMS, "sink": {"max_bytes": SINK_MAX_BYTES}}
    path = services_file([{"name": "big", "processor": ECHO, "queue": queue}])
    try:
        service = api_with_env(path)
    except ProcessStartError as exc:
        refused = str(exc).splitlines()[-1]  # the API's last log line: why it refused the services file
    else:
        refused = ""
    if refused:  # outside the except: the failure is the refusal, not a traceback of the start
        pytest.fail(f"the API does not start with queue.sink.max_bytes: {SINK_MAX_BYTES}: {refused}")
    with service.client(timeout=60) as http:
        answers = [http.post(SINK, content=ITEM) for _ in range(3)]
    assert [a.status_code for a in answers] == [200, 200, 450], [f"{a.status_code} {a.text}" for a in answers]
    assert "bytes" in answers[2].json()["detail"], answers[2].text
