"""Synthetic MSD-format tasks ("phantoms") so demos and tests need no downloaded data.

Each case is a body (elliptic cylinder) holding an ellipsoid organ (label 1) and a smaller spherical lesion
inside it (label 2), on a smooth background with noise:

- ``kind="ct"``: Hounsfield units (air -1000, soft tissue ~20, organ ~80, hypodense lesion ~35), int16,
  anisotropic spacing (~0.8 x 0.8 x 2.5 mm) and a non-identity affine (x/y flipped as in DICOM LPS data,
  rotated up to 15 degrees about z, arbitrary origin).
- ``kind="mri"``: arbitrary intensity scale per case (x10 .. x10^4) with a smooth bias field, exactly zero
  outside the body, float32, ~1 mm spacing, also rotated and flipped.

``channels > 1`` writes 4D images (x, y, z, channel) like Task01 BrainTumour, each channel a different
contrast. Everything is deterministic given ``seed``.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import nibabel as nib
import numpy as np
from scipy.ndimage import gaussian_filter

from medunet.errors import MedunetError

PHANTOM_LABELS = {"0": "background", "1": "organ", "2": "lesion"}
STRUCTURES = ("background", "organ", "lesion", "cyst")
MRI_CHANNEL_NAMES = ("T1", "T2", "FLAIR", "T1c")


def _affine(rng: np.random.Generator, spacing: np.ndarray) -> np.ndarray:
    """Voxel-to-RAS affine: x/y flipped (as LPS-stored scans are), rotated about z, random origin."""
    angle = np.deg2rad(rng.uniform(-15.0, 15.0))
    rotation = np.array(
        [[np.cos(angle), -np.sin(angle), 0.0], [np.sin(angle), np.cos(angle), 0.0], [0.0, 0.0, 1.0]]
    )
    affine = np.eye(4)
    affine[:3, :3] = rotation @ np.diag([-1.0, -1.0, 1.0]) @ np.diag(spacing)
    affine[:3, 3] = rng.uniform(-150.0, 150.0, size=3)
    return affine


def _smooth_field(rng: np.random.Generator, size: tuple[int, int, int]) -> np.ndarray:
    """Low-frequency noise with unit standard deviation."""
    field = gaussian_filter(rng.standard_normal(size), sigma=max(size) / 6.0)
    return field / (field.std() + 1e-8)


def _geometry(rng: np.random.Generator, size: tuple[int, int, int], spacing: np.ndarray, cyst: bool = False):
    """Body mask and label map (0 background, 1 organ, 2 lesion, and 3 cyst when asked), shapes in millimetres."""
    grids = np.meshgrid(*[np.arange(n, dtype=np.float64) for n in size], indexing="ij")
    extent = np.asarray(size) * spacing
    points = [(grid - (n - 1) / 2.0) * s for grid, n, s in zip(grids, size, spacing, strict=True)]  # mm from the centre

    body = (points[0] / (0.46 * extent[0])) ** 2 + (points[1] / (0.42 * extent[1])) ** 2 <= 1.0
    organ_centre = rng.uniform(-0.08, 0.08, size=3) * extent
    organ_radii = rng.uniform([0.17, 0.17, 0.22], [0.24, 0.24, 0.3]) * extent
    organ = sum(((p - c) / r) ** 2 for p, c, r in zip(points, organ_centre, organ_radii, strict=True)) <= 1.0
    lesion_radius = rng.uniform(0.3, 0.45) * organ_radii.min()
    lesion_centre = organ_centre + rng.uniform(-0.35, 0.35, size=3) * organ_radii
    lesion = sum((p - c) ** 2 for p, c in zip(points, lesion_centre, strict=True)) <= lesion_radius**2

    label = np.zeros(size, dtype=np.uint8)
    label[organ & body] = 1
    label[lesion & body] = 2
    if cyst:  # across the organ from the lesion (drawn last, so phantoms without it stay as they were)
        centre = organ_centre - rng.uniform(0.3, 0.45, size=3) * organ_radii
        sphere = sum((p - c) ** 2 for p, c in zip(points, centre, strict=True)) <= (0.8 * lesion_radius) ** 2
        label[sphere & organ & body & ~lesion] = 3
    return body, label


def _ct_channel(rng: np.random.Generator, body: np.ndarray, label: np.ndarray, channel: int) -> np.ndarray:
    enhancement = 25.0 * channel  # later channels as later contrast phases: the organ brightens
    hu = np.where(body, 20.0 + 15.0 * _smooth_field(rng, body.shape), -1000.0)
    hu[label == 1] = 80.0 + enhancement
    hu[label == 2] = 35.0 + 0.3 * enhancement
    hu[label == 3] = 5.0  # fluid: water-like, not enhancing
    hu += rng.normal(0.0, 12.0, size=body.shape)
    return np.clip(np.round(hu), -1024, 3071).astype(np.int16)


def _mri_channel(rng: np.random.Generator, body: np.ndarray, label: np.ndarray, channel: int) -> np.ndarray:
    contrasts = ((0.35, 0.6, 0.9), (0.6, 0.3, 0.8), (0.5, 0.7, 0.2), (0.4, 0.5, 1.0))
    background, organ, lesion = contrasts[channel % len(contrasts)]
    signal = np.full(body.shape, background)
    signal[label == 1] = organ
    signal[label == 2] = lesion
    signal[label == 3] = 1.2 * background + 0.2
    signal = signal * np.exp(0.15 * _smooth_field(rng, body.shape)) + rng.normal(0.0, 0.03, size=body.shape)
    scale = 10.0 ** rng.uniform(1.0, 4.0)  # MRI has no absolute scale: normalisation must cope
    return np.where(body, np.clip(signal, 0.01, None) * scale, 0.0).astype(np.float32)


def make_case(
    kind: str = "ct", size: tuple[int, int, int] = (48, 48, 32), seed: int = 0, channels: int = 1,
    cyst: bool = False,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One synthetic case: image (x, y, z[, channel]), uint8 label (x, y, z) and their shared 4x4 affine.

    Args:
        kind: ``"ct"`` (Hounsfield units, int16) or ``"mri"`` (arbitrary scale, float32).
        size: voxels per axis (x, y, z).
        seed: seed; the same seed gives the same case.
        channels: image channels; more than one gives a 4D image.
        cyst: add a third structure (class 3, a fluid-filled cyst in the organ).
    """
    if kind not in ("ct", "mri"):
        raise MedunetError(f"phantom kind must be 'ct' or 'mri', got {kind!r}. Fix: pass --kind ct or --kind mri.")
    if len(size) != 3 or min(size) < 4:
        raise MedunetError(f"phantom size must be three numbers of at least 4, got {size}. Fix: e.g. --size 48 48 32.")
    if channels < 1:
        raise MedunetError(f"phantom channels must be at least 1, got {channels}.")
    rng = np.random.default_rng(seed)
    spacing = np.array([rng.uniform(0.7, 0.9), rng.uniform(0.7, 0.9), 2.5]) if kind == "ct" else np.array(
        [1.0, 1.0, 1.2]
    )
    affine = _affine(rng, spacing)
    body, label = _geometry(rng, tuple(size), spacing, cyst=cyst)
    make_channel = _ct_channel if kind == "ct" else _mri_channel
    image = np.stack([make_channel(rng, body, label, c) for c in range(channels)], axis=-1)
    return (image[..., 0] if channels == 1 else image), label, affine


def make_phantom_task(
    out_dir: str | Path,
    kind: str = "ct",
    num_cases: int = 4,
    num_test: int = 1,
    size: tuple[int, int, int] = (48, 48, 32),
    seed: int = 0,
    channels: int = 1,
    overwrite: bool = False,
    label_values: Sequence[int] | None = None,
    name: str | None = None,
) -> Path:
    """Write an MSD-format task (``dataset.json``, ``imagesTr``, ``labelsTr``, ``imagesTs``) and return its folder.

    Args:
        out_dir: the task folder to create, e.g. ``data/Task90_PhantomCT``.
        kind: ``"ct"`` or ``"mri"``.
        num_cases: labelled training cases.
        num_test: unlabelled test cases in ``imagesTs``.
        size: voxels per axis (x, y, z).
        seed: base seed; case i uses ``seed * 1000 + i`` so cases differ and runs repeat.
        channels: image channels (4D images when more than one).
        overwrite: write into ``out_dir`` even when it already holds files (refused otherwise, so a real
            task's ``dataset.json`` is never replaced by accident).
        label_values: the values written for background, organ, lesion (and, with a fourth, a cyst), e.g.
            ``(0, 1, 2, 4)`` for labels with a gap; default ``(0, 1, 2)``.
        name: ``dataset.json`` name; default ``PhantomCT``/``PhantomMRI`` (the shipped phantom presets). Another
            name makes a task no preset knows, trained from its plan.

    Example::

        make_phantom_task("/tmp/Task90_PhantomCT", kind="ct", num_cases=4, size=(32, 32, 24))
    """
    if num_cases < 1 or num_test < 0:
        raise MedunetError(f"need at least one training case (got {num_cases}) and num_test >= 0 (got {num_test}).")
    root = Path(out_dir)
    if not overwrite and root.is_dir() and any(root.iterdir()):
        raise MedunetError(
            f"{root} already exists and is not empty ({'holds a dataset.json' if (root / 'dataset.json').exists() else 'holds files'}); "
            "a phantom would overwrite it. Fix: pick a new folder, or pass --force (overwrite=True) to write there anyway."
        )
    values = list(label_values) if label_values is not None else [0, 1, 2]
    if len(values) not in (3, 4) or values[0] != 0 or len(set(values)) != len(values) or min(values) < 0 or max(values) > 255:
        raise MedunetError(f"label values {values} must be 3 or 4 distinct values in 0..255 starting with 0 "
                           "(background, organ, lesion[, cyst]). Fix: e.g. --label-values 0 1 2 4.")
    for sub in ("imagesTr", "labelsTr", "imagesTs"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    training, test = [], []
    for index in range(num_cases + num_test):
        image, label, affine = make_case(kind, tuple(size), seed * 1000 + index, channels, cyst=len(values) == 4)
        label = np.asarray(values, dtype=np.uint8)[label]
        file_name = f"phantom_{index:03d}.nii.gz"
        if index < num_cases:
            nib.save(nib.Nifti1Image(image, affine), root / "imagesTr" / file_name)
            nib.save(nib.Nifti1Image(label, affine), root / "labelsTr" / file_name)
            training.append({"image": f"./imagesTr/{file_name}", "label": f"./labelsTr/{file_name}"})
        else:
            nib.save(nib.Nifti1Image(image, affine), root / "imagesTs" / file_name)
            test.append(f"./imagesTs/{file_name}")
    if kind == "ct":
        modality = {str(c): "CT" for c in range(channels)}
    else:
        modality = {str(c): MRI_CHANNEL_NAMES[c] if c < len(MRI_CHANNEL_NAMES) else f"MR{c}" for c in range(channels)}
    dataset = {
        "name": name or ("PhantomCT" if kind == "ct" else "PhantomMRI"),
        "description": f"Synthetic {kind.upper()} phantom: ellipsoid organ ({values[1]}) with a lesion ({values[2]})"
                       + (f" and a cyst ({values[3]})" if len(values) == 4 else "") + f"; seed {seed}.",
        "reference": "medunet make-phantom",
        "licence": "CC0-1.0",
        "release": "1.0",
        "tensorImageSize": "4D" if channels > 1 else "3D",
        "modality": modality,
        "labels": {str(value): label_name for value, label_name in zip(values, STRUCTURES, strict=False)},
        "numTraining": num_cases,
        "numTest": num_test,
        "training": training,
        "test": test,
    }
    (root / "dataset.json").write_text(json.dumps(dataset, indent=4) + "\n", encoding="utf-8")
    return root
