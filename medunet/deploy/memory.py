"""Whole-volume inference under a memory budget (``medunet infer --memory-budget 2GiB``).

For a CT volume the stitching buffers (classes x voxels float32, plus the count map) of a plain
``SlidingWindowInferer`` can outweigh the network itself. Under a budget, inference runs the streaming pipeline of
:mod:`medunet.deploy.runner` instead (numpy preprocessing, stitching one row of window positions at a time into
a ``classes x X x Y x roi_z`` accumulator reduced to uint8 labels slab by slab, inversion on uint8), and
:func:`plan_memory` picks the largest window batch and the accumulator dtype (float32, else float16) whose
estimated peak fits. The estimate is built from the case's header (shape, spacing), the process's resident
memory when the case starts, and the network's own working memory per window, measured once by running it
(the peak resident set is reset through ``/proc/self/clear_refs`` on Linux). A budget no setting fits is refused
with the smallest one that would.

The budget is the whole process's peak resident memory (``VmHWM``): Python, the libraries and the weights count.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from medunet.errors import MedunetError

_UNITS = {"": 1, "b": 1, "k": 1000, "kb": 1000, "m": 1000**2, "mb": 1000**2, "g": 1000**3, "gb": 1000**3,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40, "t": 1000**4, "tb": 1000**4}
_SIZE = re.compile(r"^\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*$")


def parse_memory_size(text: str) -> int:
    """Bytes of ``"2GiB"``, ``"512MiB"``, ``"1.5G"`` (powers of 1000 for k/M/G, of 1024 for KiB/MiB/GiB)."""
    match = _SIZE.match(str(text))
    unit = match.group(2).lower() if match else None
    if not match or unit not in _UNITS or float(match.group(1)) <= 0:
        raise MedunetError(f"{text!r} is not a memory size. Fix: write e.g. 2GiB, 1500MiB or 1.5G.")
    return int(float(match.group(1)) * _UNITS[unit])


def format_size(size: float) -> str:
    """``size`` bytes as MiB or GiB, rounded up so that it can be passed back as a budget."""
    return f"{math.ceil(size / 2**30 * 100) / 100:.2f}GiB" if size >= 2**30 else f"{math.ceil(size / 2**20)}MiB"


def _status(field: str) -> int:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # peak only, the best there is


def resident_bytes() -> int:
    """The process's resident memory now (``VmRSS``)."""
    return _status("VmRSS")


def peak_resident_bytes() -> int:
    """The process's peak resident memory so far (``VmHWM``)."""
    return _status("VmHWM")


def reset_peak() -> bool:
    """Reset ``VmHWM`` to the current resident set (Linux); False where that is not possible."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def window_working_bytes(predict: Callable[[np.ndarray], np.ndarray], window_shape: Sequence[int],
                         batches: Sequence[int] = (1, 2)) -> tuple[float, float]:
    """``(fixed, per_window)`` bytes the network needs beyond the resident set, measured on zero windows.

    Falls back to 40x the window's bytes per window where the peak cannot be reset.
    """
    measured = []
    for batch in batches:
        windows = np.zeros((batch, *window_shape), dtype=np.float32)
        if not reset_peak():
            return 0.0, 40.0 * windows.nbytes
        before = resident_bytes()
        predict(windows)
        measured.append(max(peak_resident_bytes() - before, 0))
    per_window = max((measured[-1] - measured[0]) / (batches[-1] - batches[0]), measured[0] / batches[0] / 2)
    return max(measured[0] - per_window * batches[0], 0.0), per_window


@dataclass(frozen=True)
class MemoryPlan:
    """What :func:`plan_memory` chose for one case, and its estimated peak.

    Args:
        sw_batch_size: windows per forward pass.
        accumulate_dtype: ``"float32"`` or ``"float16"`` (the stitching accumulator).
        estimate: the estimated peak resident bytes of the process.
        parts: the estimate of each phase (``preprocess``, ``stitch``, ``postprocess``), bytes.
    """

    sw_batch_size: int
    accumulate_dtype: str
    estimate: float
    parts: dict[str, float]


def case_estimate(
    base: float,
    source_shape: Sequence[int],
    network_shape: Sequence[int],
    in_channels: int,
    num_classes: int,
    roi_size: Sequence[int],
    batch: int,
    accumulate_itemsize: int,
    window: tuple[float, float],
    source_itemsize: int = 8,
) -> dict[str, float]:
    """Estimated peak bytes of each phase of the streaming pipeline for one case.

    Args:
        base: resident bytes before the case.
        source_shape: the image's spatial shape.
        network_shape: its shape on the network's grid (after resampling, before the crop: an upper bound).
        in_channels: image channels.
        num_classes: output classes.
        roi_size: the window size.
        batch: windows per forward pass.
        accumulate_itemsize: 4 (float32) or 2 (float16).
        window: ``(fixed, per_window)`` working bytes of the network (:func:`window_working_bytes`).
        source_itemsize: bytes per voxel of the stored image (8 covers float64 files).
    """
    source = float(np.prod(source_shape))
    grid = float(np.prod([max(s, r) for s, r in zip(network_shape, roi_size)]))
    largest = max(source, grid)
    roi = float(np.prod(roi_size))
    slab = float(np.prod([max(s, r) for s, r in zip(network_shape[:2], roi_size[:2])])) * roi_size[2]
    preprocess = base + source * source_itemsize + 4.0 * in_channels * (2 * source + 4 * largest)
    stitch = (base + 4.0 * in_channels * 2 * grid + grid  # the input (and its padded copy), the labels
              + 2 * num_classes * slab * accumulate_itemsize + slab * 8  # accumulator, its shift, the argmax
              + batch * roi * 4 * (in_channels + 3 * num_classes) + window[0] + window[1] * batch)
    postprocess = base + 3 * grid + 4 * source + source * 8 / 3
    return {"preprocess": preprocess, "stitch": stitch, "postprocess": postprocess}


def plan_memory(budget: float, base: float, source_shape: Sequence[int], network_shape: Sequence[int],
                in_channels: int, num_classes: int, roi_size: Sequence[int], max_batch: int,
                window: tuple[float, float], case: str = "the case") -> MemoryPlan:
    """The largest window batch (then float16 accumulation) whose estimated peak stays under ``budget``.

    Raises:
        MedunetError: no setting fits; the message gives the smallest budget that would.
    """
    for dtype, itemsize in (("float32", 4), ("float16", 2)):
        for batch in range(max_batch, 0, -1):
            parts = case_estimate(base, source_shape, network_shape, in_channels, num_classes, roi_size, batch,
                                  itemsize, window)
            if max(parts.values()) <= budget:
                return MemoryPlan(batch, dtype, max(parts.values()), parts)
    smallest = max(case_estimate(base, source_shape, network_shape, in_channels, num_classes, roi_size, 1, 2,
                                 window).values())
    raise MedunetError(
        f"--memory-budget {format_size(budget)} is too small for {case} ({'x'.join(map(str, source_shape))} voxels, "
        f"{'x'.join(map(str, network_shape))} on the network's grid): the smallest feasible budget is about "
        f"{format_size(smallest * 1.05)} (window batch 1, float16 stitching; {format_size(base)} of it is this "
        f"process before the case). Fix: pass --memory-budget {format_size(smallest * 1.05)} or more."
    )


def header_shapes(image: str | Path, target_spacing: Sequence[float] | None) -> tuple[tuple[int, ...], tuple[int, ...], int]:
    """``(spatial shape, shape at target_spacing in RAS order, bytes per stored voxel)`` from the header only."""
    import nibabel as nib
    import nibabel.orientations as orientations

    path = Path(image)
    if not path.name.lower().endswith((".nii", ".nii.gz")):
        raise MedunetError(f"{image}: --memory-budget reads NIfTI images only. Fix: convert it to .nii.gz, or "
                           "leave --memory-budget out.")
    header = nib.load(str(path))
    shape = tuple(int(v) for v in header.shape[:3])
    transform = orientations.ornt_transform(orientations.io_orientation(header.affine),
                                            orientations.axcodes2ornt("RAS"))
    order = [int(v) for v in transform[:, 0]]
    ras_shape = [0, 0, 0]
    spacing = np.sqrt((header.affine[:3, :3] ** 2).sum(axis=0))
    ras_spacing = [0.0, 0.0, 0.0]
    for axis in range(3):
        ras_shape[order[axis]] = shape[axis]
        ras_spacing[order[axis]] = float(spacing[axis])
    if target_spacing is None:
        return shape, tuple(ras_shape), header.get_data_dtype().itemsize
    grid = tuple(int(round((n - 1) * s / t + 1)) for n, s, t in zip(ras_shape, ras_spacing, target_spacing))
    return shape, grid, max(header.get_data_dtype().itemsize, 4)
