"""Benchmarks: our overhead against plain RQ, a direct call and a hello-world route (`python -m bench.run`)."""
