"""Read a Medical Segmentation Decathlon task folder: ``dataset.json``, ``imagesTr``, ``labelsTr``, ``imagesTs``.

Both forms of ``dataset.json`` in use are accepted:

- MSD (2018): ``"labels": {"0": "background", "1": "Anterior"}``, ``"modality": {"0": "MRI"}``,
  ``"training": [{"image": "./imagesTr/x.nii.gz", "label": "./labelsTr/x.nii.gz"}]``,
  ``"test": ["./imagesTs/y.nii.gz"]``.
- nnU-Net v2 style inverted labels ``{"background": 0, "Anterior": 1}`` and ``"channel_names"``
  instead of ``"modality"``.

Multi-channel tasks (e.g. Task01 BrainTumour) store all channels in one 4D file; ``modality`` lists them.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from medunet.errors import MedunetError
from medunet.image_files import parse_labels, strip_image_suffix

DATASET_JSON = "dataset.json"
REQUIRED_KEYS = ("labels", "training")


@dataclass(frozen=True)
class MSDCase:
    """One case: its id (file name without suffix), absolute image path, absolute label path (or None).

    ``image_entry``/``label_entry`` keep the path as written in ``dataset.json`` for error messages.
    """

    case_id: str
    image: Path
    label: Path | None = None
    image_entry: str = ""
    label_entry: str = ""

    def as_dict(self) -> dict[str, str]:
        """The MONAI datalist item: ``{"image": str, "label": str, "case": id}`` with absolute paths."""
        item = {"image": str(self.image), "case": self.case_id}
        if self.label is not None:
            item["label"] = str(self.label)
        return item


@dataclass(frozen=True)
class MSDTask:
    """A parsed MSD task folder.

    Args:
        name: the task name from ``dataset.json`` (e.g. ``Hippocampus``).
        root: the absolute task folder (e.g. ``.../Task04_Hippocampus``).
        labels: label value -> name, background included (``{0: "background", 1: "Anterior", ...}``).
        modalities: channel index -> modality (``{0: "MRI"}``; four entries for BrainTumour).
        training: labelled cases in ``dataset.json`` order.
        test: unlabelled cases (``label`` is None).
        raw: the parsed ``dataset.json``.
    """

    name: str
    root: Path
    labels: dict[int, str]
    modalities: dict[int, str]
    training: list[MSDCase] = field(default_factory=list)
    test: list[MSDCase] = field(default_factory=list)
    raw: dict[str, Any] = field(default_factory=dict, repr=False)

    @property
    def folder_name(self) -> str:
        """The task folder's name, e.g. ``Task04_Hippocampus``; names the datalist file."""
        return self.root.name

    @property
    def num_channels(self) -> int:
        """Number of input channels (modalities) per image."""
        return len(self.modalities)

    @property
    def num_classes(self) -> int:
        """Number of output classes, background included."""
        return len(self.labels)

    @property
    def is_ct(self) -> bool:
        """Whether every channel is CT (Hounsfield units)."""
        return all(modality.upper() == "CT" for modality in self.modalities.values())


def parse_modalities(raw: dict[str, Any]) -> dict[int, str]:
    """The channel index -> modality mapping from ``modality`` (MSD) or ``channel_names`` (nnU-Net v2).

    Args:
        raw: the parsed ``dataset.json``.
    """
    modalities = raw.get("modality", raw.get("channel_names"))
    if not isinstance(modalities, dict) or not modalities:
        raise MedunetError(
            "dataset.json has no 'modality' object. "
            'Fix: add one entry per image channel, e.g. "modality": {"0": "CT"}.'
        )
    try:
        return {int(key): str(value) for key, value in sorted(modalities.items(), key=lambda kv: int(kv[0]))}
    except ValueError as error:
        raise MedunetError(
            f"dataset.json 'modality' keys must be channel indices '0', '1', ...: {error}. "
            'Fix: write it as {"0": "T1", "1": "T2"}.'
        ) from error


def read_dataset_json(root: str | Path) -> dict[str, Any]:
    """Load ``root/dataset.json``; raise ``MedunetError`` naming the file and the fix when absent or invalid.

    Args:
        root: the task folder.
    """
    path = Path(root) / DATASET_JSON
    if not path.is_file():
        raise MedunetError(
            f"{path} does not exist. Fix: point to an MSD task folder (one holding dataset.json, imagesTr, "
            "labelsTr) or create one with 'medunet make-phantom'."
        )
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise MedunetError(f"{path} is not valid JSON ({error}). Fix: repair the file.") from error
    if not isinstance(raw, dict):
        raise MedunetError(f"{path} must hold a JSON object. Fix: follow the MSD dataset.json layout.")
    missing = [key for key in REQUIRED_KEYS if key not in raw]
    if missing:
        raise MedunetError(
            f"{path} lacks required key(s) {missing}. Fix: add them following the MSD dataset.json layout."
        )
    return raw


def case_id_of(entry: str) -> str:
    """The case id of a path as written in a datalist: ``./imagesTr/x_003.nii.gz`` -> ``x_003``.

    Args:
        entry: an image path (file or DICOM folder).
    """
    return strip_image_suffix(Path(entry.rstrip("/")).name)


def resolve_entry(root: Path, entry: str) -> Path:
    """``root / entry``, normalised without following links (``./imagesTr/x`` -> ``root/imagesTr/x``).

    Args:
        root: the task folder.
        entry: a path relative to ``root`` (or absolute).
    """
    return Path(os.path.normpath(root / entry))


def outside_root(root: Path, path: Path) -> Path | None:
    """Where ``path`` leads outside ``root``, or None when it stays inside.

    Checked twice: the normalised path (``../x``, an absolute path elsewhere) and, following symbolic links
    (of the file or of a folder on the way), the real file against the real ``root``; a link to a file elsewhere
    would let a datalist or ``dataset.json`` train on files outside the task. Returns the normalised path or
    the link's real target, for the message.

    Args:
        root: the task folder (data root).
        path: an absolute path, e.g. from ``resolve_entry``.
    """
    def inside(folder: str, candidate: str) -> bool:
        return os.path.commonpath([folder, candidate]) == folder

    normalised = os.path.normpath(str(path))
    if not inside(os.path.normpath(str(root)), normalised):
        return Path(normalised)
    real = os.path.realpath(normalised)
    if not inside(os.path.realpath(str(root)), real):
        return Path(real)
    return None


def _training_case(root: Path, entry: Any, index: int) -> MSDCase:
    if not isinstance(entry, dict) or not isinstance(entry.get("image"), str):
        raise MedunetError(
            f"dataset.json 'training' item {index} is {entry!r}. "
            'Fix: each item must be {"image": "./imagesTr/X.nii.gz", "label": "./labelsTr/X.nii.gz"}.'
        )
    label = entry.get("label")
    return MSDCase(
        case_id=case_id_of(entry["image"]),
        image=resolve_entry(root, entry["image"]),
        label=resolve_entry(root, label) if isinstance(label, str) else None,
        image_entry=entry["image"],
        label_entry=label if isinstance(label, str) else "",
    )


def _test_case(root: Path, entry: Any, index: int) -> MSDCase:
    image = entry.get("image") if isinstance(entry, dict) else entry
    if not isinstance(image, str):
        raise MedunetError(
            f"dataset.json 'test' item {index} is {entry!r}. Fix: list test images as \"./imagesTs/X.nii.gz\"."
        )
    return MSDCase(case_id=case_id_of(image), image=resolve_entry(root, image), image_entry=image)


def load_task(root: str | Path) -> MSDTask:
    """Parse an MSD task folder into an ``MSDTask`` with absolute paths (files are not opened here).

    Args:
        root: the task folder holding ``dataset.json``. Use ``check_task`` to validate the files.

    Example::

        task = load_task("../shared/data/Task04_Hippocampus")
        task.num_channels, task.labels, task.training[0].image
    """
    root = Path(root).absolute()
    raw = read_dataset_json(root)
    training = raw["training"] if isinstance(raw["training"], list) else None
    if training is None:
        raise MedunetError(f"{root / DATASET_JSON}: 'training' must be a list. Fix: list the labelled cases.")
    test = raw.get("test") or []
    return MSDTask(
        name=str(raw.get("name", root.name)),
        root=root,
        labels=parse_labels(raw["labels"]),
        modalities=parse_modalities(raw),
        training=[_training_case(root, entry, i) for i, entry in enumerate(training)],
        test=[_test_case(root, entry, i) for i, entry in enumerate(test)],
        raw=raw,
    )
