"""Find, match and read the cases to evaluate: prediction and reference files paired by case name.

A case name is the file name without ``.nii.gz``, ``.nii``, ``.mha``, ``.mhd``, ``.nrrd`` or ``.nii.gz``-like
suffixes. nnU-Net names images ``case_0000.nii.gz`` (channel 0) and labels ``case.nii.gz``; a prediction or
image named ``case_0000`` is matched to the reference ``case`` when there is no exact match.

Images are read with SimpleITK, so any format it reads works; arrays are in SimpleITK's (z, y, x) order and
the spacing returned is in the same order.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from medunet.atomic import is_hidden
from medunet.errors import MedunetError
from medunet.image_files import VOLUME_SUFFIXES, case_name, has_suffix, parse_labels

_CHANNEL_SUFFIX = re.compile(r"_\d{4}$")


@dataclass(frozen=True)
class CasePair:
    """One case to evaluate: the reference file and the matched prediction (None when it is missing)."""

    name: str
    ref_file: Path
    pred_file: Path | None


@dataclass(frozen=True)
class Geometry:
    """Where the voxels of an image are: array shape, spacing (mm), origin and direction, in array order."""

    shape: tuple[int, ...]
    spacing: tuple[float, ...]
    origin: tuple[float, ...]
    direction: tuple[float, ...]

    def mismatch(self, other: Geometry, tolerance: float = 1e-3) -> str | None:
        """Say how ``other`` differs from this geometry, or None when they match within ``tolerance``."""
        if self.shape != other.shape:
            return f"shape {other.shape} != reference {self.shape}"
        for field in ("spacing", "origin", "direction"):
            mine, theirs = np.asarray(getattr(self, field)), np.asarray(getattr(other, field))
            scale = max(1.0, float(np.abs(mine).max(initial=0.0)))
            if mine.shape != theirs.shape or not np.allclose(mine, theirs, atol=tolerance * scale):
                return f"{field} {tuple(np.round(theirs, 4))} != reference {tuple(np.round(mine, 4))}"
        return None


def list_images(folder: Path, what: str) -> dict[str, Path]:
    """All image files directly in ``folder`` by case name; ``what`` names the folder in errors.

    Hidden files are not cases: ``.tmp<PID>.case.nii.gz`` is a prediction still being written, or left
    half-written by a killed run (see :mod:`medunet.atomic`); ``._case.nii.gz`` is macOS metadata.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise MedunetError(f"{what} folder {folder} does not exist: pass the folder that holds the .nii.gz files")
    files = sorted(p for p in folder.iterdir()
                   if p.is_file() and has_suffix(p, VOLUME_SUFFIXES) and not is_hidden(p))
    by_name: dict[str, Path] = {}
    for path in files:
        name = case_name(path)
        if name in by_name:
            raise MedunetError(
                f"{what} folder {folder} holds case {name!r} twice ({by_name[name].name}, {path.name}): keep one"
            )
        by_name[name] = path
    if not by_name:
        raise MedunetError(
            f"{what} folder {folder} holds no images ({', '.join(VOLUME_SUFFIXES)}): check the path"
        )
    return by_name


def match_cases(pred_dir: Path, ref_dir: Path) -> tuple[list[CasePair], list[str]]:
    """Pair predictions with references by case name.

    Returns the pairs, one per reference (``pred_file`` None when the prediction is missing), and the names
    of predictions that have no reference. Raises :class:`MedunetError` when nothing matches at all, which
    almost always means the wrong folder.
    """
    refs = list_images(ref_dir, "reference")
    preds = list_images(pred_dir, "prediction")
    by_case = {_match_key(name, refs): path for name, path in preds.items()}
    pairs = [CasePair(name, ref, by_case.get(name)) for name, ref in refs.items()]
    extra = sorted(name for name, path in preds.items() if _match_key(name, refs) not in refs)
    if not any(pair.pred_file for pair in pairs):
        raise MedunetError(
            f"no prediction in {pred_dir} matches a reference in {ref_dir} by case name "
            f"(predictions e.g. {_examples(preds)}; references e.g. {_examples(refs)}): "
            "name predictions like the reference labels, e.g. case.nii.gz or case_0000.nii.gz"
        )
    return pairs, extra


def find_image(images_dir: Path, name: str) -> Path | None:
    """The image of a case in ``images_dir`` (``case`` or nnU-Net's ``case_0000``), or None."""
    for suffix in VOLUME_SUFFIXES:
        for stem in (name, f"{name}_0000"):
            path = Path(images_dir) / f"{stem}{suffix}"
            if path.is_file():
                return path
    return None


def read_image(path: Path, orientation: str | None = None) -> tuple[np.ndarray, Geometry]:
    """Read an image or label map: the array in (z, y, x) order and its geometry in the same order.

    ``orientation`` (e.g. ``"LPS"``) reorients the voxels first, for display; metrics use the file's order.
    The file is checked with ``verify_complete`` first: ITK reads a cut-short ``.nii.gz`` without an error,
    and scoring its made-up voxels would be a silently wrong result.
    """
    import SimpleITK as sitk

    from medunet.integrity import verify_complete

    verify_complete(path)  # IncompleteFileError (a MedunetError) names the file and says to re-download it
    try:
        image = sitk.ReadImage(str(path))
    except RuntimeError as error:
        raise MedunetError(f"cannot read {path}: {str(error).strip().splitlines()[-1]}; is it a valid image?") from None
    if orientation and image.GetDimension() == 3:
        image = sitk.DICOMOrient(image, orientation)
    array = sitk.GetArrayFromImage(image)
    dim = image.GetDimension()
    direction = np.asarray(image.GetDirection()).reshape(dim, dim)[::-1, ::-1]
    geometry = Geometry(
        shape=tuple(array.shape[:dim]),
        spacing=tuple(image.GetSpacing()[::-1]),
        origin=tuple(image.GetOrigin()[::-1]),
        direction=tuple(direction.ravel()),
    )
    return array, geometry


def read_labels(dataset_json: Path) -> dict[int, str]:
    """Foreground labels ``{value: name}`` from an MSD or nnU-Net ``dataset.json`` (either direction)."""
    try:
        labels = json.loads(Path(dataset_json).read_text(encoding="utf-8"))["labels"]
    except (OSError, ValueError, KeyError) as error:
        raise MedunetError(f"cannot read 'labels' from {dataset_json}: {error}") from None
    return foreground_labels(labels, source=str(dataset_json))


def foreground_labels(labels: Mapping, source: str = "labels") -> dict[int, str]:
    """:func:`medunet.image_files.parse_labels` without the background (0): the labels to score."""
    parsed = parse_labels(labels, source)
    parsed.pop(0, None)
    return parsed


def find_dataset_json(ref_dir: Path) -> Path | None:
    """``dataset.json`` next to the reference folder (MSD/nnU-Net layout: ``Task/labelsTr``) or in it."""
    for candidate in (Path(ref_dir) / "dataset.json", Path(ref_dir).parent / "dataset.json"):
        if candidate.is_file():
            return candidate
    return None


def _match_key(name: str, refs: Mapping[str, Path]) -> str:
    if name in refs:
        return name
    stripped = _CHANNEL_SUFFIX.sub("", name)
    return stripped if stripped in refs else name


def _examples(by_name: Mapping[str, Path], n: int = 3) -> str:
    return ", ".join(list(by_name)[:n])
