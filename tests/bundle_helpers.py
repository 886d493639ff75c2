"""Shared by the bundle tests: run ``python -m monai.bundle`` as a real subprocess."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path


def monai_bundle(*args: str, cwd: Path, tracking_uri: str | None = None) -> subprocess.CompletedProcess:
    """``python -m monai.bundle ARGS`` in ``cwd``; fails the test with the output tail on a non-zero exit.

    ``tracking_uri`` also goes into ``MLFLOW_TRACKING_URI``: MLflow lets that variable (set for the whole test
    session in conftest.py) win over the handler's ``tracking_uri`` for part of the logging.
    """
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "2")}
    if tracking_uri is not None:
        env["MLFLOW_TRACKING_URI"] = tracking_uri
    done = subprocess.run([sys.executable, "-m", "monai.bundle", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, encoding="utf-8", errors="replace", timeout=300)
    assert done.returncode == 0, f"monai.bundle {args[0]} failed:\n{done.stdout[-2000:]}\n{done.stderr[-4000:]}"
    return done
