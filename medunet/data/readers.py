"""Image readers: NIfTI through nibabel, everything else (DICOM series, MHA/MHD, NRRD) through SimpleITK.

``SimpleITKReader`` is a MONAI ``ImageReader``, so all formats go through the same ``LoadImaged`` pipeline
and come out with the same metadata (RAS ``affine``, ``spatial_shape``, ``original_channel_dim``).
``load_image_transform`` builds the ``LoadImaged`` that the transform chains use: NIfTI stays with MONAI's
``NibabelReader``, the SimpleITK formats are picked by suffix.

``read_header`` and ``read_array`` are the light-weight readers ``check_task`` uses: header only where the
format allows it, then the voxels when they are needed.

Every file is checked with ``medunet.integrity.verify_complete`` before it is trusted (ITK reads a gzip cut to
2/3 of its bytes without an error): ``CheckedNibabelReader`` and ``SimpleITKReader`` inside ``LoadImaged``
(training and inference), ``read_sitk_image`` and ``read_array`` for ``check_task``.
"""

from __future__ import annotations

import gzip
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import nibabel as nib
import numpy as np
from monai.config import KeysCollection, PathLike
from monai.data import ImageReader, NibabelReader
from monai.data.utils import orientation_ras_lps
from monai.transforms import LoadImaged
from monai.utils import MetaKeys, SpaceKeys, ensure_tuple

from medunet.image_files import (
    IMAGE_SUFFIXES,
    NIFTI_SUFFIXES,
    SIMPLEITK_SUFFIXES,
    has_suffix,
    strip_image_suffix,
)
from medunet.integrity import IncompleteFileError, nifti_voxel_bytes, verify_complete

# Re-exported: the readers' completeness check and the suffixes they claim (defined in medunet.image_files).
__all__ = ["IMAGE_SUFFIXES", "IncompleteFileError", "has_suffix", "strip_image_suffix", "verify_complete"]

if TYPE_CHECKING:
    import SimpleITK as sitk


def simpleitk():
    """The SimpleITK module, imported on first use: NIfTI-only work (the usual case) never loads ITK."""
    import SimpleITK

    return SimpleITK


def _dicom_series_files(folder: Path) -> list[str]:
    """The file names of the first DICOM series in ``folder``, sorted by slice position."""
    series_ids = simpleitk().ImageSeriesReader.GetGDCMSeriesIDs(str(folder))
    if not series_ids:
        raise FileNotFoundError(f"no DICOM series in folder {folder}")
    return list(simpleitk().ImageSeriesReader.GetGDCMSeriesFileNames(str(folder), series_ids[0]))


def read_sitk_image(path: PathLike) -> sitk.Image:
    """Read any SimpleITK-supported file, or a folder holding one DICOM series, as a ``sitk.Image``.

    Files are checked with ``verify_complete`` first: ITK reads some truncated files without an error.
    """
    path = Path(path)
    if path.is_dir():
        reader = simpleitk().ImageSeriesReader()
        reader.SetFileNames(_dicom_series_files(path))
        return reader.Execute()
    verify_complete(path)
    return simpleitk().ReadImage(str(path))


def _sitk_affine_ras(image: sitk.Image | sitk.ImageFileReader) -> np.ndarray:
    """The 4x4 voxel-to-world affine in RAS (NIfTI/nibabel convention) of the spatial part of ``image``.

    Takes an image or an ``ImageFileReader`` after ``ReadImageInformation`` (same geometry getters).
    """
    dim = image.GetDimension()
    spatial = min(dim, 3)
    direction = np.asarray(image.GetDirection(), dtype=np.float64).reshape(dim, dim)[:spatial, :spatial]
    spacing = np.asarray(image.GetSpacing(), dtype=np.float64)[:spatial]
    origin = np.asarray(image.GetOrigin(), dtype=np.float64)[:spatial]
    affine = np.eye(spatial + 1)
    affine[:spatial, :spatial] = direction @ np.diag(spacing)
    affine[:spatial, -1] = origin
    return orientation_ras_lps(affine)  # ITK stores LPS; flip x and y to RAS


def _sitk_array(image: sitk.Image) -> np.ndarray:
    """Voxels in x, y, z(, channel) order, like nibabel: SimpleITK returns z, y, x(, channel)."""
    array = simpleitk().GetArrayFromImage(image)
    if image.GetNumberOfComponentsPerPixel() > 1:  # vector image: channel is last already
        return np.moveaxis(array, -1, 0).T
    # A 4D scalar image (e.g. a 4D NIfTI through SimpleITK) comes back t, z, y, x: .T gives x, y, z, t.
    return array.T


class SimpleITKReader(ImageReader):
    """MONAI ``ImageReader`` backed by SimpleITK: DICOM series folders, MHA/MHD, NRRD, and also NIfTI.

    The output matches ``NibabelReader``: array in x, y, z(, channel) order, ``affine`` in RAS,
    ``original_channel_dim`` -1 for multi-channel images and NaN ("no channel") otherwise.

    Args:
        claim_nifti: whether ``verify_suffix`` accepts ``.nii``/``.nii.gz`` too (default False, so a
            ``LoadImage`` with automatic reader selection keeps NIfTI with nibabel). ``read`` handles NIfTI
            either way, so ``LoadImaged(keys, reader=SimpleITKReader())`` reads NIfTI through SimpleITK.

    Example::

        LoadImaged("image", reader=SimpleITKReader())({"image": "ct.mha"})["image"].shape
    """

    def __init__(self, claim_nifti: bool = False) -> None:
        super().__init__()
        self.claim_nifti = claim_nifti

    def verify_suffix(self, filename: Sequence[PathLike] | PathLike) -> bool:
        """Whether every name is a DICOM folder or has a SimpleITK suffix (NIfTI only if ``claim_nifti``).

        Args:
            filename: a file or folder name, or a sequence of them (stacked as channels).
        """
        suffixes = SIMPLEITK_SUFFIXES + (NIFTI_SUFFIXES if self.claim_nifti else ())
        return all(Path(name).is_dir() or has_suffix(name, suffixes) for name in ensure_tuple(filename))

    def read(self, data: Sequence[PathLike] | PathLike, **kwargs) -> sitk.Image | list[sitk.Image]:
        """Read one image (or several, to be stacked as channels) as ``sitk.Image`` objects.

        Args:
            data: a file or DICOM folder name, or a sequence of them.
            kwargs: unused; accepted for the ``ImageReader`` interface.
        """
        images = [read_sitk_image(name) for name in ensure_tuple(data)]
        return images if len(images) > 1 else images[0]

    def get_data(self, img: sitk.Image | Sequence[sitk.Image]) -> tuple[np.ndarray, dict]:
        """The voxel array and MONAI metadata; several images are stacked on a new first (channel) axis.

        Args:
            img: a ``sitk.Image`` from ``read`` or a sequence of them.
        """
        arrays, metas = [], []
        # Not ensure_tuple: a sitk.Image is itself iterable (over its pixels).
        for image in [img] if isinstance(img, simpleitk().Image) else img:
            array = _sitk_array(image)
            spatial_shape = np.asarray(image.GetSize()[:3])
            affine = _sitk_affine_ras(image)
            metas.append(
                {
                    MetaKeys.AFFINE: affine,
                    MetaKeys.ORIGINAL_AFFINE: affine.copy(),
                    MetaKeys.SPATIAL_SHAPE: spatial_shape,
                    MetaKeys.SPACE: SpaceKeys.RAS,
                    MetaKeys.ORIGINAL_CHANNEL_DIM: -1 if array.ndim > len(spatial_shape) else float("nan"),
                    "spacing": np.asarray(image.GetSpacing()[:3]),
                }
            )
            arrays.append(array)
        if len(arrays) == 1:
            return arrays[0], metas[0]
        for meta in metas[1:]:
            if not np.allclose(meta[MetaKeys.AFFINE], metas[0][MetaKeys.AFFINE], atol=1e-3):
                raise ValueError("images stacked as channels must share one affine")
        meta = dict(metas[0], **{MetaKeys.ORIGINAL_CHANNEL_DIM: 0})
        return np.stack(arrays, axis=0), meta


class CheckedNibabelReader(NibabelReader):
    """MONAI's ``NibabelReader`` that runs ``verify_complete`` on each file first.

    nibabel stops reading a ``.nii.gz`` once it has the voxels, so without the check a file with a damaged
    end would pass; the check costs a header read and the gzip trailer (no second decompression).

    Args:
        args, kwargs: passed to ``NibabelReader`` (e.g. ``as_closest_canonical``).
    """

    def read(self, data: Sequence[PathLike] | PathLike, **kwargs):
        """Verify then read one file, or several to be stacked as channels (see ``NibabelReader.read``).

        Args:
            data: a file name or a sequence of them.
            kwargs: passed to ``nibabel.load``.
        """
        for name in ensure_tuple(data):
            verify_complete(name)
        return super().read(data, **kwargs)


def load_image_transform(keys: KeysCollection, **kwargs) -> LoadImaged:
    """A ``LoadImaged`` that reads NIfTI with nibabel and DICOM/MHA/MHD/NRRD with ``SimpleITKReader``.

    Readers registered last are tried first, by suffix: SimpleITK claims its formats, NIfTI goes to
    ``CheckedNibabelReader`` (MONAI's ``NibabelReader`` after ``verify_complete``). Both refuse files cut short
    with ``IncompleteFileError``.

    Args:
        keys: the data keys to load (e.g. ``("image", "label")``).
        kwargs: passed to ``LoadImaged`` (e.g. ``image_only``, ``dtype``).
    """
    loader = LoadImaged(keys, **kwargs)
    loader.register(CheckedNibabelReader())
    loader.register(SimpleITKReader())
    return loader


@dataclass(frozen=True)
class ImageHeader:
    """What ``check_task`` needs from a file without its voxels: spatial shape, channels, RAS affine."""

    spatial_shape: tuple[int, ...]
    channels: int
    affine: np.ndarray


def read_header(path: PathLike) -> ImageHeader:
    """Read the spatial shape, channel count and RAS affine; for NIfTI from the header alone.

    Args:
        path: an image file or DICOM folder. Raises whatever the underlying reader raises if unreadable.
    """
    path = Path(path)
    if has_suffix(path, NIFTI_SUFFIXES):
        image = nib.load(str(path))
        shape = tuple(int(s) for s in image.shape)
        channels = shape[3] if len(shape) > 3 else 1
        return ImageHeader(shape[:3], channels, np.asarray(image.affine, dtype=np.float64))
    if path.is_dir():  # a DICOM series: its shape and affine belong to the whole volume, so read it
        source = read_sitk_image(path)
        channels = source.GetNumberOfComponentsPerPixel()
    else:
        source = simpleitk().ImageFileReader()
        source.SetFileName(str(path))
        source.ReadImageInformation()
        channels = source.GetNumberOfComponents()
    size = tuple(int(s) for s in source.GetSize())
    if len(size) > 3:  # a 4D scalar image: the fourth axis holds the channels
        channels = size[3]
    return ImageHeader(size[:3], channels, _sitk_affine_ras(source))


def read_array(path: PathLike) -> np.ndarray:
    """Read all voxels of an image file or DICOM folder, x, y, z(, channel) order, stored dtype.

    Args:
        path: an image file or DICOM folder. Raises ``IncompleteFileError`` for a file cut short, whatever the
            underlying reader raises if unreadable.
    """
    if has_suffix(path, (".nii.gz",)):
        # Decompress the whole stream so a damaged gzip payload or CRC is caught; nibabel alone stops
        # reading after the voxels it needs and never verifies the checksum. That decompression is also the
        # completeness check (verify_complete would only repeat it for a multi-member gzip).
        try:
            raw = gzip.decompress(Path(path).read_bytes())
        except EOFError as error:
            raise IncompleteFileError(path, f"the gzip stream is cut short ({error})") from None
        image = nib.Nifti1Image.from_bytes(raw)
        offset, nbytes = nifti_voxel_bytes(image)
        if len(raw) < offset + nbytes:
            raise IncompleteFileError(path, f"it decompresses to {len(raw)} bytes, its header needs {offset + nbytes}")
        return np.asanyarray(image.dataobj)
    if has_suffix(path, NIFTI_SUFFIXES):
        verify_complete(path)
        return np.asanyarray(nib.load(str(path)).dataobj)
    return _sitk_array(read_sitk_image(path))
