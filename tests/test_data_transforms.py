"""Transform chains from presets: patches, intensities, spacing, invertibility, and dataset caching."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.data import CacheDataset, Dataset, PersistentDataset
from monai.transforms import Invertd

from medunet.data.dataset import build_dataset
from medunet.data.msd import load_task
from medunet.data.phantom import make_phantom_task
from medunet.data.presets import preset_for_task
from medunet.data.transforms import infer_transforms, train_transforms, val_transforms
from medunet.errors import MedunetError


@pytest.fixture(scope="module")
def ct_task(tmp_path_factory: pytest.TempPathFactory):
    root = make_phantom_task(tmp_path_factory.mktemp("tf") / "Task90_PhantomCT", kind="ct", num_cases=2,
                             num_test=1, size=(32, 32, 24))
    return load_task(root)


@pytest.fixture(scope="module")
def mri_task(tmp_path_factory: pytest.TempPathFactory):
    root = make_phantom_task(tmp_path_factory.mktemp("tf") / "Task91_PhantomMRI", kind="mri", num_cases=1,
                             num_test=0, size=(24, 24, 16), channels=2)
    return load_task(root)


def test_train_chain_yields_patches_of_the_preset_size_with_windowed_intensity(ct_task) -> None:
    preset = preset_for_task(ct_task)
    patches = train_transforms(preset, num_samples=3)(ct_task.training[0].as_dict())
    assert len(patches) == 3
    for patch in patches:
        assert patch["image"].shape == patch["label"].shape == (1, *preset.patch_size)
        assert -0.2 <= patch["image"].min() and patch["image"].max() <= 1.3  # window [0, 1], +-10 % scale/shift
        assert set(torch.unique(patch["label"]).tolist()) <= {0.0, 1.0, 2.0}
    assert any((patch["label"] > 0).any() for patch in patches)  # half the patches centre on foreground


def test_val_chain_resamples_to_target_spacing_in_ras(ct_task) -> None:
    preset = preset_for_task(ct_task)
    out = val_transforms(preset)(ct_task.training[0].as_dict())
    np.testing.assert_allclose(out["image"].pixdim.numpy(), preset.target_spacing, atol=1e-4)
    assert out["image"].shape == out["label"].shape
    diagonal = np.diag(out["image"].affine.numpy()[:3, :3])
    assert (diagonal > 0).all()  # RAS: axes point right, anterior, superior
    assert 0.0 <= out["image"].min() and out["image"].max() <= 1.0


def test_inverting_the_val_chain_restores_the_original_label_grid(ct_task) -> None:
    preset = preset_for_task(ct_task)
    chain = val_transforms(preset)
    item = ct_task.training[1].as_dict()
    out = chain(item)
    restored = Invertd(keys="label", transform=chain, orig_keys="label", nearest_interp=True)(out)["label"]
    original = nib.load(item["label"])
    assert tuple(restored.shape[1:]) == original.shape
    np.testing.assert_allclose(restored.affine.numpy(), original.affine, atol=1e-4)
    agreement = (restored[0].numpy() == np.asarray(original.dataobj)).mean()
    assert agreement > 0.95  # 2x down then up in-plane with nearest neighbour loses a thin rim only


def test_infer_chain_works_on_unlabelled_images_and_records_its_operations(ct_task) -> None:
    preset = preset_for_task(ct_task)
    out = infer_transforms(preset)({"image": str(ct_task.test[0].image)})
    operations = [op["class"] for op in out["image"].applied_operations]
    assert operations == ["Orientation", "SpatialResample", "CropForeground"]


def test_mri_chain_z_scores_each_channel_over_non_zero_voxels(mri_task) -> None:
    preset = preset_for_task(mri_task)
    image = val_transforms(preset)(mri_task.training[0].as_dict())["image"]
    assert image.shape[0] == 2
    for channel in image:
        body = channel[channel != 0]
        assert abs(body.mean().item()) < 1e-3 and abs(body.std().item() - 1.0) < 1e-2


@pytest.mark.parametrize("cache", ["none", "memory", "disk"])
def test_build_dataset_per_cache_mode(ct_task, tmp_path: Path, cache: str) -> None:
    preset = preset_for_task(ct_task)
    data = [case.as_dict() for case in ct_task.training]
    dataset = build_dataset(data, val_transforms(preset), cache=cache, cache_dir=tmp_path / "cache")
    expected = {"none": Dataset, "memory": CacheDataset, "disk": PersistentDataset}[cache]
    assert type(dataset) is expected and len(dataset) == 2
    assert dataset[0]["image"].shape == val_transforms(preset)(data[0])["image"].shape
    if cache == "disk":
        assert len(list((tmp_path / "cache").glob("*.pt"))) == 1


def test_disk_cache_is_recomputed_for_a_file_changed_since_and_reused_otherwise(ct_task, tmp_path: Path) -> None:
    import shutil

    import nibabel as nib
    import numpy as np

    preset = preset_for_task(ct_task)
    case = ct_task.training[0].as_dict()
    for key in ("image", "label"):
        case[key] = str(shutil.copy(case[key], tmp_path / Path(case[key]).name))
    cache = tmp_path / "cache"
    first = build_dataset([case], val_transforms(preset), cache="disk", cache_dir=cache)[0]
    assert first["label"].sum() > 0
    again = build_dataset([case], val_transforms(preset), cache="disk", cache_dir=cache)[0]
    assert len(list(cache.glob("*.pt"))) == 1 and torch.equal(again["label"], first["label"])  # reused

    label = nib.load(case["label"])  # the label map repaired: every voxel background now
    nib.save(nib.Nifti1Image(np.zeros(label.shape, np.uint8), label.affine, label.header), case["label"])
    changed = build_dataset([case], val_transforms(preset), cache="disk", cache_dir=cache)[0]
    assert changed["label"].sum() == 0 and len(list(cache.glob("*.pt"))) == 2  # not the stale entry


def test_disk_cache_without_a_folder_and_unknown_modes_are_refused() -> None:
    with pytest.raises(MedunetError, match="cache_dir"):
        build_dataset([], lambda x: x, cache="disk")
    with pytest.raises(MedunetError, match="unknown cache mode"):
        build_dataset([], lambda x: x, cache="ram")


@pytest.mark.realdata
def test_real_hippocampus_case_goes_through_the_train_chain(hippocampus_dir: Path) -> None:
    task = load_task(hippocampus_dir)
    preset = preset_for_task(task)
    patches = train_transforms(preset, num_samples=1)(task.training[0].as_dict())
    assert patches[0]["image"].shape == (1, 48, 64, 48)


@pytest.mark.realdata
def test_real_spleen_val_chain_crops_to_the_body_and_inverts(spleen_dir: Path) -> None:
    task = load_task(spleen_dir)
    chain = val_transforms(preset_for_task(task))
    out = chain(task.training[0].as_dict())
    restored = Invertd(keys="label", transform=chain, orig_keys="label", nearest_interp=True)(out)["label"]
    assert tuple(restored.shape[1:]) == (164, 166, 26)
