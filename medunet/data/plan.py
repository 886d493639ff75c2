"""A training plan derived from a dataset fingerprint, the way nnU-Net derives its ``3d_fullres`` configuration.

``medunet plan TASK_DIR`` writes ``plan.json``: the :class:`~medunet.data.TaskPreset` fields (modality, labels,
channels, target spacing, patch size, CT window) that training, inference, evaluation and bundle export use,
plus, for each number, where it came from. A user may edit it; it is validated when read.

The rules (nnU-Net v2's, simplified where medunet's networks differ; Isensee et al. 2021):

- **target spacing**: the median spacing per axis; on an anisotropic dataset (the coarsest axis more than 3x the
  finest) the coarse axis takes the 10th percentile of its spacings instead, so thick-slice cases are not
  interpolated into many thin slices and thin-slice cases keep more of their resolution.
- **normalisation**: CT (every channel CT in ``dataset.json``) clips to the foreground's 0.5-99.5 percentiles.
  nnU-Net then z-scores with the foreground mean and SD; medunet scales the clipped window to [0, 1], which is the
  same up to an affine map of the intensities that the first convolution absorbs (the mean and SD are recorded).
  Other modalities: per-image, per-channel z-score over the non-zero voxels.
- **crop**: to the non-zero region (the body) when that removes at least a quarter of the median volume, as
  nnU-Net decides whether to normalise inside the non-zero mask; medunet's CT chain crops to the body.
- **patch size and levels**: the median shape after resampling (and cropping) rounded up to a multiple of
  ``2**levels``, then shrunk, largest axis first, until it holds at most ``patch_voxels`` voxels (the memory
  budget: 128^3 by default, about what nnU-Net fits into 8 GB for a 3D U-Net); ``levels`` is the number of
  halvings that keep at least 4 voxels per axis at the bottom (at most 5).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np

from medunet.atomic import atomic_write_text
from medunet.data.fingerprint import Fingerprint
from medunet.data.presets import TaskPreset
from medunet.errors import MedunetError

PLAN_FILE = "plan.json"
FORMAT_VERSION = 1
ANISOTROPY_RATIO = 3.0
DEFAULT_PATCH_VOXELS = 128**3
MIN_BOTTOM_VOXELS = 4
MAX_LEVELS = 5


def make_plan(fingerprint: Fingerprint, patch_voxels: int = DEFAULT_PATCH_VOXELS, allow_single_case: bool = False,
              ) -> dict[str, Any]:
    """The plan (``plan.json`` content) for a fingerprint.

    Args:
        fingerprint: from :func:`~medunet.data.fingerprint.compute_fingerprint`.
        patch_voxels: the most voxels a training patch may hold (the memory budget).
        allow_single_case: plan from one labelled case (its statistics stand for the dataset's).
    """
    if len(fingerprint.cases) < 2 and not allow_single_case:
        raise MedunetError(
            f"{fingerprint.task} has one labelled case ({fingerprint.cases[0].case}): a median of one case is no "
            "dataset statistic, and no fold could validate. Fix: add labelled cases, or pass --allow-single-case "
            "to plan from it anyway."
        )
    spacing, shape = fingerprint.axis("spacing"), fingerprint.axis("shape")
    sources: dict[str, str] = {}
    target = np.median(spacing, axis=0)
    coarse = int(target.argmax())
    finest = float(np.delete(target, coarse).min())
    sources["target_spacing"] = f"median spacing per axis over {len(spacing)} cases"
    if target[coarse] > ANISOTROPY_RATIO * finest:
        target[coarse] = max(float(np.percentile(spacing[:, coarse], 10)), finest)
        sources["target_spacing"] += (f"; axis {'xyz'[coarse]} is more than {ANISOTROPY_RATIO:g}x coarser than the "
                                      "finest, so it takes the 10th percentile of its spacings (nnU-Net's rule)")
    is_ct = all(modality.upper() == "CT" for modality in fingerprint.modality.values())
    cropped = fingerprint.axis("cropped_shape")
    crop_fraction = float(np.median(np.prod(cropped, axis=1) / np.prod(shape, axis=1)))
    crop = crop_fraction <= 0.75
    sizes = cropped if crop and is_ct else shape
    resampled = np.median(sizes * spacing / target, axis=0)
    levels = int(np.clip(math.floor(math.log2(max(resampled.min(), 1) / MIN_BOTTOM_VOXELS)) + 1, 2, MAX_LEVELS))
    step = 2 ** (levels - 1)
    patch = np.maximum(np.ceil(resampled / step) * step, step).astype(int)
    while int(np.prod(patch)) > patch_voxels and patch.max() > step:
        patch[int(patch.argmax())] -= step
    sources["patch_size"] = (f"median resampled shape {np.round(resampled).astype(int).tolist()} rounded up to a "
                             f"multiple of {step} ({levels} levels, at least {MIN_BOTTOM_VOXELS} voxels per axis at the "
                             f"bottom), shrunk largest axis first to at most {patch_voxels} voxels")
    sources["crop_to_nonzero"] = (f"the non-zero region holds {crop_fraction:.0%} of the median volume"
                                  + (" (cropping pays)" if crop else " (cropping would not pay)"))
    window = None
    if is_ct:
        intensity = fingerprint.intensity[0]
        window = [round(intensity["percentile_00_5"], 2), round(intensity["percentile_99_5"], 2)]
        sources["ct_window"] = (f"foreground 0.5-99.5 percentiles of {len(fingerprint.cases)} cases (mean "
                                f"{intensity['mean']:.1f}, SD {intensity['std']:.1f} HU); scaled to [0, 1]")
        sources["modality"] = "every channel is CT in dataset.json: clip to the window, scale to [0, 1], crop to the body"
    else:
        sources["modality"] = (f"channels {sorted(set(fingerprint.modality.values()))} in dataset.json: per-image, "
                               "per-channel z-score over non-zero voxels")
    preset = TaskPreset(
        name=fingerprint.task, modality="CT" if is_ct else "MRI",
        labels={int(value): name for value, name in fingerprint.labels.items()},
        in_channels=len(fingerprint.modality),
        target_spacing=tuple(round(float(s), 3) for s in target),
        patch_size=tuple(int(p) for p in patch),
        ct_window=tuple(window) if window else None,
    )
    return {
        "format_version": FORMAT_VERSION,
        "preset": preset.to_dict(),
        "levels": levels,
        "crop_to_nonzero": crop,
        "sources": sources,
        "fingerprint": {"cases": len(fingerprint.cases), "median_shape": np.median(shape, axis=0).tolist(),
                        "median_spacing": np.median(spacing, axis=0).tolist(), "intensity": fingerprint.intensity},
    }


def write_plan(plan: dict[str, Any], path: str | Path) -> Path:
    """Write ``plan.json`` atomically (a kill leaves the previous plan or the new one, never half of one)."""
    path = Path(path)
    atomic_write_text(json.dumps(plan, indent=2) + "\n", path)
    return path


def read_plan(path: str | Path) -> TaskPreset:
    """The preset of a ``plan.json`` (validated: a plan is a file people edit and send each other)."""
    path = Path(path)
    try:
        plan = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise MedunetError(f"plan {path} does not exist. Fix: run 'medunet plan TASK_DIR' first.") from None
    except (ValueError, UnicodeDecodeError) as error:
        raise MedunetError(f"plan {path} is not valid JSON ({error}). Fix: repair it or run 'medunet plan' again.") from None
    if not isinstance(plan, dict) or not isinstance(plan.get("preset"), dict):
        raise MedunetError(f"plan {path} has no 'preset' object. Fix: run 'medunet plan' again.")
    if plan.get("format_version", FORMAT_VERSION) != FORMAT_VERSION:
        raise MedunetError(f"plan {path} is format {plan.get('format_version')!r}; this medunet reads "
                           f"{FORMAT_VERSION}. Fix: run 'medunet plan' again.")
    return TaskPreset.from_dict(plan["preset"], str(path))


def training_preset(task_dir: str | Path, plan: str | Path | None = None) -> TaskPreset:
    """The preset a training of ``task_dir`` uses (what the workflows' ``preset`` key calls).

    ``plan`` when given; else the shipped preset of an MSD task or phantom whose channels and labels match; else
    ``TASK_DIR/plan.json``; else a plan made now from the task's fingerprint (and saved there when the folder is
    writable), which is said on the console.

    Args:
        task_dir: the MSD-layout task folder.
        plan: a ``plan.json`` to use instead of any shipped preset.
    """
    from medunet.data.fingerprint import FINGERPRINT_FILE, compute_fingerprint
    from medunet.data.msd import load_task
    from medunet.data.presets import preset_for_task

    if plan is not None:
        return read_plan(plan)
    task = load_task(task_dir)
    try:
        return preset_for_task(task)
    except MedunetError as no_preset:
        reason = str(no_preset).split(". Fix:")[0]
    path = task.root / PLAN_FILE
    if path.is_file():
        print(f"{task.folder_name}: {reason}; training with its plan {path}")
        return read_plan(path)
    print(f"{task.folder_name}: {reason}, and it has no plan yet: planning it now (as 'medunet plan {task.root}')")
    fingerprint = compute_fingerprint(task.root, cache=path.parent / FINGERPRINT_FILE, progress=False)
    made = make_plan(fingerprint)
    try:
        write_plan(made, path)
        print(f"wrote {path} (edit it and train again to change the preprocessing or patch size)")
    except OSError as error:
        print(f"could not save the plan in {path} ({error.strerror}); 'medunet plan {task.root} --out FILE' and "
              "--plan FILE keep it")
    return TaskPreset.from_dict(made["preset"], str(path))
