"""K-fold datalists: deterministic, balanced, disjoint, portable, and the fewer-cases-than-folds rule."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from medunet.cli import main
from medunet.data.datalist import assign_folds, load_fold, load_test, make_datalist, write_datalist
from medunet.data.phantom import make_phantom_task
from medunet.errors import MedunetError
from medunet.paths import REPO_ROOT


@pytest.fixture(scope="module")
def phantom_task(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_phantom_task(tmp_path_factory.mktemp("folds") / "Task90_PhantomCT", num_cases=7, num_test=2,
                             size=(12, 12, 8))


def test_fold_assignment_is_deterministic_and_balanced() -> None:
    cases = [f"case_{i:03d}" for i in range(23)]
    folds = assign_folds(cases, num_folds=5, seed=0)
    assert folds == assign_folds(list(reversed(cases)), num_folds=5, seed=0)  # input order does not matter
    assert folds != assign_folds(cases, num_folds=5, seed=1)
    sizes = sorted(list(folds.values()).count(k) for k in range(5))
    assert sizes == [4, 4, 5, 5, 5]


def test_duplicate_cases_are_refused() -> None:
    with pytest.raises(MedunetError, match="more than once"):
        assign_folds(["a", "b", "a"], num_folds=2)


def test_folds_are_disjoint_and_cover_all_cases(phantom_task: Path, tmp_path: Path) -> None:
    datalist_file = write_datalist(phantom_task, tmp_path / "folds.json", num_folds=3, seed=0)
    all_cases = set()
    for fold in range(3):
        train, val = load_fold(datalist_file, fold, data_root=phantom_task)
        train_ids, val_ids = {item["case"] for item in train}, {item["case"] for item in val}
        assert train_ids.isdisjoint(val_ids) and len(train_ids | val_ids) == 7
        assert all(Path(item["image"]).is_file() and Path(item["label"]).is_file() for item in train + val)
        assert all(item["fold"] == fold for item in val)
        all_cases |= val_ids
    assert len(all_cases) == 7
    with pytest.raises(MedunetError, match="fold 3 does not exist"):
        load_fold(datalist_file, 3, data_root=phantom_task)


def test_datalist_paths_are_relative_so_the_file_moves_with_the_data(phantom_task: Path, tmp_path: Path) -> None:
    datalist_file = write_datalist(phantom_task, tmp_path / "folds.json", num_folds=2)
    raw = json.loads(datalist_file.read_text(encoding="utf-8"))
    assert raw["training"][0]["image"].startswith("imagesTr/") and raw["task"] == "Task90_PhantomCT"
    moved = shutil.copytree(phantom_task, tmp_path / "elsewhere" / phantom_task.name)
    train, _ = load_fold(datalist_file, 0, data_root=moved)
    assert all(Path(item["image"]).is_relative_to(moved) and Path(item["image"]).is_file() for item in train)
    test = load_test(datalist_file, data_root=moved)
    assert [item["case"] for item in test] == ["phantom_007", "phantom_008"]
    assert all(Path(item["image"]).is_file() for item in test)


def test_fewer_cases_than_folds_trains_and_validates_on_all_with_a_warning(tmp_path: Path) -> None:
    task = make_phantom_task(tmp_path / "Task90_PhantomCT", num_cases=2, num_test=0, size=(12, 12, 8))
    with pytest.warns(UserWarning, match="every fold trains and validates on all cases"):
        datalist_file = write_datalist(task, tmp_path / "folds.json", num_folds=5)
    for fold in (0, 4):
        with pytest.warns(UserWarning, match="2 labelled case"):
            train, val = load_fold(datalist_file, fold, data_root=task)
        assert {i["case"] for i in train} == {i["case"] for i in val} == {"phantom_000", "phantom_001"}


def test_make_datalist_cli_writes_the_default_file(phantom_task: Path, tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    assert main(["make-datalist", str(phantom_task), "--folds", "3", "--seed", "2"]) == 0
    written = json.loads((phantom_task / "folds.json").read_text(encoding="utf-8"))  # beside dataset.json
    assert not (tmp_path / "data_lists").exists()
    assert written == make_datalist(phantom_task, num_folds=3, seed=2)


def test_missing_datalist_file_names_the_command_to_make_it(tmp_path: Path) -> None:
    with pytest.raises(MedunetError, match="make-datalist"):
        load_fold(tmp_path / "absent.json", 0, data_root=tmp_path)


@pytest.mark.realdata
def test_committed_hippocampus_datalist_is_what_the_command_writes(hippocampus_dir: Path) -> None:
    committed = json.loads((REPO_ROOT / "data_lists" / "Task04_Hippocampus_folds.json").read_text(encoding="utf-8"))
    assert committed == make_datalist(hippocampus_dir, num_folds=5, seed=0)
    train, val = load_fold(REPO_ROOT / "data_lists" / "Task04_Hippocampus_folds.json", 0, hippocampus_dir)
    assert len(train) + len(val) == 208 and len(val) in (41, 42)


@pytest.mark.realdata
def test_committed_spleen_datalist_uses_its_single_case_everywhere(spleen_dir: Path) -> None:
    datalist_file = REPO_ROOT / "data_lists" / "Task09_Spleen_folds.json"
    with pytest.warns(UserWarning):
        assert json.loads(datalist_file.read_text(encoding="utf-8")) == make_datalist(spleen_dir, num_folds=5, seed=0)
    with pytest.warns(UserWarning):
        train, val = load_fold(datalist_file, 3, spleen_dir)
    assert [i["case"] for i in train] == [i["case"] for i in val] == ["spleen_2"]
