"""Shared fixtures. Real-data tests skip cleanly when ../shared/data is absent."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from medunet.paths import shared_data_dir

# Under pytest-xdist (the README runs `-n 2`) each worker gets one of the two cores, and so do the processes it
# starts: two workers with 2 threads each on 2 cores run several times slower each, not 2x.
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ["OMP_NUM_THREADS"] = "1"
torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "2")))


def _task_dir(name: str) -> Path:
    path = shared_data_dir() / name
    if not (path / "dataset.json").is_file():
        pytest.skip(f"real data {path} is absent")
    return path


@pytest.fixture
def hippocampus_dir() -> Path:
    return _task_dir("Task04_Hippocampus")


@pytest.fixture
def spleen_dir() -> Path:
    return _task_dir("Task09_Spleen")


@pytest.fixture(autouse=True, scope="session")
def _tracking_store(tmp_path_factory: pytest.TempPathFactory) -> None:
    """Commands track to MLflow by default; in tests, one throw-away SQLite store for the session."""
    import os

    if "MLFLOW_TRACKING_URI" not in os.environ:
        os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{tmp_path_factory.mktemp('mlflow')}/mlruns.db"
