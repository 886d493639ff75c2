"""A dataset fingerprint, the facts a plan is derived from (after nnU-Net's ``dataset_fingerprint.json``).

Per training case: the spatial shape and voxel spacing in RAS axis order (what the preprocessing resamples),
the shape after cropping to the non-zero region, the voxel count of every label, and per channel the intensity
statistics over the foreground (label > 0) with a fixed-size random sample of foreground voxels, pooled over the
cases for the percentiles CT normalisation clips to. Computed once with a progress bar and cached beside the
plan (``fingerprint.json``); the cache is reused while every file keeps its size and modification time.

Bad data is refused with the case and the fix: no labelled case (or only one), a label map without foreground,
a channel that is constant over the foreground, spacings along one axis that differ by 100x or more.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
from tqdm import tqdm

from medunet.atomic import atomic_write_text
from medunet.data.msd import MSDCase, MSDTask, load_task
from medunet.data.readers import read_array, read_header
from medunet.errors import MedunetError

FINGERPRINT_FILE = "fingerprint.json"
FORMAT_VERSION = 1
SAMPLES_PER_CASE = 10_000
MAX_SPACING_RATIO = 100.0


@dataclass
class CaseFacts:
    """What one training case contributes to the fingerprint (RAS axis order)."""

    case: str
    shape: list[int]
    spacing: list[float]
    cropped_shape: list[int]
    label_voxels: dict[str, int]
    channel_mean: list[float]
    channel_std: list[float]


@dataclass
class Fingerprint:
    """The dataset fingerprint: per-case facts, pooled foreground intensity statistics, the task's metadata."""

    task: str
    modality: dict[str, str]
    labels: dict[str, str]
    cases: list[CaseFacts]
    intensity: list[dict[str, float]]  # per channel: mean, std, min, max, percentile_00_5, percentile_99_5
    files: dict[str, list[int]] = field(default_factory=dict)  # case file -> [size, mtime_ns], for the cache
    format_version: int = FORMAT_VERSION

    def axis(self, name: str) -> np.ndarray:
        """``(cases, 3)`` array of ``shape``, ``spacing`` or ``cropped_shape``."""
        return np.asarray([getattr(case, name) for case in self.cases], dtype=np.float64)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> Fingerprint:
        return cls(**{**raw, "cases": [CaseFacts(**case) for case in raw["cases"]]})


def _ras_order(affine: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """For each RAS axis, the voxel axis that points along it; and each voxel axis' spacing."""
    orientation = nib.orientations.io_orientation(affine)
    voxel_axis_of_ras = np.argsort(orientation[:, 0])
    return voxel_axis_of_ras, np.linalg.norm(affine[:3, :3], axis=0)


def case_facts(case: MSDCase, rng: np.random.Generator, samples: list[list[np.ndarray]]) -> CaseFacts:
    """Read one case and return its facts; foreground intensity samples are appended per channel."""
    header = read_header(case.image)
    order, spacing = _ras_order(header.affine)
    image = np.asarray(read_array(case.image), dtype=np.float32)
    label = np.asarray(read_array(case.label))
    if image.ndim == 3:
        image = image[..., None]
    if label.shape[:3] != image.shape[:3]:
        raise MedunetError(f"{case.case_id}: image {image.shape[:3]} and label {label.shape[:3]} differ in shape. "
                           "Fix: run 'medunet check-data' and repair the case.")
    foreground = label > 0
    if not foreground.any():
        raise MedunetError(f"{case.case_id}: the label map {case.label.name} has no foreground voxel, so it says "
                           "nothing about the target. Fix: remove the case from dataset.json (or label it).")
    nonzero = np.argwhere(np.any(image != 0, axis=-1))
    cropped = (nonzero.max(axis=0) - nonzero.min(axis=0) + 1) if len(nonzero) else np.asarray(image.shape[:3])
    values, counts = np.unique(label, return_counts=True)
    means, stds = [], []
    for channel in range(image.shape[-1]):
        voxels = image[..., channel][foreground]
        means.append(float(voxels.mean()))
        stds.append(float(voxels.std()))
        pick = rng.choice(voxels.size, size=min(SAMPLES_PER_CASE, voxels.size), replace=False)
        samples[channel].append(voxels[pick])
    return CaseFacts(
        case=case.case_id,
        shape=[int(image.shape[axis]) for axis in order],
        spacing=[round(float(spacing[axis]), 6) for axis in order],
        cropped_shape=[int(cropped[axis]) for axis in order],
        label_voxels={str(int(v)): int(c) for v, c in zip(values, counts, strict=True)},
        channel_mean=means,
        channel_std=stds,
    )


def _signature(task: MSDTask) -> dict[str, list[int]]:
    files = {}
    for case in task.training:
        for path in (case.image, case.label):
            stat = path.stat()
            files[str(path.relative_to(task.root))] = [stat.st_size, stat.st_mtime_ns]
    return files


def compute_fingerprint(task_dir: str | Path, cache: str | Path | None = None, progress: bool = True) -> Fingerprint:
    """The fingerprint of the labelled training cases of an MSD task folder, from ``cache`` when it is current.

    Args:
        task_dir: the MSD task folder (``dataset.json``, ``imagesTr``, ``labelsTr``).
        cache: the ``fingerprint.json`` to reuse and (re)write; default ``TASK_DIR/fingerprint.json``.
        progress: show a progress bar.
    """
    task = load_task(task_dir)
    cache = Path(cache) if cache is not None else task.root / FINGERPRINT_FILE
    cases = [case for case in task.training if case.label is not None]
    if not cases:
        raise MedunetError(f"{task.root}: dataset.json lists no labelled training case. Fix: add cases to 'training'.")
    signature = _signature(task)
    if cache.is_file():
        try:
            cached = Fingerprint.from_dict(json.loads(cache.read_text(encoding="utf-8")))
            if cached.files == signature and cached.format_version == FORMAT_VERSION:
                return cached
        except (ValueError, TypeError, KeyError):
            pass  # an old or broken cache is recomputed
    rng = np.random.default_rng(0)
    samples: list[list[np.ndarray]] = [[] for _ in range(task.num_channels)]
    facts = [case_facts(case, rng, samples)
             for case in tqdm(cases, desc=f"fingerprint {task.folder_name}", unit="case", disable=not progress)]
    intensity = []
    for channel, pieces in enumerate(samples):
        pooled = np.concatenate(pieces)
        if float(pooled.std()) == 0.0 or all(case.channel_std[channel] == 0.0 for case in facts):
            raise MedunetError(
                f"{task.root}: channel {channel} ({task.modalities.get(channel, '?')}) is constant ({pooled[0]:g}) over "
                f"the foreground of every case (e.g. {facts[0].case}), so it carries no signal and cannot be "
                "normalised. Fix: remove the channel from the images and dataset.json 'modality'."
            )
        intensity.append({"mean": float(pooled.mean()), "std": float(pooled.std()), "min": float(pooled.min()),
                          "max": float(pooled.max()), "percentile_00_5": float(np.percentile(pooled, 0.5)),
                          "percentile_99_5": float(np.percentile(pooled, 99.5))})
    fingerprint = Fingerprint(task=task.folder_name, modality={str(k): v for k, v in task.modalities.items()},
                              labels={str(k): v for k, v in task.labels.items()}, cases=facts, intensity=intensity,
                              files=signature)
    _check_spacings(fingerprint)
    atomic_write_text(json.dumps(fingerprint.to_dict(), indent=1) + "\n", cache)
    return fingerprint


def _check_spacings(fingerprint: Fingerprint) -> None:
    spacing = fingerprint.axis("spacing")
    for axis, name in enumerate("xyz"):
        low, high = int(spacing[:, axis].argmin()), int(spacing[:, axis].argmax())
        if spacing[high, axis] >= MAX_SPACING_RATIO * spacing[low, axis]:
            raise MedunetError(
                f"{fingerprint.task}: the {name} spacing runs from {spacing[low, axis]:g} mm "
                f"({fingerprint.cases[low].case}) to {spacing[high, axis]:g} mm ({fingerprint.cases[high].case}), "
                f"{spacing[high, axis] / spacing[low, axis]:.0f}x apart: one of the headers is wrong (often metres "
                "or micrometres instead of mm). Fix: correct the pixdim of those files, or remove them."
            )
