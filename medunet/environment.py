"""Where a figure was made: software versions, the git commit, the device. Read by evaluation reports,
training records, benchmark pages and tracking alike, so it sits below all of them."""

from __future__ import annotations

import importlib.metadata
import platform
import subprocess
from collections.abc import Sequence
from pathlib import Path

from medunet.paths import REPO_ROOT

#: The packages the numbers depend on.
PACKAGES = ("medunet", "monai", "torch", "numpy", "scipy", "SimpleITK", "nibabel", "matplotlib",
            "pytorch-ignite", "mlflow")


def software_versions(extra: Sequence[str] = ()) -> dict[str, str]:
    """Versions of Python and of :data:`PACKAGES` plus ``extra`` (``not installed`` when absent)."""
    versions = {"python": platform.python_version()}
    for package in (*PACKAGES, *extra):
        try:
            versions[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            versions[package] = "not installed"
    return versions


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


def device_name(device: str | None = None) -> str:
    """``cpu`` or the GPU's name (``NVIDIA H100 80GB HBM3``) of ``device`` (default: cuda when present)."""
    import torch

    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if str(device).startswith("cuda") and torch.cuda.is_available():
        return torch.cuda.get_device_name(torch.device(device))
    return str(device)


def cpu_model() -> str:
    """The CPU's model name and the instruction set torch's CPU kernels use (``AMD EPYC ..., AVX2``): CPU peak
    memory and time depend on both (oneDNN picks its blocked layouts by instruction set)."""
    import platform

    import torch

    name = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as cpuinfo:
            name = next((line.split(":", 1)[1].strip() for line in cpuinfo if line.startswith("model name")), name)
    except OSError:
        pass
    return f"{name}, {torch.backends.cpu.get_cpu_capability()}"


def device_description(device: str | None = None) -> str:
    """:func:`device_name`, with the thread count for the CPU (``CPU (2 threads)``): what a timing depends on."""
    import torch

    name = device_name(device)
    return f"CPU ({torch.get_num_threads()} threads)" if name == "cpu" else name
