"""Where medunet finds the shared real data, and paths that read the same on every machine."""

from __future__ import annotations

import os
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]


def shared_data_dir() -> Path:
    """The folder of real MSD tasks: ``$MEDUNET_SHARED_DATA`` or ``../shared/data`` beside the repo."""
    return Path(os.environ.get("MEDUNET_SHARED_DATA", REPO_ROOT.parent / "shared" / "data"))


def portable_path(path: str | Path) -> str:
    """``path`` as it reads on any machine with the same layout: relative to the repository when it lies in the
    folder holding the repository (the checkout itself, ``../shared/data`` beside it), else absolute. Run records
    and results pages write paths this way, so they read the same wherever the checkout sits."""
    absolute = Path(os.path.abspath(Path(path).expanduser()))  # links kept: ../shared may be a link to the data
    if not absolute.is_relative_to(REPO_ROOT.parent):
        return str(absolute)
    return os.path.relpath(absolute, REPO_ROOT)


def resolve_portable(text: str | Path) -> Path:
    """The path a :func:`portable_path` names on this machine (relative ones are relative to the repository)."""
    path = Path(text).expanduser()
    return path if path.is_absolute() else (REPO_ROOT / path).resolve()
