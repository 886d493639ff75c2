"""check_task / check-data: every problem of a broken task is named with its case and fix, all at once."""

from __future__ import annotations

import gzip
import json
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from medunet.cli import main
from medunet.data.check import Problem, assert_task_ok, check_task
from medunet.data.datalist import write_datalist
from medunet.data.phantom import make_phantom_task
from medunet.errors import MedunetError


@pytest.fixture(scope="module")
def clean_task(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_phantom_task(tmp_path_factory.mktemp("check") / "Task90_PhantomCT", num_cases=7, num_test=1,
                             size=(16, 16, 8))


@pytest.fixture
def broken_task(clean_task: Path, tmp_path: Path) -> Path:
    """A copy of the clean task with one different problem in each of seven cases."""
    root = Path(shutil.copytree(clean_task, tmp_path / clean_task.name))
    # phantom_000: a truncated gzip image (its header still reads; the gzip trailer shows it is cut short)
    image = root / "imagesTr" / "phantom_000.nii.gz"
    image.write_bytes(image.read_bytes()[: image.stat().st_size // 2])
    # phantom_001: the label file is gone
    (root / "labelsTr" / "phantom_001.nii.gz").unlink()
    # phantom_002: label on a different grid
    label = nib.load(root / "labelsTr" / "phantom_002.nii.gz")
    nib.save(nib.Nifti1Image(np.asarray(label.dataobj)[:-2], label.affine), root / "labelsTr" / "phantom_002.nii.gz")
    # phantom_003: a label value dataset.json does not declare
    label = nib.load(root / "labelsTr" / "phantom_003.nii.gz")
    values = np.asarray(label.dataobj).copy()
    values[0, 0, 0] = 7
    nib.save(nib.Nifti1Image(values, label.affine), root / "labelsTr" / "phantom_003.nii.gz")
    # phantom_004: label shifted by 5 mm
    label = nib.load(root / "labelsTr" / "phantom_004.nii.gz")
    shifted = label.affine.copy()
    shifted[0, 3] += 5.0
    nib.save(nib.Nifti1Image(np.asarray(label.dataobj), shifted), root / "labelsTr" / "phantom_004.nii.gz")
    dataset = json.loads((root / "dataset.json").read_text(encoding="utf-8"))
    # phantom_005: its image path escapes the task folder
    shutil.copy(root / "imagesTr" / "phantom_005.nii.gz", tmp_path / "phantom_005.nii.gz")
    dataset["training"][5]["image"] = "../phantom_005.nii.gz"
    # phantom_006: image not gzip at all
    (root / "imagesTr" / "phantom_006.nii.gz").write_bytes(b"this is not an image")
    (root / "dataset.json").write_text(json.dumps(dataset), encoding="utf-8")
    return root


def _by_case(problems: list[Problem]) -> dict[str, str]:
    return {problem.case: str(problem) for problem in problems}


def test_clean_phantom_task_has_no_problems(clean_task: Path) -> None:
    assert check_task(clean_task, progress=False) == []
    assert assert_task_ok(clean_task, progress=False).folder_name == "Task90_PhantomCT"


def test_broken_copy_reports_every_problem_with_case_and_fix(broken_task: Path) -> None:
    problems = check_task(broken_task, progress=False)
    found = _by_case(problems)
    assert len(problems) == 7, "\n".join(map(str, problems))
    assert "file is incomplete" in found["phantom_000"] and "imagesTr/phantom_000" in found["phantom_000"]
    assert "re-download or re-export it" in found["phantom_000"]
    assert "file does not exist" in found["phantom_001"] and "labelsTr/phantom_001" in found["phantom_001"]
    assert "label shape (14, 16, 8) differs from image shape (16, 16, 8)" in found["phantom_002"]
    assert "label value(s) [7] not declared" in found["phantom_003"]
    assert "affine differs" in found["phantom_004"] and "5 mm" in found["phantom_004"]
    assert "outside the task folder" in found["phantom_005"] and "../phantom_005.nii.gz" in found["phantom_005"]
    assert "cannot read the file header" in found["phantom_006"]
    assert all("Fix: " in text for text in found.values())


def test_assert_task_ok_raises_one_error_listing_all_problems(broken_task: Path) -> None:
    with pytest.raises(MedunetError) as caught:
        assert_task_ok(broken_task, progress=False)
    message = str(caught.value)
    assert "7 problem(s)" in message
    assert all(f"phantom_00{i}" in message for i in range(7))


def test_check_data_cli_exits_non_zero_and_names_each_case(broken_task: Path,
                                                           capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["check-data", str(broken_task)]) != 0
    err = capsys.readouterr().err
    assert "medunet check-data: error:" in err and all(f"phantom_00{i}" in err for i in range(7))


def test_check_data_cli_passes_a_clean_task(clean_task: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["check-data", str(clean_task)]) == 0
    assert "Task90_PhantomCT: OK (7 training, 1 test" in capsys.readouterr().out


def test_headers_only_mode_still_catches_truncated_files_and_broken_headers(broken_task: Path) -> None:
    found = _by_case(check_task(broken_task, read_images=False, progress=False))
    assert "file is incomplete" in found["phantom_000"] and "cannot read the file header" in found["phantom_006"]


def test_absolute_path_outside_and_float_label_values_are_reported(clean_task: Path, tmp_path: Path) -> None:
    root = Path(shutil.copytree(clean_task, tmp_path / "task"))
    dataset = json.loads((root / "dataset.json").read_text(encoding="utf-8"))
    dataset["training"][0]["label"] = str(tmp_path / "elsewhere.nii.gz")
    (root / "dataset.json").write_text(json.dumps(dataset), encoding="utf-8")
    label = nib.load(root / "labelsTr" / "phantom_001.nii.gz")
    values = np.asarray(label.dataobj).astype(np.float32)
    values[1, 1, 1] = 0.5
    nib.save(nib.Nifti1Image(values, label.affine), root / "labelsTr" / "phantom_001.nii.gz")
    found = _by_case(check_task(root, progress=False))
    assert "outside the task folder" in found["phantom_000"]
    assert "[0.5] not declared" in found["phantom_001"]


def test_channel_count_must_match_modality(clean_task: Path, tmp_path: Path) -> None:
    root = Path(shutil.copytree(clean_task, tmp_path / "task"))
    dataset = json.loads((root / "dataset.json").read_text(encoding="utf-8"))
    dataset["modality"] = {"0": "CT", "1": "CT"}
    (root / "dataset.json").write_text(json.dumps(dataset), encoding="utf-8")
    problems = check_task(root, progress=False)
    assert len(problems) == 8  # seven training images and the test image
    assert "image has 1 channel(s) but dataset.json 'modality' declares 2" in str(problems[0])


def test_empty_training_list_and_bad_json_are_reported(tmp_path: Path) -> None:
    (tmp_path / "dataset.json").write_text(json.dumps({"labels": {"0": "background"}, "modality": {"0": "CT"},
                                                       "training": []}), encoding="utf-8")
    assert "lists no training cases" in str(check_task(tmp_path, progress=False)[0])
    (tmp_path / "dataset.json").write_text("{not json", encoding="utf-8")
    [problem] = check_task(tmp_path, progress=False)
    assert "not valid JSON" in str(problem) and "Fix: repair the file" in str(problem)


def test_datalist_cases_are_checked_instead_of_dataset_json(clean_task: Path, tmp_path: Path) -> None:
    datalist_file = write_datalist(clean_task, tmp_path / "folds.json", num_folds=2)
    assert check_task(clean_task, datalist=datalist_file, progress=False) == []
    raw = json.loads(datalist_file.read_text(encoding="utf-8"))
    raw["training"][0]["label"] = "../../etc/passwd"
    datalist_file.write_text(json.dumps(raw), encoding="utf-8")
    [problem] = check_task(clean_task, datalist=datalist_file, progress=False)
    assert problem.case == "phantom_000" and "outside the task folder" in problem.problem


def test_a_gzip_with_a_bad_crc_is_caught(clean_task: Path, tmp_path: Path) -> None:
    root = Path(shutil.copytree(clean_task, tmp_path / "task"))
    label_file = root / "labelsTr" / "phantom_002.nii.gz"
    raw = bytearray(gzip.compress(gzip.decompress(label_file.read_bytes())))
    raw[-8] ^= 0xFF  # corrupt the CRC in the gzip trailer
    label_file.write_bytes(bytes(raw))
    [problem] = check_task(root, progress=False)
    assert problem.case == "phantom_002" and "cannot read" in problem.problem


@pytest.mark.realdata
def test_real_hippocampus_passes(hippocampus_dir: Path) -> None:
    assert check_task(hippocampus_dir, progress=False) == []


@pytest.mark.realdata
def test_real_spleen_passes(spleen_dir: Path) -> None:
    assert check_task(spleen_dir, progress=False) == []
