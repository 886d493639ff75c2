"""Inference writes label maps in each input's original space: phantoms (rotated, flipped, anisotropic),
a DICOM series, the real Spleen CT case, and the demo's held-out predictions."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk
import torch

from medunet.data import get_preset, make_phantom_task
from medunet.engines.inference import collect_inputs, predict
from medunet.errors import MedunetError


class IntensityThreshold(torch.nn.Module):
    """A fixed 'network' whose logits say label 1 where the preprocessed image is above ``threshold``.

    Its output depends only on the voxel under it, so any flip, shift or resampling error in the inference
    chain shows up as a misplaced label map.
    """

    def __init__(self, threshold: float, out_channels: int = 3) -> None:
        super().__init__()
        self.threshold, self.out_channels = threshold, out_channels

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        foreground = (image[:, :1] > self.threshold).float()
        logits = torch.zeros((image.shape[0], self.out_channels, *image.shape[2:]), dtype=image.dtype)
        logits[:, 0:1] = 1.0 - foreground
        logits[:, 1:2] = foreground
        return logits


def dice(a: np.ndarray, b: np.ndarray) -> float:
    return 2.0 * np.logical_and(a, b).sum() / (a.sum() + b.sum())


@pytest.fixture(scope="module")
def ct_phantom(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two CT phantoms: 0.7-0.9 x 0.7-0.9 x 2.5 mm voxels, x/y flipped and rotated about z."""
    return make_phantom_task(tmp_path_factory.mktemp("ct") / "Task90_PhantomCT", kind="ct", num_cases=2,
                             num_test=0, size=(40, 36, 20))


def test_phantom_predictions_keep_shape_affine_and_land_on_the_organ(ct_phantom: Path, tmp_path: Path) -> None:
    preset = get_preset("PhantomCT")  # resamples to 1.6 x 1.6 x 2.5 mm, crops to the body
    # Organ (80 HU) and lesion (35 HU) versus soft tissue (20 HU), after the [-200, 300] HU window.
    network = IntensityThreshold(threshold=(57.0 + 200.0) / 500.0)
    written = predict(network, preset, ct_phantom / "imagesTr", tmp_path / "pred", progress=False)
    assert [p.name for p in written] == ["phantom_000.nii.gz", "phantom_001.nii.gz"]
    for path in written:
        image = nib.load(ct_phantom / "imagesTr" / path.name)
        reference = np.asarray(nib.load(ct_phantom / "labelsTr" / path.name).dataobj)
        prediction = nib.load(path)
        assert prediction.shape == image.shape
        np.testing.assert_allclose(prediction.affine, image.affine, atol=1e-4)
        assert prediction.get_data_dtype() == np.uint8
        organ = np.asarray(prediction.dataobj) == 1
        assert dice(organ, reference == 1) > 0.8  # a flip or shift of the grid would ruin this


def test_stitching_on_the_cpu_gives_the_whole_volume_prediction(ct_phantom: Path, tmp_path: Path) -> None:
    """Many small windows stitched on the CPU against one window holding the whole (resampled 24x24x32)
    volume, where no stitching happens: a voxelwise network must give the same labels either way."""
    network = IntensityThreshold(threshold=0.5)
    preset = get_preset("PhantomCT")
    image = ct_phantom / "imagesTr" / "phantom_000.nii.gz"
    (whole,) = predict(network, preset, image, tmp_path / "whole", roi_size=(64, 64, 64), progress=False)
    (stitched,) = predict(network, preset, image, tmp_path / "cpu", roi_size=(8, 8, 8), overlap=0.5,
                          stitch_on_cpu=True, progress=False)
    labels = np.asarray(nib.load(whole).dataobj)
    assert 0 < (labels == 1).mean() < 1  # the threshold splits the volume: the comparison means something
    np.testing.assert_array_equal(labels, np.asarray(nib.load(stitched).dataobj))


def test_dicom_series_folder_is_predicted_in_its_own_space(ct_phantom: Path, tmp_path: Path) -> None:
    volume = sitk.ReadImage(str(ct_phantom / "imagesTr" / "phantom_000.nii.gz"))
    series = tmp_path / "series_000"
    series.mkdir()
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    for z in range(volume.GetDepth()):
        slice_ = volume[:, :, z]
        slice_.SetMetaData("0020|0032", "\\".join(map(str, volume.TransformIndexToPhysicalPoint((0, 0, z)))))
        slice_.SetMetaData("0020|0037", "\\".join(map(str, volume.GetDirection()[0:3] + volume.GetDirection()[3:6])))
        slice_.SetMetaData("0020|0013", str(z))
        slice_.SetMetaData("0008|0060", "CT")
        slice_.SetMetaData("0020|000d", "1.2.826.0.1.3680043.2.1125.1")  # one study and series for all slices
        slice_.SetMetaData("0020|000e", "1.2.826.0.1.3680043.2.1125.1.2")
        slice_.SetMetaData("0008|0018", f"1.2.826.0.1.3680043.2.1125.1.2.{z + 1}")
        writer.SetFileName(str(series / f"slice_{z:03d}.dcm"))
        writer.Execute(slice_)
    assert collect_inputs(series) == [{"image": str(series)}]

    (written,) = predict(IntensityThreshold(0.5), get_preset("PhantomCT"), series, tmp_path / "pred", progress=False)
    assert written.name == "series_000.nii.gz"
    dicom = sitk.ReadImage(sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(series)))
    prediction = sitk.ReadImage(str(written))
    assert prediction.GetSize() == dicom.GetSize()
    np.testing.assert_allclose(prediction.GetOrigin(), dicom.GetOrigin(), atol=1e-3)
    np.testing.assert_allclose(prediction.GetSpacing(), dicom.GetSpacing(), atol=1e-4)
    np.testing.assert_allclose(prediction.GetDirection(), dicom.GetDirection(), atol=1e-4)


def test_real_spleen_ct_prediction_keeps_shape_and_affine(spleen_dir: Path, tmp_path: Path) -> None:
    image_path = spleen_dir / "imagesTr" / "spleen_2.nii.gz"
    preset = get_preset("Task09_Spleen")  # 0.79 x 0.79 x 5 mm, HU window, crop to the body
    network = IntensityThreshold(threshold=0.5, out_channels=2)
    (written,) = predict(network, preset, image_path, tmp_path / "pred", progress=False)
    image, prediction = nib.load(image_path), nib.load(written)
    assert written.name == "spleen_2.nii.gz"
    assert prediction.shape == image.shape == (164, 166, 26)
    np.testing.assert_allclose(prediction.affine, image.affine, atol=1e-4)
    labels = np.unique(np.asarray(prediction.dataobj))
    assert set(labels.tolist()) == {0, 1}


def test_missing_input_is_named_with_the_fix(tmp_path: Path) -> None:
    with pytest.raises(MedunetError, match="does not exist"):
        collect_inputs(tmp_path / "nothing.nii.gz")
    (tmp_path / "empty").mkdir()
    with pytest.raises(MedunetError, match="no images"):
        collect_inputs(tmp_path / "empty")


def test_demo_trains_predicts_held_out_cases_in_original_space_and_reports(tmp_path: Path) -> None:
    from medunet.engines.demo import run_demo

    summary = run_demo(tmp_path / "demo", network="lunet_small_4f", epochs=1, progress=False, epoch_length=2,
                       phantom_cases=5, patch_size=[16, 16, 16], num_samples=2, batch_size=1)
    task_dir = tmp_path / "demo" / "Task91_PhantomMRI"
    assert len(summary["predictions"]) == 1 and set(summary["dice"]) == {"organ", "lesion"}
    for path in map(Path, summary["predictions"]):
        image = nib.load(task_dir / "imagesTr" / path.name)
        prediction = nib.load(path)
        assert prediction.shape == image.shape
        np.testing.assert_allclose(prediction.affine, image.affine, atol=1e-4)
    evaluation = tmp_path / "demo" / "run" / "evaluation"
    assert {"cases.csv", "summary.json", "report.html"} <= {p.name for p in evaluation.iterdir()}
    assert json.loads((evaluation / "summary.json").read_text(encoding="utf-8"))
