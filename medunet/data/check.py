"""Validate an MSD task folder (and optionally its k-fold datalist) before any training.

``check_task`` collects every problem at once, each with the case, the file, what is wrong and the fix;
``assert_task_ok`` raises one ``MedunetError`` listing them all. ``medunet check-data`` and the trainer both
call these, so they refuse bad data with the same message.

Checks: ``dataset.json`` exists, parses and has ``labels``/``modality``/``training``; the training list is not
empty and lists each case once; every path stays inside the task folder, also after following symbolic links;
every file exists, is complete (``verify_complete``: as many voxels as its header declares) and is readable;
images are 3D (no 2D image or single-slice axis: the networks and presets are 3D); image channels match
``modality``; image and label spatial shapes and affines agree; label values are those ``labels`` declares.
Headers are read with nibabel (SimpleITK for other formats); labels are read in full for their values; images
are read in full too unless ``read_images=False``, which also checks that every voxel is finite (no NaN/Inf)
and catches a damaged gzip payload or CRC (a cut-short file is caught in both modes).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from medunet.data.datalist import read_datalist_json
from medunet.data.msd import MSDCase, MSDTask, case_id_of, load_task, outside_root, resolve_entry
from medunet.data.readers import ImageHeader, IncompleteFileError, read_array, read_header, verify_complete
from medunet.errors import MedunetError

AFFINE_TOLERANCE_MM = 1e-3


@dataclass(frozen=True)
class Problem:
    """One thing wrong with a task: which case and file, what is wrong, how to fix it."""

    case: str
    file: str
    problem: str
    fix: str

    def __str__(self) -> str:
        where = f"{self.case} ({self.file})" if self.file else self.case
        return f"{where}: {self.problem}. Fix: {self.fix}."


def format_problems(task_dir: str | Path, problems: list[Problem]) -> str:
    """One message listing all problems, one per line.

    Args:
        task_dir: the task folder checked.
        problems: what ``check_task`` returned.
    """
    lines = [f"task {task_dir} has {len(problems)} problem(s):"]
    lines += [f"  - {problem}" for problem in problems]
    return "\n".join(lines)


def _cases_from_datalist(task: MSDTask, datalist: str | Path) -> list[MSDCase]:
    """The training cases of a datalist file, resolved against the task folder."""
    cases = []
    for item in read_datalist_json(datalist)["training"]:
        image, label = item.get("image"), item.get("label")
        if not isinstance(image, str):
            raise MedunetError(f"datalist {datalist}: item {item!r} has no 'image' path. Fix: regenerate it.")
        cases.append(
            MSDCase(
                case_id=item.get("case") or case_id_of(image),
                image=resolve_entry(task.root, image),
                label=resolve_entry(task.root, label) if isinstance(label, str) else None,
                image_entry=image,
                label_entry=label if isinstance(label, str) else "",
            )
        )
    return cases


class _CaseChecker:
    """Checks of one task's cases against its ``dataset.json``; appends to ``problems``."""

    def __init__(self, task: MSDTask, read_images: bool) -> None:
        self.task = task
        self.read_images = read_images
        self.problems: list[Problem] = []

    def report(self, case: str, entry: str, problem: str, fix: str) -> None:
        self.problems.append(Problem(case, entry, problem, fix))

    def path_ok(self, case: MSDCase, entry: str, path: Path) -> bool:
        """Inside the task folder and present; reports and returns False otherwise."""
        outside = outside_root(self.task.root, path)
        if outside is not None and outside == path:
            self.report(
                case.case_id, entry, f"path resolves to {path}, outside the task folder {self.task.root}",
                "move the file into the task folder and list it relative to it, e.g. ./imagesTr/<name>",
            )
            return False
        if outside is not None:
            self.report(
                case.case_id, entry,
                f"is a symbolic link to {outside}, outside the task folder {self.task.root}",
                "copy the file into the task folder instead of linking to it (links must stay inside the task "
                "folder, so the task trains only on its own files)",
            )
            return False
        if not path.exists():
            self.report(
                case.case_id, entry, "file does not exist",
                "restore the file, or remove the case from the list in dataset.json (or the datalist)",
            )
            return False
        return True

    def incomplete(self, case: MSDCase, entry: str, error: IncompleteFileError) -> None:
        self.report(case.case_id, entry, f"file is incomplete: {error.detail}", IncompleteFileError.FIX)

    def header(self, case: MSDCase, entry: str, path: Path) -> ImageHeader | None:
        """The header, after ``verify_complete`` (cheap: no decompression for a sound single-stream gzip)."""
        try:
            verify_complete(path)
        except IncompleteFileError as error:
            self.incomplete(case, entry, error)
            return None
        except Exception:  # noqa: BLE001 - an unparsable header: read_header below reports it
            pass
        try:
            return read_header(path)
        except Exception as error:  # any reader error means the same thing to the user: unreadable
            self.report(
                case.case_id, entry, f"cannot read the file header ({type(error).__name__}: {error})",
                "the file is corrupt or not an image; re-download or re-export it",
            )
            return None

    def voxels(self, case: MSDCase, entry: str, path: Path) -> np.ndarray | None:
        try:
            return read_array(path)
        except IncompleteFileError as error:
            self.incomplete(case, entry, error)
            return None
        except Exception as error:
            self.report(
                case.case_id, entry, f"cannot read the voxels ({type(error).__name__}: {error})",
                "the file is corrupt or truncated; re-download or re-export it",
            )
            return None

    def check_image(self, case: MSDCase) -> ImageHeader | None:
        if not self.path_ok(case, case.image_entry, case.image):
            return None
        header = self.header(case, case.image_entry, case.image)
        if header is None:
            return None
        if self.read_images:
            voxels = self.voxels(case, case.image_entry, case.image)
            if voxels is None:
                return None
            self.check_finite(case, voxels)
        shape = header.spatial_shape
        if len(shape) < 3 or min(shape) < 2:
            what = f"{len(shape)}D" if len(shape) < 3 else "a single slice thick along an axis"
            self.report(
                case.case_id, case.image_entry,
                f"image is {what} (spatial shape {shape}), not a 3D volume; medunet's networks and presets are 3D",
                "export the whole 3D volume of this case (all slices), or remove the case from dataset.json "
                "(or the datalist)",
            )
        if header.channels != self.task.num_channels:
            self.report(
                case.case_id, case.image_entry,
                f"image has {header.channels} channel(s) but dataset.json 'modality' declares "
                f"{self.task.num_channels} ({', '.join(self.task.modalities.values())})",
                "store all modalities of a case in one 4D file (x, y, z, channel) or correct 'modality'",
            )
        return header

    def check_finite(self, case: MSDCase, voxels: np.ndarray) -> None:
        """Report NaN/Inf voxels: one NaN turns the intensity normalisation, the loss and the weights into NaN."""
        if not np.issubdtype(voxels.dtype, np.floating):
            return  # integer voxels are always finite
        finite = np.isfinite(voxels)
        if finite.all():
            return
        nan = int(np.isnan(voxels).sum())
        infinite = int(voxels.size - finite.sum()) - nan
        self.report(
            case.case_id, case.image_entry,
            f"image has {nan} NaN and {infinite} infinite voxel(s) of {voxels.size} "
            f"({100.0 * (nan + infinite) / voxels.size:.2g}%)",
            "replace them with a real intensity and save the image again (e.g. the background value: "
            "numpy.nan_to_num(voxels, nan=0.0, posinf=0.0, neginf=0.0)), or re-export it from the source",
        )

    def check_label(self, case: MSDCase, image: ImageHeader | None) -> None:
        if case.label is None:
            self.report(
                case.case_id, case.image_entry, "training item has no 'label'",
                'add "label": "./labelsTr/<name>" to the item, or list the image under "test"',
            )
            return
        entry = case.label_entry
        if not self.path_ok(case, entry, case.label):
            return
        header = self.header(case, entry, case.label)
        if header is None:
            return
        if image is not None:
            if header.spatial_shape != image.spatial_shape:
                self.report(
                    case.case_id, entry,
                    f"label shape {header.spatial_shape} differs from image shape {image.spatial_shape}",
                    "the label must be on the image's voxel grid: resample it to the image "
                    "(nearest neighbour) or pair the right files",
                )
            elif not np.allclose(header.affine, image.affine, atol=AFFINE_TOLERANCE_MM):
                worst = float(np.abs(header.affine - image.affine).max())
                self.report(
                    case.case_id, entry,
                    f"label affine differs from the image affine (by up to {worst:.3g} mm)",
                    "if the voxels are aligned, write the label with the image's affine "
                    "(nibabel.Nifti1Image(label, image.affine)); otherwise resample the label onto the image",
                )
        if header.channels != 1:
            self.report(case.case_id, entry, f"label has {header.channels} channels", "store one label map per case")
        values = self.voxels(case, entry, case.label)
        if values is None:
            return
        found = np.unique(values)
        unknown = [v for v in found.tolist() if v not in self.task.labels]
        if unknown:
            self.report(
                case.case_id, entry,
                f"label value(s) {unknown[:10]} not declared in dataset.json 'labels' {sorted(self.task.labels)}",
                "declare them in 'labels' or remap the label file to the declared values",
            )


def _duplicates(cases: Iterable[MSDCase]) -> list[str]:
    seen: dict[str, int] = {}
    for case in cases:
        seen[case.case_id] = seen.get(case.case_id, 0) + 1
    return sorted(case_id for case_id, count in seen.items() if count > 1)


def check_task(
    task_dir: str | Path, datalist: str | Path | None = None, read_images: bool = True, progress: bool = True
) -> list[Problem]:
    """All problems of a task folder (empty list: ready to train).

    Args:
        task_dir: the MSD task folder.
        datalist: optional k-fold datalist JSON; its training cases are checked instead of dataset.json's.
        read_images: also read every image in full, to catch NaN/Inf voxels and damaged gzip payloads (labels
            are always read; files cut short are caught either way).
        progress: show a tqdm progress bar on stderr.

    Example::

        problems = check_task("../shared/data/Task04_Hippocampus")
        print("\\n".join(map(str, problems)))
    """
    try:
        task = load_task(task_dir)
        cases = _cases_from_datalist(task, datalist) if datalist is not None else task.training
    except MedunetError as error:  # nothing more can be checked without a parsed dataset.json / datalist
        message, _, fix = str(error).partition(" Fix: ")
        return [Problem("dataset.json" if datalist is None else "datalist", "", message.rstrip("."),
                        fix.rstrip(".") or "repair the file")]
    source = str(datalist) if datalist is not None else "dataset.json 'training'"
    checker = _CaseChecker(task, read_images)
    if not cases:
        checker.report(
            "dataset.json" if datalist is None else "datalist", "", f"{source} lists no training cases",
            'list cases as {"image": "./imagesTr/X.nii.gz", "label": "./labelsTr/X.nii.gz"}',
        )
    for case_id in _duplicates(cases):
        checker.report(case_id, "", f"case listed more than once in {source}", "list each case once")
    bar = tqdm(cases + task.test, desc=f"check {task.folder_name}", unit="case", disable=not progress, leave=False)
    for number, case in enumerate(bar):
        image = checker.check_image(case)
        if number < len(cases):
            checker.check_label(case, image)
    return checker.problems


def assert_task_ok(
    task_dir: str | Path, datalist: str | Path | None = None, read_images: bool = True, progress: bool = True
) -> MSDTask:
    """Return the parsed task, or raise ``MedunetError`` listing every problem ``check_task`` finds.

    Trainers call this before building datasets so bad data fails fast with the ``check-data`` message.

    Args:
        task_dir: the MSD task folder.
        datalist: optional k-fold datalist JSON to check instead of dataset.json's training list.
        read_images: also read every image in full (NaN/Inf voxels, damaged gzip payloads).
        progress: show a tqdm progress bar on stderr.
    """
    problems = check_task(task_dir, datalist, read_images=read_images, progress=progress)
    if problems:
        raise MedunetError(format_problems(task_dir, problems))
    return load_task(task_dir)
