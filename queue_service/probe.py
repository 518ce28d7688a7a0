"""A health probe that costs nothing: one HTTP GET with the standard library, for container healthchecks.

    python -m queue_service.probe [URL]      # default http://127.0.0.1:8000/readyz?scope=api

Exit 0 when the answer is 200, else 1 with one line saying why (`queue-service health` imports the
whole CLI and takes a second or more, which made healthchecks time out while workers loaded models).
"""

from __future__ import annotations

import sys
import urllib.error
import urllib.request

DEFAULT_URL = "http://127.0.0.1:8000/readyz?scope=api"
TIMEOUT_SECONDS = 3.0


def main(argv: list[str]) -> int:
    url = argv[0] if argv else DEFAULT_URL
    try:
        with urllib.request.urlopen(url, timeout=TIMEOUT_SECONDS) as answer:
            status = answer.status
    except urllib.error.HTTPError as exc:
        print(f"not ready: {url} answered {exc.code} {exc.read()[:300].decode(errors='replace')}", file=sys.stderr)
        return 1
    except OSError as exc:
        print(f"not ready: {url}: {exc}", file=sys.stderr)
        return 1
    return 0 if status == 200 else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
