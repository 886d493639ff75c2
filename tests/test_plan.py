"""``medunet plan``: the dataset fingerprint and the plan derived from it, on tasks written here and on real data."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from medunet.cli import main
from medunet.data import get_preset
from medunet.data.fingerprint import FINGERPRINT_FILE, compute_fingerprint
from medunet.data.plan import PLAN_FILE, make_plan, read_plan
from medunet.errors import MedunetError


def write_task(root: Path, cases: int = 4, spacing=(0.8, 0.8, 4.0), size=(40, 40, 12), channels=2,
               labels=(0, 1, 2, 4), modality=("CT", "CT"), seed=0) -> Path:
    """An MSD-layout task with a body, an organ and label values as given (e.g. non-contiguous)."""
    rng = np.random.default_rng(seed)
    (root / "imagesTr").mkdir(parents=True)
    (root / "labelsTr").mkdir()
    affine = np.diag([*spacing, 1.0])
    training = []
    for index in range(cases):
        label = np.zeros(size, np.uint8)
        for k, value in enumerate(labels[1:]):
            label[8 + 6 * k: 14 + 6 * k, 10:26, 3:9] = value
        body = np.full(size, -1000.0, np.float32)
        body[4:-4, 4:-4, :] = 40.0
        image = np.stack([body + 60.0 * (label > 0) + rng.normal(0, 10, size) + 30 * c for c in range(channels)], -1)
        name = f"case_{index:03d}.nii.gz"
        nib.save(nib.Nifti1Image(image.squeeze(-1) if channels == 1 else image, affine), root / "imagesTr" / name)
        nib.save(nib.Nifti1Image(label, affine), root / "labelsTr" / name)
        training.append({"image": f"./imagesTr/{name}", "label": f"./labelsTr/{name}"})
    (root / "dataset.json").write_text(json.dumps({
        "name": root.name, "modality": {str(i): m for i, m in enumerate(modality[:channels])},
        "labels": {str(v): ("background" if v == 0 else f"structure{v}") for v in labels},
        "numTraining": cases, "training": training, "test": []}), encoding="utf-8")
    return root


def test_plan_of_a_multichannel_anisotropic_ct_task_with_gaps_in_its_labels(tmp_path: Path, capsys) -> None:
    task = write_task(tmp_path / "MyTask_Organs")
    assert main(["plan", str(task)]) == 0
    preset = read_plan(task / PLAN_FILE)
    assert preset.modality == "CT" and preset.in_channels == 2 and set(preset.labels) == {0, 1, 2, 4}
    assert preset.target_spacing == (0.8, 0.8, 4.0)
    assert all(p % 4 == 0 for p in preset.patch_size) and preset.patch_size[2] < preset.patch_size[0]
    low, high = preset.ct_window
    assert -1000 < low < 100 < high < 200  # the foreground's percentiles, not the air
    plan = json.loads((task / PLAN_FILE).read_text(encoding="utf-8"))
    assert set(plan["sources"]) >= {"target_spacing", "patch_size", "ct_window", "modality", "crop_to_nonzero"}
    assert "axis z is more than 3x coarser" in plan["sources"]["target_spacing"]  # 4 mm vs 0.8 mm: anisotropic
    assert "wrote" in capsys.readouterr().out


def test_thick_slices_take_the_tenth_percentile_of_their_spacings(tmp_path: Path) -> None:
    thin = write_task(tmp_path / "a", cases=2, spacing=(1.0, 1.0, 3.0), channels=1, modality=("MRI",))
    fingerprint = compute_fingerprint(thin, progress=False)
    for case, z in zip(fingerprint.cases, (3.0, 6.0), strict=False):
        case.spacing[2] = z
    fingerprint.cases.append(type(fingerprint.cases[0])(**{**vars(fingerprint.cases[1]), "case": "c"}))
    plan = make_plan(fingerprint)
    z_spacings = [3.0, 6.0, 6.0]
    assert plan["preset"]["target_spacing"][2] == pytest.approx(np.percentile(z_spacings, 10))
    assert np.median(z_spacings) == 6.0 and "10th percentile" in plan["sources"]["target_spacing"]
    assert plan["preset"]["modality"] == "MRI" and plan["preset"]["ct_window"] is None


def test_the_fingerprint_is_cached_until_a_file_changes(tmp_path: Path) -> None:
    task = write_task(tmp_path / "T", cases=2)
    first = compute_fingerprint(task, progress=False)
    cache = task / FINGERPRINT_FILE
    stamp = cache.stat().st_mtime_ns
    assert compute_fingerprint(task, progress=False).to_dict() == first.to_dict() and cache.stat().st_mtime_ns == stamp
    image = task / "imagesTr" / "case_000.nii.gz"
    data = np.asarray(nib.load(image).dataobj) + 500
    nib.save(nib.Nifti1Image(data, nib.load(image).affine), image)
    assert compute_fingerprint(task, progress=False).intensity != first.intensity


def _refused(task: Path, match: str, *args: str) -> None:
    with pytest.raises(MedunetError, match=match):
        fingerprint = compute_fingerprint(task, progress=False)
        make_plan(fingerprint, allow_single_case="--allow-single-case" in args)
    assert not (task / PLAN_FILE).exists()
    assert main(["plan", str(task), *args]) == 2 and not (task / PLAN_FILE).exists()


def test_bad_tasks_are_refused_with_the_case_and_nothing_is_written(tmp_path: Path) -> None:
    empty = write_task(tmp_path / "empty", cases=3)
    nib.save(nib.Nifti1Image(np.zeros((40, 40, 12), np.uint8), np.diag([0.8, 0.8, 4.0, 1])),
             empty / "labelsTr" / "case_001.nii.gz")
    _refused(empty, r"case_001: the label map .* no foreground")
    single = write_task(tmp_path / "single", cases=1)
    _refused(single, r"one labelled case \(case_000\).*--allow-single-case")
    mixed = write_task(tmp_path / "mixed", cases=2)
    image = mixed / "imagesTr" / "case_001.nii.gz"
    nib.save(nib.Nifti1Image(np.asarray(nib.load(image).dataobj), np.diag([0.008, 0.8, 4.0, 1])), image)
    label = mixed / "labelsTr" / "case_001.nii.gz"
    nib.save(nib.Nifti1Image(np.asarray(nib.load(label).dataobj), np.diag([0.008, 0.8, 4.0, 1])), label)
    _refused(mixed, r"x spacing runs from 0.008 mm \(case_001\) to 0.8 mm \(case_000\), 100x")
    constant = write_task(tmp_path / "constant", cases=2, channels=1)
    for path in (constant / "imagesTr").iterdir():
        nib.save(nib.Nifti1Image(np.full((40, 40, 12), 7.0, np.float32), np.diag([0.8, 0.8, 4.0, 1])), path)
    _refused(constant, r"channel 0 \(CT\) is constant \(7\)")


def test_an_edited_plan_is_used_and_a_hostile_one_refused(tmp_path: Path) -> None:
    task = write_task(tmp_path / "T", cases=2)
    assert main(["plan", str(task)]) == 0
    plan = json.loads((task / PLAN_FILE).read_text(encoding="utf-8"))
    plan["preset"]["patch_size"] = [32, 32, 8]
    (task / PLAN_FILE).write_text(json.dumps(plan), encoding="utf-8")
    assert read_plan(task / PLAN_FILE).patch_size == (32, 32, 8)
    plan["preset"]["labels"]["1"] = "$__import__('os').system('true')"
    (task / PLAN_FILE).write_text(json.dumps(plan), encoding="utf-8")
    with pytest.raises(MedunetError, match="labels"):
        read_plan(task / PLAN_FILE)


@pytest.mark.realdata
@pytest.mark.parametrize(("task_name", "single"), [("Task04_Hippocampus", False), ("Task09_Spleen", True)])
def test_real_task_plans_are_near_the_shipped_presets(task_name: str, single: bool, tmp_path: Path, request) -> None:
    """Task04: within 1.5x of the preset on every axis. Task09's one shared case has 26 slices, fewer than the
    preset's 64-slice patch (from nnU-Net's dataset-wide median): only its spacing and in-plane patch compare."""
    task_dir = request.getfixturevalue("hippocampus_dir" if task_name.startswith("Task04") else "spleen_dir")
    fingerprint = compute_fingerprint(task_dir, cache=tmp_path / FINGERPRINT_FILE, progress=False)
    planned = make_plan(fingerprint, allow_single_case=single)["preset"]
    shipped = get_preset(task_name)
    axes = range(3) if not single else range(2)
    for axis in axes:
        assert 1 / 1.5 <= planned["patch_size"][axis] / shipped.patch_size[axis] <= 1.5
    for axis in range(3):
        assert 1 / 1.5 <= planned["target_spacing"][axis] / shipped.target_spacing[axis] <= 1.5
