"""The training recipe's augmentation (``augment`` workflow key): nnU-Net's transforms, foreground oversampling."""

from __future__ import annotations

import math
from dataclasses import replace

import pytest
import torch
from monai.transforms import (
    Compose,
    RandAdjustContrastd,
    RandAffined,
    RandCropByPosNegLabeld,
    RandFlipd,
    RandGaussianNoised,
    RandGaussianSmoothd,
    RandScaleIntensityd,
    RandScaleIntensityFixedMeand,
    RandShiftIntensityd,
    RandSimulateLowResolutiond,
    RandZoomd,
)

from medunet.data.msd import load_task
from medunet.data.phantom import make_phantom_task
from medunet.data.presets import preset_for_task
from medunet.data.transforms import rotated_patch_size, spatial_augmentation, train_transforms
from medunet.engines.training import SegmentationTraining
from medunet.errors import MedunetError


@pytest.fixture(scope="module", params=["ct", "mri"])
def task(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory):
    root = make_phantom_task(tmp_path_factory.mktemp("recipe") / f"Task9{0 if request.param == 'ct' else 1}_Phantom"
                             f"{request.param.upper()}", kind=request.param, num_cases=1, num_test=0, size=(40, 40, 32))
    return load_task(root)


def _random(chain: Compose, kind: type) -> list:
    return [t for t in chain.transforms if isinstance(t, kind)]


def test_nnunet_chain_yields_patches_of_the_patch_size_with_whole_labels(task) -> None:
    preset = replace(preset_for_task(task), patch_size=(16, 24, 16))
    chain = train_transforms(preset, num_samples=6, augment="nnunet")
    chain.set_random_state(0)
    patches = [p for _ in range(3) for p in chain(task.training[0].as_dict())]
    labels = set(task.labels)
    for patch in patches:
        assert patch["image"].shape == patch["label"].shape == (1, 16, 24, 16)
        assert set(torch.unique(patch["label"]).tolist()) <= {float(v) for v in labels}  # nearest: no mixed labels
        assert torch.isfinite(patch["image"]).all()
    assert any((patch["label"] > 0).any() for patch in patches)


def test_nnunet_parameters_are_nnunets(task) -> None:
    chain = train_transforms(preset_for_task(task), augment="nnunet")
    (crop,) = _random(chain, RandCropByPosNegLabeld)
    assert crop.cropper.pos_ratio == pytest.approx(1 / 3)  # a third of the patches centred on foreground
    (rotate,) = _random(chain, RandAffined)
    assert rotate.prob == 0.2 and tuple(rotate.rand_affine.rand_affine_grid.rotate_range) == (math.pi / 6,) * 3
    (zoom,) = _random(chain, RandZoomd)
    assert zoom.prob == 0.2 and (list(zoom.rand_zoom.min_zoom), list(zoom.rand_zoom.max_zoom)) == ([0.7], [1.4])
    assert [t.prob for t in _random(chain, RandGaussianNoised)] == [0.1]
    (blur,) = _random(chain, RandGaussianSmoothd)
    assert blur.prob == 0.2 and tuple(blur.rand_smooth.sigma_x) == (0.5, 1.0)
    (brightness,) = _random(chain, RandScaleIntensityd)
    assert brightness.prob == 0.15 and tuple(brightness.scaler.factors) == (-0.25, 0.25)
    assert [t.prob for t in _random(chain, RandScaleIntensityFixedMeand)] == [0.15]  # contrast
    (lowres,) = _random(chain, RandSimulateLowResolutiond)
    assert lowres.prob == 0.25 and tuple(lowres.sim_lowres_tfm.zoom_range) == (0.5, 1.0)
    gammas = _random(chain, RandAdjustContrastd)
    assert [(g.prob, g.adjuster.invert_image, tuple(g.adjuster.gamma)) for g in gammas] == [(0.1, True, (0.7, 1.5)),
                                                                                   (0.3, False, (0.7, 1.5))]
    assert sorted(f.flipper.spatial_axis for f in _random(chain, RandFlipd)) == [0, 1, 2]  # mirroring, all axes


def test_light_stays_the_default_chain_and_none_only_crops(task) -> None:
    preset = preset_for_task(task)
    light = train_transforms(preset)
    assert [type(t) for t in light.transforms] == [type(t) for t in train_transforms(preset, augment="light").transforms]
    (crop,) = _random(light, RandCropByPosNegLabeld)
    assert crop.cropper.pos_ratio == 0.5
    assert len(_random(light, RandFlipd)) == 3 and _random(light, RandShiftIntensityd)
    assert not _random(light, RandAffined)
    bare = train_transforms(preset, augment="none")
    assert not _random(bare, RandFlipd) and not _random(bare, RandScaleIntensityd)


def _centre_on_foreground(augment: str, task, draws: int) -> float:
    preset = replace(preset_for_task(task), patch_size=(8, 8, 8))
    chain = train_transforms(preset, num_samples=draws, augment=augment)
    chain.set_random_state(1)
    patches = chain(task.training[0].as_dict())
    return sum(bool((p["label"][:, 3:5, 3:5, 3:5] > 0).any()) for p in patches) / len(patches)


def test_foreground_oversampling_is_a_third_with_nnunet_and_a_half_by_default(task) -> None:
    if task.root.name.endswith("CT"):
        pytest.skip("one modality is enough for the sampling ratio")
    nnunet, light = _centre_on_foreground("nnunet", task, 240), _centre_on_foreground("light", task, 240)
    assert 0.22 < nnunet < 0.45 < light < 0.65, (nnunet, light)


def test_the_enlarged_crop_survives_any_rotation_without_padding() -> None:
    patch = (16, 24, 16)
    crop = rotated_patch_size(patch)
    assert all(c > p for c, p in zip(crop, patch))
    chain = Compose(spatial_augmentation(["image", "label"], patch, rotate_prob=1.0, scale_prob=0.0))
    chain.set_random_state(0)
    for _ in range(40):
        out = chain({"image": torch.ones(1, *crop), "label": torch.ones(1, *crop)})
        assert out["image"].shape == (1, *patch)
        assert (out["image"] > 0.99).all() and (out["label"] == 1).all()  # no voxel from outside the crop


def test_an_unknown_augmentation_is_refused_with_the_fix(task, tmp_path) -> None:
    with pytest.raises(MedunetError, match="augment is 'strong'.*Fix: --set augment=nnunet"):
        train_transforms(preset_for_task(task), augment="strong")
    with pytest.raises(MedunetError, match="augment.*Fix: --set augment=nnunet"):
        SegmentationTraining(tmp_path / "run", task.root, tmp_path / "folds.json", 0, torch.nn.Identity(),
                             augment="strong")
