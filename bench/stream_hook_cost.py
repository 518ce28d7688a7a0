"""What `progress` / `output` webhooks add to a streaming request's write (chunks.lua), inside Redis.

    python -m bench.stream_hook_cost

For a request whose stream already holds N chunks, 50 appends of one chunk and a progress report each: plain (no
webhooks), with webhooks whose gates are closed (the common case: within the second), and with both gates open
every time (each append enqueues a `progress` and an `output` delivery with the output so far). Redis's own
`usec_per_call` of EVALSHA (INFO commandstats), on a fresh redis-server of its own.
"""

from __future__ import annotations

import dataclasses
import json
import time

import redis

from queue_service.embedded_redis import RedisServer
from queue_service.store import keys, scripts
from queue_service.store.model import Item

SERVICE = "svc"
HOOKS = json.dumps([{"url": "https://receiver.example/h", "events": ["progress", "output", "completed"]}])
CALLS = 50


def main() -> None:
    server = RedisServer().start()
    try:
        client = redis.Redis.from_url(server.url)
        run = scripts.Scripts(client).run
        for n in (1_000, 10_000):
            rid = f"r{n}"
            item = Item(SERVICE, keys.input_queue(SERVICE).normal, "1-0", 1, rid, b"", {}, 0, "", 1, hooks=HOOKS)
            hooks = scripts.stream_hooks(item, inline_bytes=10**6, start_ms=0)
            assert hooks is not None
            size = 4 * n
            closed = dataclasses.replace(hooks, gap_ms=10**7)
            fill = [("c", "t", "tok ")] * n
            run(scripts.chunks_append(SERVICE, rid, delivery=1, entries=fill, ttl_ms=600_000, hooks=closed,
                                      output_bytes=size, encodings="t"))  # fmt: skip
            rows = []
            for label, with_hooks, gap in (("plain", None, 0), ("gates closed", hooks, 10**7), ("both sent", hooks, 1)):
                client.delete(*(keys.webhook_gate(SERVICE, rid, event) for event in scripts.STREAM_EVENTS))
                these = dataclasses.replace(with_hooks, gap_ms=gap) if with_hooks is not None else None
                if these is not None and gap > 1:  # close the gates first
                    run(scripts.chunks_append(SERVICE, rid, delivery=1, entries=[("c", "t", "x")],
                                              progress_json="{}", ttl_ms=600_000, hooks=these,
                                              output_bytes=size + 1, encodings="t"))  # fmt: skip
                    size += 1
                client.config_resetstat()
                for _ in range(CALLS):
                    size += 1
                    run(scripts.chunks_append(SERVICE, rid, delivery=1, entries=[("c", "t", "x")],
                                              progress_json='{"fraction":0.5}', ttl_ms=600_000, hooks=these,
                                              output_bytes=size, encodings="t"))  # fmt: skip
                    if gap == 1:
                        time.sleep(0.002)  # past the 1 ms gates
                stats = client.info("commandstats").get("cmdstat_evalsha", {})
                rows.append(f"{label} {float(stats.get('usec_per_call', 0)):.0f} us")
            sent = client.xlen(keys.webhooks(SERVICE).stream)
            print(f"stream of {n} chunks, one append: " + "; ".join(rows) + f" (deliveries so far: {sent})")
        client.close()
    finally:
        server.stop()


if __name__ == "__main__":
    main()
