"""The benchmark runs end to end in its quickest mode and prints its table (timings are not checked)."""

from __future__ import annotations

import subprocess
import sys

import pytest

from tests.support.repo import REPO_ROOT

# The benchmark hammers the API: never beside a flood (see tests/conftest.py for the groups).
pytestmark = [pytest.mark.integration, pytest.mark.xdist_group("heavy")]


def run_bench(*argv: str) -> str:
    """Run `python -m <argv>` from the repository's root; its stdout, once it has exited 0."""
    done = subprocess.run([sys.executable, "-m", *argv], cwd=REPO_ROOT, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, f"stdout:\n{done.stdout[-3000:]}\nstderr:\n{done.stderr[-3000:]}"
    return done.stdout


def test_bench_smoke_prints_the_table() -> None:
    out = run_bench("bench.run", "--smoke")
    assert "| # | measurement | unit | ours | baseline | baseline value | ours / baseline | better |" in out
    for section in ("| 1 |", "| 2 |", "| 3 |", "| 4 |", "| 5 |"):
        assert section in out, f"no rows of section {section} in:\n{out[-3000:]}"
    for what in (
        "sync, 1 client(s)",
        "delivery to watch",
        "delivery to long poll",
        "results end to end",
        "puts (one API process)",
        "450 answers",
        "round trips",
        "raw streams, no Lua (the floor)",
        "raw, answer by PUBLISH",
    ):
        assert what in out, f"no {what!r} row in:\n{out[-3000:]}"


def test_bench_batching_smoke_prints_its_table() -> None:
    out = run_bench("bench.batching", "--smoke")
    for what in ("batching on", "lone sync request p50", "worker_threads 1", "the upstream called directly"):
        assert what in out, f"no {what!r} row in:\n{out[-3000:]}"


def test_bench_streaming_smoke_prints_its_table() -> None:
    out = run_bench("bench.streaming", "--smoke")
    for what in ("yield to SSE client p50", "chunks to one SSE client", "yield to client p99", "Redis CPU"):
        assert what in out, f"no {what!r} row in:\n{out[-3000:]}"


def test_bench_worker_cpu_prints_chains_on_against_off() -> None:
    out = run_bench("bench.worker_cpu", "--items", "300", "--rounds", "1")
    for what in ("QS_WORKER_PREFETCH=true", "QS_WORKER_PREFETCH=false", "worker CPU µs/item", "Redis CPU µs/item"):
        assert what in out, f"no {what!r} in:\n{out[-3000:]}"


def test_bench_script_cost_prints_each_scripts_cost_per_item() -> None:
    out = run_bench("bench.script_cost", "--items", "64", "--rounds", "1")
    for what in ("medians over 1 rounds of 64 items", "take (4)", "finish (4)", "deliver (16)", "commit (16)"):
        assert what in out, f"no {what!r} in:\n{out[-3000:]}"
