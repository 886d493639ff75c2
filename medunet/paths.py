"""Where medunet finds the shared real data and writes its default outputs."""

from __future__ import annotations

import os
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]


def shared_data_dir() -> Path:
    """The folder of real MSD tasks: ``$MEDUNET_SHARED_DATA`` or ``../shared/data`` beside the repo."""
    return Path(os.environ.get("MEDUNET_SHARED_DATA", REPO_ROOT.parent / "shared" / "data"))
