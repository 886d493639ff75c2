"""Per-task preprocessing presets for the ten MSD tasks and the synthetic phantoms.

Where the numbers come from:

- ``target_spacing`` (x, y, z mm): the per-task median voxel spacing that nnU-Net's ``3d_fullres``
  configuration resamples to (Isensee et al. 2021, Nat Methods 18:203, supplementary "dataset
  fingerprints"), rounded to two decimals and written here in x, y, z order (nnU-Net prints z, y, x).
  Treat them as nnU-Net-like defaults, not as values copied from a specific plans file.
- ``patch_size`` (x, y, z voxels): of the order of nnU-Net's 3D full-resolution patches, rounded to
  multiples of 16 so that any U-Net with four down-samplings fits.
- ``ct_window`` (HU): clipping range then scaled to [0, 1]. Abdominal soft-tissue window
  (level 50, width 400 -> -150..250 HU) for liver, pancreas, hepatic vessels and colon; the MONAI spleen
  tutorial's -57..164 HU for spleen; a lung window (level -600, width 1500 -> -1350..150 HU) for lung.
- MRI tasks use per-image, per-channel z-score over non-zero voxels (``NormalizeIntensityd``), because
  MRI intensities have no absolute scale (Task04's per-image maxima run from 112 to 1.7e6).
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any

from medunet.data.msd import MSDTask
from medunet.errors import MedunetError


@dataclass(frozen=True)
class TaskPreset:
    """How to preprocess one task.

    Args:
        name: the canonical task folder name, e.g. ``Task04_Hippocampus``.
        modality: ``"CT"`` (window + crop to foreground) or ``"MRI"`` (non-zero z-score per channel).
        labels: label value -> name, background included.
        in_channels: image channels (modalities).
        target_spacing: voxel spacing (x, y, z mm) to resample to; None keeps each image's own spacing.
        patch_size: training patch / sliding-window ROI (x, y, z voxels).
        ct_window: (min, max) HU clipped and scaled to [0, 1]; CT only.
    """

    name: str
    modality: str
    labels: dict[int, str]
    in_channels: int
    target_spacing: tuple[float, float, float] | None
    patch_size: tuple[int, int, int]
    ct_window: tuple[float, float] | None = None

    def __post_init__(self) -> None:
        if self.modality not in ("CT", "MRI"):
            raise MedunetError(f"preset {self.name}: modality must be 'CT' or 'MRI', got {self.modality!r}.")
        if (self.modality == "CT") != (self.ct_window is not None):
            raise MedunetError(f"preset {self.name}: CT presets need a ct_window and MRI presets must not have one.")

    @property
    def out_channels(self) -> int:
        """Number of output classes, background included."""
        return len(self.labels)

    @property
    def label_values(self) -> list[int]:
        """The label values in class order: class ``i`` of the network is label value ``label_values[i]``."""
        return sorted(self.labels)

    @property
    def labels_contiguous(self) -> bool:
        """Whether the label values are 0..N-1, so classes and values coincide (else they are mapped)."""
        return self.label_values == list(range(len(self.labels)))

    @property
    def is_ct(self) -> bool:
        """Whether the preset windows Hounsfield units."""
        return self.modality == "CT"

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON data (label keys as strings), read back by :meth:`from_dict`."""
        return {
            "name": self.name,
            "modality": self.modality,
            "labels": {str(value): name for value, name in self.labels.items()},
            "in_channels": self.in_channels,
            "target_spacing": list(self.target_spacing) if self.target_spacing is not None else None,
            "patch_size": list(self.patch_size),
            "ct_window": list(self.ct_window) if self.ct_window is not None else None,
        }

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any], source: str = "preset") -> TaskPreset:
        """Validate and build a preset from :meth:`to_dict`'s data (a run record, a plan file).

        Args:
            raw: the seven fields; labels as ``{"0": "background", ...}``.
            source: the file it was read from, for messages.
        """
        def fail(key: str, value: Any, expected: str) -> MedunetError:
            return MedunetError(f"{source}: preset {key} is {value!r}; {expected}. Fix: correct it.")

        def numbers(key: str, length: int | None, integer: bool = False, positive: bool = True) -> tuple | None:
            value = raw.get(key)
            if value is None:
                return None
            plain = isinstance(value, (list, tuple)) and all(
                isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in value)
            if (not plain or (length is not None and len(value) != length)
                    or (positive and any(v <= 0 for v in value))
                    or (integer and any(not float(v).is_integer() for v in value))):
                kind = "positive integers" if integer else "positive numbers" if positive else "numbers"
                raise fail(key, value, f"expected {length or 'a list of'} {kind}")
            return tuple(int(v) if integer else float(v) for v in value)

        name = raw.get("name")
        if not isinstance(name, str) or not name or name.startswith(("$", "@", "%")):
            raise fail("name", name, "expected a task name")
        labels_raw = raw.get("labels")
        if not isinstance(labels_raw, Mapping) or not labels_raw:
            raise fail("labels", labels_raw, 'expected {"0": "background", "1": ...}')
        labels: dict[int, str] = {}
        for value, label in labels_raw.items():
            if not str(value).isdigit() or not isinstance(label, str) or label.startswith(("$", "@", "%")):
                raise fail("labels", {value: label}, "expected non-negative integer values and plain names")
            labels[int(value)] = label
        if 0 not in labels:
            raise fail("labels", labels_raw, "label 0 (background) is missing")
        channels = raw.get("in_channels")
        if isinstance(channels, bool) or not isinstance(channels, int) or channels < 1:
            raise fail("in_channels", channels, "expected an integer >= 1")
        patch = numbers("patch_size", None, integer=True)
        if patch is None or len(patch) not in (2, 3):
            raise fail("patch_size", raw.get("patch_size"), "expected 2 or 3 positive integers")
        spacing = numbers("target_spacing", len(patch))
        window = numbers("ct_window", 2, positive=False)
        if window is not None and window[0] >= window[1]:
            raise fail("ct_window", list(window), "expected [low, high] with low < high")
        return cls(name=name, modality=str(raw.get("modality")), labels=labels, in_channels=channels,
                   target_spacing=spacing, patch_size=patch, ct_window=window)


def _labels(*names: str) -> dict[int, str]:
    return dict(enumerate(("background",) + names))


SOFT_TISSUE_WINDOW = (-150.0, 250.0)

PRESETS: dict[str, TaskPreset] = {
    preset.name: preset
    for preset in (
        TaskPreset("Task01_BrainTumour", "MRI", _labels("edema", "non-enhancing tumor", "enhancing tumour"),
                   4, (1.0, 1.0, 1.0), (128, 128, 128)),
        TaskPreset("Task02_Heart", "MRI", _labels("left atrium"), 1, (1.25, 1.25, 1.37), (160, 192, 80)),
        TaskPreset("Task03_Liver", "CT", _labels("liver", "cancer"), 1, (0.77, 0.77, 1.0), (128, 128, 128),
                   SOFT_TISSUE_WINDOW),
        TaskPreset("Task04_Hippocampus", "MRI", _labels("Anterior", "Posterior"), 1, (1.0, 1.0, 1.0), (48, 64, 48)),
        TaskPreset("Task05_Prostate", "MRI", _labels("PZ", "TZ"), 2, (0.62, 0.62, 3.6), (256, 256, 32)),
        TaskPreset("Task06_Lung", "CT", _labels("cancer"), 1, (0.79, 0.79, 1.24), (160, 192, 80),
                   (-1350.0, 150.0)),
        TaskPreset("Task07_Pancreas", "CT", _labels("pancreas", "cancer"), 1, (0.8, 0.8, 2.5), (224, 224, 48),
                   SOFT_TISSUE_WINDOW),
        TaskPreset("Task08_HepaticVessel", "CT", _labels("vessel", "tumour"), 1, (0.8, 0.8, 1.5), (192, 192, 64),
                   SOFT_TISSUE_WINDOW),
        TaskPreset("Task09_Spleen", "CT", _labels("spleen"), 1, (0.79, 0.79, 5.0), (160, 192, 64),
                   (-57.0, 164.0)),
        TaskPreset("Task10_Colon", "CT", _labels("colon cancer primaries"), 1, (0.78, 0.78, 3.0), (160, 192, 64),
                   SOFT_TISSUE_WINDOW),
        # Synthetic tasks from ``medunet make-phantom`` (default 48x48x32 voxels): small patches so a CPU runs
        # them in seconds. CT phantoms are 0.8x0.8x2.5 mm and resampled to 1.6 mm in-plane (24x24x32 voxels).
        TaskPreset("PhantomCT", "CT", _labels("organ", "lesion"), 1, (1.6, 1.6, 2.5), (32, 32, 32),
                   (-200.0, 300.0)),
        TaskPreset("PhantomMRI", "MRI", _labels("organ", "lesion"), 1, None, (32, 32, 32)),
    )
}


def _short_name(name: str) -> str:
    """``Task04_Hippocampus`` -> ``hippocampus``; ``Hippocampus`` -> ``hippocampus``."""
    return re.sub(r"^task\d+_", "", name.strip().lower())


def get_preset(name: str) -> TaskPreset:
    """Look a preset up by folder name (``Task04_Hippocampus``), short name (``Hippocampus``) or ``PhantomCT``.

    Args:
        name: the task name, case-insensitive; a ``TaskNN_`` prefix is optional.
    """
    wanted = _short_name(name)
    for preset in PRESETS.values():
        if _short_name(preset.name) == wanted:
            return preset
    raise MedunetError(f"no preset for task {name!r}. Fix: use one of {sorted(PRESETS)}.")


def preset_for_task(task: MSDTask) -> TaskPreset:
    """The preset of a parsed task: by folder name, else by ``dataset.json`` name; channels and labels must agree.

    Args:
        task: the parsed task folder.
    """
    try:
        preset = get_preset(task.folder_name)
    except MedunetError:
        preset = get_preset(task.name)
    if preset.name.startswith("Phantom"):  # phantoms may be written with any number of channels
        preset = replace(preset, in_channels=task.num_channels)
    if preset.in_channels != task.num_channels or set(preset.labels) != set(task.labels):
        raise MedunetError(
            f"task {task.root} has {task.num_channels} channel(s) and labels {sorted(task.labels)}, but preset "
            f"{preset.name} expects {preset.in_channels} and {sorted(preset.labels)}. "
            "Fix: rename the folder or dataset.json 'name' to the matching task, or build a TaskPreset for it."
        )
    return preset
