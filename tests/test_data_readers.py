"""SimpleITKReader: MHA, NRRD and DICOM series load through LoadImaged like NIfTI (same array, same affine)."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk
from monai.data import NibabelReader
from monai.transforms import LoadImaged

from medunet.data.phantom import make_case
from medunet.data.readers import SimpleITKReader, load_image_transform, read_array, read_header

SERIES_UID = "1.2.826.0.1.3680043.2.1125.1.7"


def _to_sitk(array: np.ndarray, affine: np.ndarray) -> sitk.Image:
    """An x, y, z array with a RAS affine as a SimpleITK (LPS) image."""
    image = sitk.GetImageFromArray(array.T)  # SimpleITK wants z, y, x
    lps = np.diag([-1.0, -1.0, 1.0]) @ affine[:3, :3]
    spacing = np.linalg.norm(lps, axis=0)
    image.SetSpacing(spacing.tolist())
    image.SetDirection((lps / spacing).flatten().tolist())
    image.SetOrigin((np.diag([-1.0, -1.0, 1.0]) @ affine[:3, 3]).tolist())
    return image


def _write_dicom_series(image: sitk.Image, folder: Path) -> None:
    """One DICOM file per slice, with the tags GDCM needs to rebuild the volume's geometry."""
    folder.mkdir()
    direction = image.GetDirection()
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    for z in range(image.GetDepth()):
        slice_ = image[:, :, z]
        tags = {
            "0008|0060": "CT",
            "0020|000d": SERIES_UID + ".0",
            "0020|000e": SERIES_UID,
            "0020|0037": "\\".join(str(direction[i]) for i in (0, 3, 6, 1, 4, 7)),
            "0020|0032": "\\".join(str(v) for v in image.TransformIndexToPhysicalPoint((0, 0, z))),
            "0020|0013": str(z),
            "0018|0050": str(image.GetSpacing()[2]),
        }
        for key, value in tags.items():
            slice_.SetMetaData(key, value)
        writer.SetFileName(str(folder / f"slice_{z:03d}.dcm"))
        writer.Execute(slice_)


@pytest.fixture(scope="module")
def ct_files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The same CT phantom (rotated, flipped, anisotropic) as NIfTI, MHA, NRRD and a DICOM series."""
    folder = tmp_path_factory.mktemp("readers")
    image, _, affine = make_case("ct", (20, 16, 6), seed=3)
    nib.save(nib.Nifti1Image(image, affine), folder / "ct.nii.gz")
    as_sitk = _to_sitk(image, affine)
    sitk.WriteImage(as_sitk, str(folder / "ct.mha"))
    sitk.WriteImage(as_sitk, str(folder / "ct.nrrd"))
    _write_dicom_series(as_sitk, folder / "ct_dicom")
    return {"nii": folder / "ct.nii.gz", "mha": folder / "ct.mha", "nrrd": folder / "ct.nrrd",
            "dicom": folder / "ct_dicom"}


@pytest.mark.parametrize("kind", ["mha", "nrrd", "dicom"])
def test_default_loader_reads_simpleitk_formats_like_the_nifti(ct_files: dict[str, Path], kind: str) -> None:
    loader = load_image_transform("image")
    reference = loader({"image": str(ct_files["nii"])})["image"]
    loaded = loader({"image": str(ct_files[kind])})["image"]
    assert loaded.shape == reference.shape == (20, 16, 6)
    np.testing.assert_array_equal(loaded.numpy(), reference.numpy())
    np.testing.assert_allclose(loaded.affine.numpy(), reference.affine.numpy(), atol=1e-4)


def test_default_loader_keeps_nifti_with_nibabel(ct_files: dict[str, Path]) -> None:
    loader = load_image_transform("image")
    nifti_reader = next(r for r in loader._loader.readers[::-1] if r.verify_suffix(str(ct_files["nii"])))
    assert isinstance(nifti_reader, NibabelReader)
    assert SimpleITKReader().verify_suffix(str(ct_files["dicom"]))
    assert not SimpleITKReader().verify_suffix(str(ct_files["nii"]))
    assert SimpleITKReader(claim_nifti=True).verify_suffix(str(ct_files["nii"]))


def test_explicit_simpleitk_reader_reads_nifti_like_nibabel(ct_files: dict[str, Path]) -> None:
    data = {"image": str(ct_files["nii"])}
    by_sitk = LoadImaged("image", reader=SimpleITKReader())(data)["image"]
    by_nibabel = LoadImaged("image", reader=NibabelReader())(data)["image"]
    np.testing.assert_array_equal(by_sitk.numpy(), by_nibabel.numpy())
    np.testing.assert_allclose(by_sitk.affine.numpy(), by_nibabel.affine.numpy(), atol=1e-5)


def test_dotted_path_reader_name_works_in_loadimaged(ct_files: dict[str, Path]) -> None:
    loaded = LoadImaged("image", reader="medunet.data.readers.SimpleITKReader")({"image": str(ct_files["mha"])})
    assert loaded["image"].shape == (20, 16, 6)


def test_four_d_nifti_is_channel_last_through_both_readers(tmp_path: Path) -> None:
    image, _, affine = make_case("mri", (10, 12, 8), seed=0, channels=3)
    nib.save(nib.Nifti1Image(image, affine), tmp_path / "mr.nii.gz")
    data = {"image": str(tmp_path / "mr.nii.gz")}
    by_sitk = LoadImaged("image", reader=SimpleITKReader(), ensure_channel_first=True)(data)["image"]
    by_nibabel = LoadImaged("image", ensure_channel_first=True)(data)["image"]
    assert by_sitk.shape == by_nibabel.shape == (3, 10, 12, 8)
    np.testing.assert_allclose(by_sitk.numpy(), by_nibabel.numpy())
    np.testing.assert_allclose(by_sitk.affine.numpy(), by_nibabel.affine.numpy(), atol=1e-5)


@pytest.mark.parametrize("kind", ["nii", "mha", "nrrd", "dicom"])
def test_header_and_array_helpers_agree_across_formats(ct_files: dict[str, Path], kind: str) -> None:
    reference = read_header(ct_files["nii"])
    header = read_header(ct_files[kind])
    assert header.spatial_shape == (20, 16, 6) and header.channels == 1
    np.testing.assert_allclose(header.affine, reference.affine, atol=1e-4)
    np.testing.assert_array_equal(read_array(ct_files[kind]), read_array(ct_files["nii"]))


def test_empty_folder_is_not_a_dicom_series(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="no DICOM series"):
        read_array(tmp_path)
