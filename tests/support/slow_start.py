"""A processor whose `initialize()` takes minutes, like a large model loading: for stops during start-up.

`initialize()` creates the file named by $QS_TEST_LOADING (so a test knows loading has begun), then sleeps.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

LOADING_ENV = "QS_TEST_LOADING"
LOAD_SECONDS = 600.0


class SlowStart:
    def initialize(self) -> None:
        Path(os.environ[LOADING_ENV]).touch()
        time.sleep(LOAD_SECONDS)

    def process(self, data: bytes) -> bytes:
        return data
