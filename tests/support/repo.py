"""Where the repository is: the tests read its files (compose.yaml, the Dockerfile) and run commands in it."""

from __future__ import annotations

from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
