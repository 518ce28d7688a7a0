"""Where the official Python clients live: the interpreters that interop tests run them with.

The clients pin protobuf<=3.20.3, so each runs in a venv of its own under `.cache/` and never constrains the
server's: `eas-prediction` (QueueClient, PredictClient), and the PAI SDK `alipai` (Predictor, AsyncPredictor),
which brings its own eas-prediction and many cloud packages the eas venv has no need of.
"""

from __future__ import annotations

import fcntl
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from tests.support.repo import REPO_ROOT


def _isolated_env() -> dict[str, str]:
    # A PYTHONPATH set for the server's tests would put its protobuf in front of the client's.
    return {key: value for key, value in os.environ.items() if key not in {"PYTHONPATH", "PYTHONHOME"}}


def _run_checked(argv: list[str], what: str) -> None:
    result = subprocess.run(argv, capture_output=True, text=True, env=_isolated_env(), check=False)
    if result.returncode != 0:
        raise RuntimeError(f"{what} failed (exit {result.returncode}):\n{result.stdout}{result.stderr}")


@dataclass(frozen=True)
class ClientVenv:
    """A venv under `.cache/` holding one client package, built on first use; `override` names an env var
    that points at an interpreter to use instead."""

    name: str
    package: str
    module: str
    override: str

    @property
    def path(self) -> Path:
        return REPO_ROOT / ".cache" / self.name

    def ensure(self) -> str:
        configured = os.environ.get(self.override)
        if configured:
            return configured
        python = self.path / "bin" / "python"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # Parallel test processes (xdist) wait for whichever one builds the venv, then reuse it.
        with open(self.path.parent / f"{self.name}.lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            ready = self.path / ".ready"
            if not ready.exists():
                shutil.rmtree(self.path, ignore_errors=True)  # a half-built venv from an interrupted run
                _run_checked([sys.executable, "-m", "venv", str(self.path)], f"creating the {self.package} venv")
                _run_checked(
                    [str(python), "-m", "pip", "install", "--disable-pip-version-check", "-q", self.package],
                    f"pip install {self.package}",
                )
                _run_checked([str(python), "-c", f"import {self.module}"], f"import {self.module}")
                ready.touch()
        return str(python)

    def run(self, script: str, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        """Run `python -c script args...` with this client's Python; the caller checks the result."""
        return subprocess.run(
            [self.ensure(), "-c", script, *args],
            capture_output=True,
            text=True,
            timeout=timeout,
            env=_isolated_env(),
            check=False,
        )


EAS = ClientVenv("eas-venv", "eas-prediction", "eas_prediction", "QS_EAS_PYTHON")
PAI = ClientVenv("pai-venv", "alipai", "pai.predictor", "QS_PAI_PYTHON")
EAS_VENV = EAS.path


def ensure_eas_venv() -> str:
    """$QS_EAS_PYTHON, else the Python of `.cache/eas-venv`, created with eas-prediction on first use."""
    return EAS.ensure()


def run_eas(script: str, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    """Run `python -c script args...` with the official client's Python; the caller checks the result."""
    return EAS.run(script, *args, timeout=timeout)


def run_pai(script: str, *args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    """Run `python -c script args...` with the PAI SDK's Python ($QS_PAI_PYTHON, else `.cache/pai-venv`)."""
    return PAI.run(script, *args, timeout=timeout)
