"""Provenance of an evaluation: what produced the predictions (given by the caller) and where it ran.

The training and inference workflows pass what they know (network, parameter count, checkpoint and its
SHA-256, data, fold, inferer settings, device, inference runtime and peak memory) as a plain dict; this
module adds the software versions, the machine, and the evaluation's own runtime and peak memory.
"""

from __future__ import annotations

import hashlib
import platform
import resource
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from medunet.environment import software_versions

# The fields a clinical-style report lists, in order, even when not given (shown as "not given").
REPORTED_FIELDS = (
    "network",
    "parameters",
    "checkpoint",
    "checkpoint_sha256",
    "data",
    "fold",
    "inferer",
    "device",
    "inference_runtime_s",
    "inference_peak_memory_mb",
)


def file_sha256(path: str | Path, chunk_bytes: int = 1 << 20) -> str:
    """SHA-256 of a file, e.g. a checkpoint, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as stream:
        while chunk := stream.read(chunk_bytes):
            digest.update(chunk)
    return digest.hexdigest()


def this_machine() -> str:
    """A one-line description of the machine the evaluation ran on."""
    return f"{platform.node() or 'unknown host'}, {platform.platform()}, {platform.processor() or platform.machine()}"


def peak_memory_mb() -> float:
    """Peak resident memory in MB of this process and of its finished worker processes together."""
    scale = 1.0 / 1024 if sys.platform != "darwin" else 1.0 / (1024 * 1024)  # ru_maxrss is kB on Linux
    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    return round((own + children) * scale, 1)


def build_provenance(given: Mapping[str, Any] | None, evaluation: Mapping[str, Any]) -> dict[str, Any]:
    """The provenance block: the caller's fields first, then ``evaluation`` settings and the software."""
    provenance: dict[str, Any] = {field: "not given" for field in REPORTED_FIELDS}
    provenance.update(given or {})
    provenance["evaluation"] = dict(evaluation)
    provenance["evaluation_machine"] = this_machine()
    provenance["software"] = software_versions()
    return provenance
