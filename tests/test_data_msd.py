"""Reading MSD task folders: both dataset.json forms, multi-channel tasks, case ids, errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from medunet.data.msd import load_task, parse_labels, parse_modalities
from medunet.data.phantom import make_phantom_task
from medunet.errors import MedunetError


@pytest.fixture(scope="module")
def two_channel_task(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_phantom_task(tmp_path_factory.mktemp("msd") / "Task91_PhantomMRI", kind="mri", num_cases=2,
                             num_test=1, size=(16, 16, 12), channels=2)


def test_labels_are_read_in_msd_and_inverted_form() -> None:
    expected = {0: "background", 1: "Anterior", 2: "Posterior"}
    assert parse_labels({"0": "background", "1": "Anterior", "2": "Posterior"}) == expected
    assert parse_labels({"background": 0, "Posterior": 2, "Anterior": 1}) == expected


def test_region_style_labels_are_refused_with_a_fix() -> None:
    with pytest.raises(MedunetError, match="Fix"):
        parse_labels({"background": 0, "whole tumour": [1, 2, 3]})


def test_modalities_come_from_modality_or_channel_names() -> None:
    assert parse_modalities({"modality": {"1": "T2", "0": "T1"}}) == {0: "T1", 1: "T2"}
    assert parse_modalities({"channel_names": {"0": "CT"}}) == {0: "CT"}
    with pytest.raises(MedunetError, match="modality"):
        parse_modalities({})


def test_load_task_resolves_paths_case_ids_and_channels(two_channel_task: Path) -> None:
    task = load_task(two_channel_task)
    assert task.name == "PhantomMRI"
    assert task.folder_name == "Task91_PhantomMRI"
    assert task.num_channels == 2 and task.modalities == {0: "T1", 1: "T2"}
    assert task.labels == {0: "background", 1: "organ", 2: "lesion"}
    assert [case.case_id for case in task.training] == ["phantom_000", "phantom_001"]
    first = task.training[0]
    assert first.image == two_channel_task.absolute() / "imagesTr" / "phantom_000.nii.gz"
    assert first.label == two_channel_task.absolute() / "labelsTr" / "phantom_000.nii.gz"
    assert first.image_entry == "./imagesTr/phantom_000.nii.gz"
    assert [case.case_id for case in task.test] == ["phantom_002"] and task.test[0].label is None
    assert task.training[0].as_dict()["case"] == "phantom_000"
    assert not task.is_ct


def test_missing_dataset_json_names_the_file_and_the_fix(tmp_path: Path) -> None:
    with pytest.raises(MedunetError, match=r"dataset\.json does not exist.*Fix"):
        load_task(tmp_path)


def test_dataset_json_without_training_key_is_refused(tmp_path: Path) -> None:
    (tmp_path / "dataset.json").write_text(json.dumps({"labels": {"0": "background"}, "modality": {"0": "CT"}}), encoding="utf-8")
    with pytest.raises(MedunetError, match="training"):
        load_task(tmp_path)


@pytest.mark.realdata
def test_real_hippocampus_folder_parses(hippocampus_dir: Path) -> None:
    task = load_task(hippocampus_dir)
    assert len(task.training) == 208 and task.test == []
    assert task.labels == {0: "background", 1: "Anterior", 2: "Posterior"}
    assert task.num_channels == 1 and task.training[0].case_id == "hippocampus_003"
    assert all(case.image.is_file() and case.label.is_file() for case in task.training)
