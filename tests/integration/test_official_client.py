"""The official `eas-prediction` QueueClient, unchanged, against our API and rq workers.

The client pins protobuf<=3.20.3, so each story runs as a script in the client's own venv
(`tests/support/eas.py`) and prints JSON for the test to check.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import ServicesFileFactory
from tests.integration.conftest import ECHO, ApiFactory, WorkerFactory
from tests.support.eas import run_eas

pytestmark = pytest.mark.integration

TOKEN = "eas-client-token-5b1e"
ACCEPTANCE_ITEMS = 2000
# How long the watcher waits for all of them: ~8 s on a quiet machine; the limit only ends a run that lost some.
WATCH_SECONDS = 180

CLIENTS = """
import json, sys
from eas_prediction import QueueClient

url, token = sys.argv[1], sys.argv[2]


def client(name):
    queue = QueueClient(url, name)
    queue.set_token(token)
    queue.set_timeout(30000)
    queue.init()
    return queue


inq, sink, idle = client("echo"), client("echo/sink"), client("idle")
"""

STORY = (
    CLIENTS
    + """
import time
out = {}
index, request_id = inq.put(b"hello", tags={"origin": "eas"})
out["put"] = [index, request_id]
[df] = sink.get(request_id=request_id, timeout="5s")  # auto_delete=True by default
out["get"] = {"data": df.data.decode(), "tags": dict(df.tags)}
out["get_again"] = len(sink.get(request_id=request_id, timeout="0s"))
out["attributes"] = {"input": inq.attributes(), "sink": sink.attributes()}

# Search: the position of items waiting in a queue that no worker serves.
waiting = [int(idle.put(("waiting %d" % i).encode())[0]) for i in range(3)]
out["search"] = [idle.search(i) for i in waiting]

# Watch with commit: window 2, no auto commit, commit each index.
request_ids = [inq.put(("item %d" % i).encode())[1] for i in range(6)]
deadline = time.time() + 20
while len(sink.get(index=0, length=10, timeout="1s", auto_delete=False)) < 6 and time.time() < deadline:
    time.sleep(0.05)
sink_indexes = [df.index for df in sink.get(index=0, length=10, timeout="0s", auto_delete=False)]
watcher = sink.watch(0, 2, auto_commit=False)
received, uncommitted, held = [], [], None
for df in watcher.run():
    received.append(df.tags["requestId"])
    uncommitted.append(df.index)
    if len(received) == 2:  # the window is full: nothing more comes until we commit
        time.sleep(0.5)
        held = [sink.search(i) for i in sink_indexes]
    if len(received) >= 2:
        for i in uncommitted:
            sink.commit(i)
        uncommitted = []
    if len(received) == len(request_ids):
        break
watcher.close()
out["watch"] = {"put": request_ids, "received": received, "held": held, "uid": sink.uid}
out["sink_after"] = sink.attributes()
print(json.dumps(out))
"""
)

ACCEPTANCE = (
    CLIENTS
    + """
import threading, time
count = int(sys.argv[3])
received = []
watcher = sink.watch(0, 5, auto_commit=True)


def watch():
    for df in watcher.run():
        received.append(df.tags["requestId"])
        if len(received) >= count:
            return


thread = threading.Thread(target=watch, daemon=True)
thread.start()
while sink.watch_sock is None:
    time.sleep(0.01)
started = time.monotonic()
put_ids = [inq.put(("%d" % i).encode())[1] for i in range(count)]
puts_done = time.monotonic() - started
thread.join(float(sys.argv[4]))
elapsed = time.monotonic() - started
print(json.dumps({"put": put_ids, "received": received, "elapsed": elapsed, "puts": puts_done}))
"""
)


def eas_services(services_file: ServicesFileFactory) -> Path:
    return services_file(
        [
            # Room for the whole acceptance burst: this story is about throughput, not admission.
            {"name": "echo", "processor": ECHO, "token": TOKEN, "metadata": {"rpc": {"max_queue_size": 5000}}},
            {"name": "idle", "processor": ECHO, "token": TOKEN},
        ]
    )


def run_story(script: str, url: str, *args: str, timeout: float = 90) -> dict[str, Any]:
    done = run_eas(script, url, TOKEN, *args, timeout=timeout)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_official_client_puts_gets_searches_and_watches_with_commit(
    api: ApiFactory, worker: WorkerFactory, services_file: ServicesFileFactory, eas_python: str
) -> None:
    path = eas_services(services_file)
    service = api(path)
    worker("echo", services_file=path)
    out = run_story(STORY, service.url)

    index, request_id = out["put"]
    assert int(index) >= 1
    assert out["get"] == {"data": "hello", "tags": {"origin": "eas", "requestId": request_id}}
    assert out["get_again"] == 0, "get deletes what it returned by default"

    attrs = out["attributes"]
    assert attrs["input"]["meta.name"] == "echo"
    assert attrs["sink"]["meta.name"] == "echo/sink"
    assert int(attrs["input"]["consumers.stats.total"]) == 1
    assert attrs["input"]["meta.header.group"] == "X-EAS-QueueService-Redis-Gid"
    assert attrs["input"]["stream.length"] == "0", "the input item is gone once its result is written"
    assert int(attrs["sink"]["stream.lastIndex"]) >= 1

    assert [(s["ConsumerId"], s["IsPending"], s["WaitCount"]) for s in out["search"]] == [
        ("", False, 0),
        ("", False, 1),
        ("", False, 2),
    ]

    watch = out["watch"]
    assert sorted(watch["received"]) == sorted(watch["put"])
    # Window 2 and nothing committed yet: exactly two results held by this client, the rest waiting.
    held = [s for s in watch["held"] if s["IsPending"]]
    assert len(held) == 2 and {s["ConsumerId"] for s in held} == {watch["uid"]}
    assert out["sink_after"]["stream.length"] == "0", "every committed result is gone from the sink"


@pytest.mark.xdist_group("heavy")  # CPU-heavy: never beside a flood
def test_a_watcher_receives_exactly_the_2000_results_of_2000_puts_served_by_2_workers(
    api: ApiFactory, worker: WorkerFactory, services_file: ServicesFileFactory, eas_python: str
) -> None:
    path = eas_services(services_file)
    service = api(path)
    worker("echo", services_file=path)
    worker("echo", services_file=path)
    # How long it takes is the machine's speed as much as ours: printed, not asserted (bench/ measures it).
    out = run_story(ACCEPTANCE, service.url, str(ACCEPTANCE_ITEMS), str(WATCH_SECONDS), timeout=WATCH_SECONDS + 60)
    print(
        f"\nTIMING {ACCEPTANCE_ITEMS} puts by the official client in {out['puts']:.2f} s; "
        f"{len(out['received'])} results watched after {out['elapsed']:.2f} s"
    )
    assert len(out["put"]) == ACCEPTANCE_ITEMS
    assert len(out["received"]) == ACCEPTANCE_ITEMS, "each result exactly once"
    assert set(out["received"]) == set(out["put"])
