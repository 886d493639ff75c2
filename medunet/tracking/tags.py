"""The tags every medunet run gets: git commit, package versions, device, host, user, command line."""

from __future__ import annotations

import getpass
import platform
import shlex
import subprocess
import sys
from pathlib import Path

from medunet.evaluation.provenance import software_versions
from medunet.paths import REPO_ROOT

# Tracking adds the packages that shape a training run to those the evaluation reports.
_TRACKING_PACKAGES = ("pytorch-ignite", "mlflow")


def git_commit(folders: tuple[Path, ...] | None = None) -> tuple[str, bool] | None:
    """``(commit, dirty)`` of the first git checkout among the medunet source tree and the cwd.

    ``dirty`` is True when tracked files have uncommitted changes. None outside any checkout.
    """
    for folder in folders or (REPO_ROOT, Path.cwd()):
        try:
            commit = subprocess.run(["git", "-C", str(folder), "rev-parse", "HEAD"], capture_output=True,
                                    text=True, encoding="utf-8", errors="replace", timeout=5)
            if commit.returncode != 0:
                continue
            status = subprocess.run(["git", "-C", str(folder), "status", "--porcelain", "--untracked-files=no"],
                                    capture_output=True, text=True, encoding="utf-8", errors="replace", timeout=10)
        except (OSError, subprocess.SubprocessError):
            return None  # no git executable, or a hung file system: the commit stays unknown
        return commit.stdout.strip(), bool(status.stdout.strip())
    return None


def package_versions() -> dict[str, str]:
    """Python and package versions: those of :func:`~medunet.evaluation.provenance.software_versions`,
    plus ignite and mlflow."""
    return software_versions(extra=_TRACKING_PACKAGES)


def device_name(device: str | None = None) -> str:
    """``cpu`` or the GPU's name (``NVIDIA H100 80GB HBM3``) of ``device`` (default: cuda when present)."""
    import torch

    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if str(device).startswith("cuda") and torch.cuda.is_available():
        return torch.cuda.get_device_name(torch.device(device))
    return str(device)


def device_description(device: str | None = None) -> str:
    """:func:`device_name`, with the thread count for the CPU (``CPU (2 threads)``): what a timing depends on."""
    import torch

    name = device_name(device)
    return f"CPU ({torch.get_num_threads()} threads)" if name == "cpu" else name


def run_tags(device: str | None = None) -> dict[str, str]:
    """The automatic tags of a run. MLflow's own keys where it has one (the UI shows those)."""
    try:
        user = getpass.getuser()
    except (KeyError, OSError):  # a container user without a passwd entry
        user = "unknown"
    tags = {
        "mlflow.user": user,
        "mlflow.source.name": sys.argv[0] if sys.argv and sys.argv[0] else "python",
        "mlflow.source.type": "LOCAL",
        "command": shlex.join(sys.argv) if sys.argv else "",
        "host": platform.node() or "unknown",
        "device": device_name(device),
    }
    commit = git_commit()
    if commit is not None:
        tags["mlflow.source.git.commit"], dirty = commit
        tags["git_dirty"] = str(dirty).lower()
    tags.update({f"version.{name}": version for name, version in package_versions().items()})
    return tags
