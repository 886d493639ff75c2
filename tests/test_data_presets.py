"""Task presets: the ten MSD tasks and phantoms, lookups, and agreement with task folders."""

from __future__ import annotations

from pathlib import Path

import pytest

from medunet.data.msd import load_task
from medunet.data.phantom import make_phantom_task
from medunet.data.presets import PRESETS, get_preset, preset_for_task
from medunet.errors import MedunetError

MSD_TASKS = ("Task01_BrainTumour", "Task02_Heart", "Task03_Liver", "Task04_Hippocampus", "Task05_Prostate",
             "Task06_Lung", "Task07_Pancreas", "Task08_HepaticVessel", "Task09_Spleen", "Task10_Colon")


def test_all_ten_msd_tasks_have_presets_with_the_right_intensity_handling() -> None:
    ct_tasks = {"Task03_Liver", "Task06_Lung", "Task07_Pancreas", "Task08_HepaticVessel", "Task09_Spleen",
                "Task10_Colon"}
    for name in MSD_TASKS:
        preset = PRESETS[name]
        assert preset.is_ct == (name in ct_tasks)
        assert (preset.ct_window is not None) == preset.is_ct
        if preset.is_ct:
            assert preset.ct_window[0] < preset.ct_window[1]
        assert all(size % 16 == 0 for size in preset.patch_size)
        assert preset.labels[0] == "background" and preset.out_channels == len(preset.labels)
    assert PRESETS["Task01_BrainTumour"].in_channels == 4 and PRESETS["Task05_Prostate"].in_channels == 2


@pytest.mark.parametrize("name", ["Task04_Hippocampus", "Hippocampus", "hippocampus", "TASK04_HIPPOCAMPUS"])
def test_lookup_by_folder_or_short_name(name: str) -> None:
    assert get_preset(name).name == "Task04_Hippocampus"


def test_unknown_task_lists_the_known_ones() -> None:
    with pytest.raises(MedunetError, match="Task09_Spleen"):
        get_preset("Task42_Kidney")


def test_phantom_preset_follows_the_task_channels(tmp_path: Path) -> None:
    root = make_phantom_task(tmp_path / "anything", kind="mri", num_cases=1, num_test=0, size=(8, 8, 8),
                             channels=3)
    preset = preset_for_task(load_task(root))  # found through dataset.json's name, not the folder
    assert preset.name == "PhantomMRI" and preset.in_channels == 3 and not preset.is_ct


def test_preset_that_disagrees_with_the_task_is_refused(tmp_path: Path) -> None:
    root = make_phantom_task(tmp_path / "Task09_Spleen", kind="ct", num_cases=1, num_test=0, size=(8, 8, 8))
    with pytest.raises(MedunetError, match="expects 1 and \\[0, 1\\]"):
        preset_for_task(load_task(root))  # spleen has one label, the phantom two


@pytest.mark.realdata
def test_real_tasks_match_their_presets(hippocampus_dir: Path, spleen_dir: Path) -> None:
    assert preset_for_task(load_task(hippocampus_dir)).name == "Task04_Hippocampus"
    assert preset_for_task(load_task(spleen_dir)).ct_window == (-57.0, 164.0)
