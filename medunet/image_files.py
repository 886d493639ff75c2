"""What an image file is called: the suffixes medunet reads, case names, and ``dataset.json`` labels.

One module for the data checks, the readers, inference and evaluation, so they agree on which files are cases
and what a case is named. Light on purpose (no torch, MONAI or ITK): evaluation workers import it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from medunet.errors import MedunetError

NIFTI_SUFFIXES = (".nii", ".nii.gz")
# Formats the default chain sends to SimpleITK; NIfTI stays with nibabel unless asked for explicitly.
SIMPLEITK_SUFFIXES = (".mha", ".mhd", ".nrrd", ".nhdr", ".dcm")
IMAGE_SUFFIXES = NIFTI_SUFFIXES + SIMPLEITK_SUFFIXES
#: Whole volumes in one file (a ``.dcm`` file is one slice of a series, not a case).
VOLUME_SUFFIXES = tuple(suffix for suffix in IMAGE_SUFFIXES if suffix != ".dcm")


def has_suffix(path: str | Path, suffixes: Sequence[str]) -> bool:
    """Whether ``path``'s name ends with one of ``suffixes`` (case-insensitive, ``.nii.gz`` counts as one)."""
    name = Path(path).name.lower()
    return any(name.endswith(suffix) for suffix in suffixes)


def strip_image_suffix(name: str) -> str:
    """``hippocampus_003.nii.gz`` -> ``hippocampus_003``: the case name; a DICOM folder name is unchanged."""
    for suffix in sorted(IMAGE_SUFFIXES, key=len, reverse=True):
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return name


def case_name(path: str | Path) -> str:
    """The case name of an image file or DICOM folder: its name without the image suffix."""
    return strip_image_suffix(Path(path).name)


def parse_labels(labels: Any, source: str = "dataset.json 'labels'") -> dict[int, str]:
    """``{"0": "background", "1": "organ"}`` (MSD) or ``{"background": 0, "organ": 1}`` (nnU-Net v2) ->
    ``{0: "background", 1: "organ"}``, sorted; region lists (nnU-Net's region-based labels) are refused.

    Args:
        labels: the ``labels`` value of a ``dataset.json``.
        source: where it was read, for messages.
    """
    if not isinstance(labels, Mapping) or not labels:
        raise MedunetError(f"{source} must be a non-empty object, got {labels!r}. "
                           'Fix: write it as {"0": "background", "1": "organ"}.')
    parsed: dict[int, str] = {}
    for key, value in labels.items():
        if isinstance(value, (list, tuple)):
            raise MedunetError(f"{source}: label {key!r} is a region {value}; region-based labels are not supported. "
                               "Fix: evaluate (or train) each label value separately.")
        if str(key).strip().isdigit():
            parsed[int(key)] = str(value)
        elif (isinstance(value, int) and not isinstance(value, bool)) or (isinstance(value, str) and value.strip().isdigit()):
            parsed[int(value)] = str(key)
        else:
            raise MedunetError(f"{source}: entry {key!r}: {value!r} is neither 'value: name' nor 'name: value'. "
                               'Fix: write it as {"0": "background", "1": "organ"}.')
    return dict(sorted(parsed.items()))
