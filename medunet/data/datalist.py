"""K-fold cross-validation datalists: written once to ``data_lists/<TaskFolder>_folds.json``, then loaded.

The file is a MONAI/MSD-style datalist, portable between machines: paths are relative to the task
folder and resolved against a ``data_root`` given at load time::

    {"task": "Task04_Hippocampus", "num_folds": 5, "seed": 0, "labels": {...}, "modality": {...},
     "training": [{"image": "imagesTr/hippocampus_003.nii.gz", "label": "labelsTr/...", "fold": 2,
                   "case": "hippocampus_003"}, ...],
     "test": [{"image": "imagesTs/...", "case": "..."}]}

Fold assignment: cases sorted by id, shuffled by ``numpy.random.default_rng(seed)``, then dealt round-robin,
so fold sizes differ by at most one and the same seed and cases always give the same folds.

Fewer cases than folds (e.g. the one-case Task09_Spleen sample): cross-validation is impossible. Cases are
still dealt round-robin (case i in fold i), but every fold trains on *all* cases and validates on all cases
too, with a warning when written and when loaded. This keeps a smoke run working end to end; its
validation scores then measure fit, not generalisation.

Datalists are files users receive, so loading one refuses entries that are not path strings and paths that
lead outside ``data_root`` (``../``, an absolute path elsewhere, or a symbolic link to a file elsewhere).
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any

import numpy as np
from monai.data import load_decathlon_datalist

from medunet.data.msd import MSDTask, load_task, outside_root, resolve_entry
from medunet.errors import MedunetError

DATALIST_DIR = Path("data_lists")


def default_datalist_path(task: MSDTask, out_dir: str | Path = DATALIST_DIR) -> Path:
    """``data_lists/<TaskFolder>_folds.json``, e.g. ``data_lists/Task04_Hippocampus_folds.json``.

    Args:
        task: the parsed task; its folder name names the file.
        out_dir: the folder for datalists (default ``data_lists`` in the working directory).
    """
    return Path(out_dir) / f"{task.folder_name}_folds.json"


def _relative(task: MSDTask, path: Path, case_id: str) -> str:
    try:
        return path.relative_to(task.root).as_posix()
    except ValueError as error:
        raise MedunetError(
            f"case {case_id}: {path} lies outside the task folder {task.root}. "
            "Fix: move the file into imagesTr/labelsTr/imagesTs and list it as ./imagesTr/<name>."
        ) from error


def assign_folds(case_ids: list[str], num_folds: int = 5, seed: int = 0) -> dict[str, int]:
    """Map each case id to a fold in ``0..num_folds-1``: sort, shuffle with ``seed``, deal round-robin.

    Args:
        case_ids: unique case ids.
        num_folds: number of folds k (>= 2).
        seed: seed for ``numpy.random.default_rng``.
    """
    if num_folds < 2:
        raise MedunetError(f"num_folds must be at least 2, got {num_folds}. Fix: pass --folds 2 or more.")
    if len(set(case_ids)) != len(case_ids):
        duplicates = sorted({c for c in case_ids if case_ids.count(c) > 1})
        raise MedunetError(
            f"case ids {duplicates} appear more than once in the training list; a case in two folds would "
            "leak between training and validation. Fix: list each case once in dataset.json."
        )
    order = np.random.default_rng(seed).permutation(len(case_ids))
    ordered = sorted(case_ids)
    return {ordered[index]: position % num_folds for position, index in enumerate(order)}


def _warn_too_few(task_name: str, num_cases: int, num_folds: int) -> None:
    warnings.warn(
        f"{task_name}: {num_cases} labelled case(s) for {num_folds} folds; every fold trains and validates "
        "on all cases, so validation scores measure fit, not generalisation.",
        stacklevel=3,
    )


def make_datalist(task: MSDTask | str | Path, num_folds: int = 5, seed: int = 0) -> dict[str, Any]:
    """Build the k-fold datalist (a JSON-ready dict, paths relative to the task folder).

    Args:
        task: an ``MSDTask`` or a task folder.
        num_folds: number of folds k.
        seed: shuffling seed; the same seed and cases always give the same folds.
    """
    task = task if isinstance(task, MSDTask) else load_task(task)
    if not task.training:
        raise MedunetError(
            f"{task.root / 'dataset.json'} lists no training cases. "
            "Fix: add {\"image\": \"./imagesTr/X.nii.gz\", \"label\": \"./labelsTr/X.nii.gz\"} items."
        )
    folds = assign_folds([case.case_id for case in task.training], num_folds, seed)
    if len(task.training) < num_folds:
        _warn_too_few(task.folder_name, len(task.training), num_folds)
    training = []
    for case in sorted(task.training, key=lambda c: c.case_id):
        if case.label is None:
            raise MedunetError(
                f"case {case.case_id}: no 'label' in dataset.json 'training'. "
                "Fix: add \"label\": \"./labelsTr/<name>\" or move the image to 'test'."
            )
        training.append(
            {
                "image": _relative(task, case.image, case.case_id),
                "label": _relative(task, case.label, case.case_id),
                "fold": folds[case.case_id],
                "case": case.case_id,
            }
        )
    description = (
        "k-fold datalist written by 'medunet make-datalist'; paths are relative to the task folder "
        "(pass it as data_root when loading)."
    )
    if len(training) < num_folds:
        description += " Fewer cases than folds: every fold trains and validates on all cases."
    return {
        "description": description,
        "name": task.name,
        "task": task.folder_name,
        "num_folds": num_folds,
        "seed": seed,
        "labels": {str(value): name for value, name in task.labels.items()},
        "modality": {str(index): name for index, name in task.modalities.items()},
        "training": training,
        "test": [{"image": _relative(task, c.image, c.case_id), "case": c.case_id} for c in task.test],
    }


def write_datalist(
    task: MSDTask | str | Path, out: str | Path | None = None, num_folds: int = 5, seed: int = 0
) -> Path:
    """Write the k-fold datalist JSON and return its path.

    Args:
        task: an ``MSDTask`` or a task folder.
        out: the JSON file to write (default ``data_lists/<TaskFolder>_folds.json``).
        num_folds: number of folds k.
        seed: shuffling seed.
    """
    task = task if isinstance(task, MSDTask) else load_task(task)
    datalist = make_datalist(task, num_folds, seed)
    out = Path(out) if out is not None else default_datalist_path(task)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(datalist, indent=2) + "\n", encoding="utf-8")
    return out


def read_datalist_json(datalist_file: str | Path) -> dict[str, Any]:
    """Parse a datalist file; ``MedunetError`` naming the file and the fix when absent or malformed.

    Args:
        datalist_file: a JSON file written by ``write_datalist``.
    """
    path = Path(datalist_file)
    if not path.is_file():
        raise MedunetError(f"datalist {path} does not exist. Fix: run 'medunet make-datalist TASK_DIR'.")
    try:
        datalist = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise MedunetError(f"datalist {path} is not valid JSON ({error}). Fix: regenerate it.") from error
    training = datalist.get("training") if isinstance(datalist, dict) else None
    if not isinstance(training, list) or not training:
        raise MedunetError(
            f"datalist {path} has no 'training' cases. Fix: regenerate it with 'medunet make-datalist TASK_DIR'."
        )
    bad = [i for i, item in enumerate(training) if not isinstance(item, dict) or not isinstance(item.get("fold"), int)]
    if bad:
        raise MedunetError(
            f"datalist {path}: training item(s) {bad[:10]} lack an integer 'fold'. "
            "Fix: regenerate it with 'medunet make-datalist TASK_DIR'."
        )
    test = datalist.get("test") or []
    if not isinstance(test, list):
        raise MedunetError(f"datalist {path}: 'test' is {test!r}, not a list. Fix: regenerate it.")
    for section, items, keys in (("training", training, ("image", "label")), ("test", test, ("image",))):
        for index, item in enumerate(items):
            fields = {"image": item} if section == "test" and isinstance(item, str) else item
            if not isinstance(fields, dict):
                raise MedunetError(f"datalist {path}: {section} item {index} is {item!r}, not an object. "
                                   "Fix: regenerate it with 'medunet make-datalist TASK_DIR'.")
            wrong = [key for key in keys if not isinstance(fields.get(key), str) or not fields[key]]
            wrong += [key for key in ("case",) if key in fields and not isinstance(fields[key], str)]
            if wrong:
                raise MedunetError(
                    f"datalist {path}: {section} item {index} has {', '.join(f'{k}={fields.get(k)!r}' for k in wrong)}; "
                    "image and label must be path strings relative to the task folder and case a string. "
                    "Fix: regenerate it with 'medunet make-datalist TASK_DIR'."
                )
    return datalist


def _refuse_outside(datalist_file: str | Path, items: list[dict[str, Any]], section: str, data_root: str | Path) -> None:
    """Raise ``MedunetError`` for the first path of ``items`` that leads outside ``data_root``."""
    root = Path(data_root).absolute()
    for index, item in enumerate(items):
        fields = {"image": item} if isinstance(item, str) else item
        for key in ("image", "label"):
            if key not in fields:
                continue
            outside = outside_root(root, resolve_entry(root, fields[key]))
            if outside is not None:
                raise MedunetError(
                    f"datalist {datalist_file}: {section} item {index} ({fields.get('case', fields['image'])}) "
                    f"{key} {fields[key]!r} leads to {outside}, outside the data root {root}. Fix: list files "
                    "inside the task folder, relative to it (e.g. imagesTr/<name>), and copy rather than "
                    "symlink files from elsewhere; or regenerate the datalist with 'medunet make-datalist TASK_DIR'."
                )


def load_fold(
    datalist_file: str | Path, fold: int, data_root: str | Path
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """The (train, val) lists of fold ``fold``, as MONAI data dicts with absolute paths under ``data_root``.

    Raises ``MedunetError`` for an entry that is not a path string or leads outside ``data_root``.

    Args:
        datalist_file: a JSON file written by ``write_datalist``.
        fold: the validation fold, ``0 <= fold < num_folds``.
        data_root: the task folder the relative paths are resolved against.

    Example::

        train, val = load_fold("data_lists/Task04_Hippocampus_folds.json", 0, "../shared/data/Task04_Hippocampus")
    """
    datalist = read_datalist_json(datalist_file)
    num_folds = int(datalist.get("num_folds", max(item["fold"] for item in datalist["training"]) + 1))
    if not 0 <= fold < num_folds:
        raise MedunetError(f"fold {fold} does not exist in {datalist_file} (folds 0..{num_folds - 1}). Fix: pick one.")
    _refuse_outside(datalist_file, datalist["training"], "training", data_root)
    items = load_decathlon_datalist(datalist_file, is_segmentation=True, data_list_key="training", base_dir=data_root)
    if len(items) < num_folds:
        _warn_too_few(str(datalist.get("task", datalist_file)), len(items), num_folds)
        return items, [dict(item) for item in items]
    train = [item for item in items if item["fold"] != fold]
    val = [item for item in items if item["fold"] == fold]
    return train, val


def load_test(datalist_file: str | Path, data_root: str | Path) -> list[dict[str, Any]]:
    """The test images of a datalist as ``{"image": abs_path, "case": id}`` dicts (may be empty).

    Raises ``MedunetError`` for an entry that is not a path string or leads outside ``data_root``.

    Args:
        datalist_file: a JSON file written by ``write_datalist``.
        data_root: the task folder the relative paths are resolved against.
    """
    datalist = read_datalist_json(datalist_file)
    if not datalist.get("test"):
        return []
    _refuse_outside(datalist_file, datalist["test"], "test", data_root)
    return load_decathlon_datalist(datalist_file, is_segmentation=False, data_list_key="test", base_dir=data_root)
