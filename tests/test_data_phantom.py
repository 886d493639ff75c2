"""Synthetic tasks: MSD layout, CT in HU with anisotropic spacing and non-identity affines, MRI, 4D, seeds."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from medunet.cli import main
from medunet.data.phantom import make_case, make_phantom_task
from medunet.errors import MedunetError


def test_ct_case_is_in_hounsfield_units_with_anisotropic_rotated_grid() -> None:
    image, label, affine = make_case("ct", (24, 24, 16), seed=0)
    assert image.dtype == np.int16 and image.min() <= -950 and 50 <= np.median(image[label == 1]) <= 110
    assert set(np.unique(label)) == {0, 1, 2}
    spacing = np.linalg.norm(affine[:3, :3], axis=0)
    assert 0.7 <= spacing[0] <= 0.9 and spacing[2] == pytest.approx(2.5)
    assert np.linalg.det(affine[:3, :3]) > 0  # two flips keep the handedness
    assert not np.allclose(affine[:3, :3] / spacing, np.eye(3)) and np.abs(affine[:3, 3]).max() > 0


def test_lesion_is_smaller_than_the_organ_and_inside_the_body() -> None:
    image, label, _ = make_case("ct", (32, 32, 24), seed=5)
    assert 0 < (label == 2).sum() < (label == 1).sum()
    assert image[label > 0].min() > -500  # no label voxel in the air


def test_mri_case_is_zero_outside_the_body_and_scales_differ_between_seeds() -> None:
    first, label, _ = make_case("mri", (24, 24, 16), seed=0)
    assert first.dtype == np.float32 and (first == 0).any() and (first[label > 0] > 0).all()
    maxima = [make_case("mri", (12, 12, 8), seed=seed)[0].max() for seed in range(6)]
    assert max(maxima) / min(maxima) > 10  # no absolute scale: normalisation must cope


def test_cases_are_deterministic_given_the_seed() -> None:
    first = make_case("ct", (16, 16, 8), seed=4)
    again = make_case("ct", (16, 16, 8), seed=4)
    other = make_case("ct", (16, 16, 8), seed=5)
    assert all(np.array_equal(a, b) for a, b in zip(first, again, strict=True))
    assert not np.array_equal(first[0], other[0])


def test_multichannel_case_is_four_d_with_distinct_channels() -> None:
    image, label, _ = make_case("mri", (16, 16, 8), seed=0, channels=3)
    assert image.shape == (16, 16, 8, 3) and label.shape == (16, 16, 8)
    assert not np.allclose(image[..., 0] / image[..., 0].max(), image[..., 1] / image[..., 1].max())


def test_task_is_written_in_msd_form(tmp_path: Path) -> None:
    root = make_phantom_task(tmp_path / "Task90_PhantomCT", kind="ct", num_cases=2, num_test=1, size=(12, 12, 8))
    dataset = json.loads((root / "dataset.json").read_text(encoding="utf-8"))
    assert dataset["modality"] == {"0": "CT"} and dataset["labels"]["2"] == "lesion"
    assert dataset["numTraining"] == 2 and dataset["test"] == ["./imagesTs/phantom_002.nii.gz"]
    item = dataset["training"][1]
    image, label = nib.load(root / item["image"]), nib.load(root / item["label"])
    assert image.shape == label.shape == (12, 12, 8)
    np.testing.assert_allclose(image.affine, label.affine)


def test_make_phantom_cli_writes_a_four_d_mri_task(tmp_path: Path) -> None:
    out = tmp_path / "Task91_PhantomMRI"
    assert main(["make-phantom", str(out), "--kind", "mri", "--cases", "1", "--test-cases", "0",
                 "--size", "10", "12", "8", "--channels", "2", "--seed", "3"]) == 0
    dataset = json.loads((out / "dataset.json").read_text(encoding="utf-8"))
    assert dataset["modality"] == {"0": "T1", "1": "T2"} and dataset["tensorImageSize"] == "4D"
    assert nib.load(out / "imagesTr" / "phantom_000.nii.gz").shape == (10, 12, 8, 2)


def test_bad_phantom_arguments_are_refused_with_a_fix() -> None:
    with pytest.raises(MedunetError, match="--kind"):
        make_case("pet")
    with pytest.raises(MedunetError, match="--size"):
        make_case("ct", (2, 16, 16))
