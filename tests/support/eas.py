"""Where the official eas-prediction client lives: the interpreter that interop tests run it with.

The client pins protobuf<=3.20.3, so it runs in a venv of its own and never constrains the server's.
"""

from __future__ import annotations

import fcntl
import os
import shutil
import subprocess
import sys

from tests.support.repo import REPO_ROOT

EAS_VENV = REPO_ROOT / ".cache" / "eas-venv"
_READY_MARKER = EAS_VENV / ".ready"


def _isolated_env() -> dict[str, str]:
    # A PYTHONPATH set for the server's tests would put its protobuf in front of the client's.
    return {key: value for key, value in os.environ.items() if key not in {"PYTHONPATH", "PYTHONHOME"}}


def _run_checked(argv: list[str], what: str) -> None:
    result = subprocess.run(argv, capture_output=True, text=True, env=_isolated_env(), check=False)
    if result.returncode != 0:
        raise RuntimeError(f"{what} failed (exit {result.returncode}):\n{result.stdout}{result.stderr}")


def ensure_eas_venv() -> str:
    """$QS_EAS_PYTHON, else the Python of `.cache/eas-venv`, created with eas-prediction on first use."""
    configured = os.environ.get("QS_EAS_PYTHON")
    if configured:
        return configured
    python = EAS_VENV / "bin" / "python"
    EAS_VENV.parent.mkdir(parents=True, exist_ok=True)
    # Parallel test processes (xdist) wait for whichever one builds the venv, then reuse it.
    with open(EAS_VENV.parent / "eas-venv.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not _READY_MARKER.exists():
            shutil.rmtree(EAS_VENV, ignore_errors=True)  # a half-built venv from an interrupted run
            _run_checked([sys.executable, "-m", "venv", str(EAS_VENV)], "creating the eas-prediction venv")
            _run_checked(
                [str(python), "-m", "pip", "install", "--disable-pip-version-check", "-q", "eas-prediction"],
                "pip install eas-prediction",
            )
            _run_checked([str(python), "-c", "import eas_prediction"], "import eas_prediction")
            _READY_MARKER.touch()
    return str(python)


def run_eas(script: str, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    """Run `python -c script args...` with the official client's Python; the caller checks the result."""
    return subprocess.run(
        [ensure_eas_venv(), "-c", script, *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=_isolated_env(),
        check=False,
    )
