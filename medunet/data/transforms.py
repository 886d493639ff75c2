"""MONAI transform chains built from a ``TaskPreset``: training, validation and inference.

All three share one preprocessing prefix (``preprocess_transforms``):
load (nibabel for NIfTI, SimpleITK for DICOM/MHA/NRRD) -> channel first -> RAS -> target spacing ->
intensity (CT window to [0, 1], or MRI non-zero z-score per channel) -> crop to the body (CT).
Every step is an invertible MONAI transform, so predictions made on the validation/inference chain can be
mapped back to the original image grid with ``monai.transforms.Invertd(transform=<the chain>)``.

The inference chain also replaces NaN/Inf voxels (``ReplaceNonFinited``, with a warning naming the case):
one NaN would otherwise make the whole normalised image NaN and the prediction all background. Training and
validation keep them, so ``medunet check-data`` and the trainer's non-finite loss guard refuse such data
instead of learning from made-up values.
"""

from __future__ import annotations

import warnings
from collections.abc import Hashable, Mapping, Sequence
from typing import Any

import torch
from monai.config import KeysCollection
from monai.transforms import (
    Compose,
    CropForegroundd,
    EnsureChannelFirstd,
    EnsureTyped,
    MapTransform,
    NormalizeIntensityd,
    Orientationd,
    RandCropByPosNegLabeld,
    RandFlipd,
    RandScaleIntensityd,
    RandShiftIntensityd,
    ScaleIntensityRanged,
    Spacingd,
    SpatialPadd,
)

from medunet.data.presets import TaskPreset
from medunet.data.readers import load_image_transform


class ReplaceNonFinited(MapTransform):
    """Replace NaN and +/-Inf voxels by ``fill_value``, warning with the case and how many voxels.

    Args:
        keys: the image key(s).
        fill_value: the value non-finite voxels get (see ``non_finite_fill_value`` for the one that matches a preset).
        allow_missing_keys: skip keys absent from the data.

    Example::

        ReplaceNonFinited("image", fill_value=0.0)({"image": torch.tensor([[1.0, float("nan")]])})["image"]
    """

    def __init__(self, keys: KeysCollection, fill_value: float = 0.0, allow_missing_keys: bool = False) -> None:
        super().__init__(keys, allow_missing_keys)
        self.fill_value = float(fill_value)

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        """Return a copy of ``data`` whose images hold only finite values (the tensors are changed in place)."""
        data = dict(data)
        for key in self.key_iterator(data):
            image = data[key]
            tensor = image if isinstance(image, torch.Tensor) else torch.as_tensor(image)
            if not tensor.is_floating_point():
                continue  # integer voxels are always finite
            bad = ~torch.isfinite(tensor)
            count = int(bad.sum())
            if count:
                meta = getattr(image, "meta", {})
                case = meta.get("filename_or_obj", key)
                warnings.warn(
                    f"{case}: {count} of {tensor.numel()} voxels ({100.0 * count / tensor.numel():.2g}%) are NaN or "
                    f"infinite; they are set to {self.fill_value:g} (background) before normalisation. Fix: repair "
                    "the image (numpy.nan_to_num) or re-export it; 'medunet check-data' finds such images.",
                    stacklevel=2,
                )
                tensor.masked_fill_(bad, self.fill_value)  # in place: a freshly loaded image keeps its metadata
                data[key] = image if isinstance(image, torch.Tensor) else tensor
        return data


def non_finite_fill_value(preset: TaskPreset) -> float:
    """The intensity that stands in for NaN/Inf voxels at inference: one the preprocessing maps to background.

    NaN voxels mostly mark "no data" (outside the scanned field of view, masked out). For CT that is air: the
    window's floor, which the window scaling maps to 0 and ``CropForegroundd`` counts as outside the body. For
    MRI it is 0: the non-zero z-score normalisation leaves zeros out of the mean and standard deviation and
    keeps them at 0, as the background outside the body. Replacing NaN by 0 for CT instead would paint water
    (0 HU) into the image. The value must be set before ``Spacingd``, whose interpolation would spread a NaN
    to its neighbours.

    Args:
        preset: the task preset.
    """
    return float(preset.ct_window[0]) if preset.is_ct else 0.0


def preprocess_transforms(
    preset: TaskPreset, keys: Sequence[str], *, replace_non_finite: bool = False
) -> list[MapTransform]:
    """The deterministic, invertible prefix shared by all chains. ``keys[0]`` is the image, ``keys[1:]`` labels.

    Args:
        preset: the task preset (spacing, intensity, CT window).
        keys: data keys, the image first (e.g. ``("image", "label")`` or ``("image",)``).
        replace_non_finite: replace NaN/Inf image voxels with a warning (``ReplaceNonFinited``), right after
            loading; the inference chain does, training and validation do not (bad data must stop them).
    """
    keys = list(keys)
    image_key = keys[0]
    modes = ["bilinear"] + ["nearest"] * (len(keys) - 1)  # labels are resampled without mixing classes
    chain: list[MapTransform] = [load_image_transform(keys, image_only=True)]
    if replace_non_finite:
        chain.append(ReplaceNonFinited(image_key, fill_value=non_finite_fill_value(preset)))
    chain += [
        EnsureChannelFirstd(keys),
        Orientationd(keys, axcodes="RAS", labels=None),  # labels=None: follow the meta "space" (RAS)
    ]
    if preset.target_spacing is not None:
        chain.append(Spacingd(keys, pixdim=preset.target_spacing, mode=modes))
    if preset.is_ct:
        low, high = preset.ct_window
        chain += [
            ScaleIntensityRanged(image_key, a_min=low, a_max=high, b_min=0.0, b_max=1.0, clip=True),
            # Air is at the window's floor (0 after scaling): crop to the body to skip empty patches.
            CropForegroundd(keys, source_key=image_key, allow_smaller=True),
        ]
    else:
        chain.append(NormalizeIntensityd(image_key, nonzero=True, channel_wise=True))
    return chain


def train_transforms(
    preset: TaskPreset, keys: Sequence[str] = ("image", "label"), num_samples: int = 2
) -> Compose:
    """Training chain: preprocessing, pad to the patch, ``num_samples`` random patches (half on foreground),
    random flips and intensity scale/shift.

    Args:
        preset: the task preset.
        keys: ``(image_key, label_key)``.
        num_samples: patches drawn per image per epoch; the dataset then yields a list of that many dicts.
    """
    image_key, label_key = keys[0], keys[1]
    keys = [image_key, label_key]
    return Compose(
        preprocess_transforms(preset, keys)
        + [
            SpatialPadd(keys, spatial_size=preset.patch_size),
            RandCropByPosNegLabeld(
                keys,
                label_key=label_key,
                spatial_size=preset.patch_size,
                pos=1,
                neg=1,
                num_samples=num_samples,
                image_key=image_key,
                image_threshold=0,
                allow_smaller=True,
            ),
            RandFlipd(keys, prob=0.5, spatial_axis=0),
            RandFlipd(keys, prob=0.5, spatial_axis=1),
            RandFlipd(keys, prob=0.5, spatial_axis=2),
            RandScaleIntensityd(image_key, factors=0.1, prob=0.5),
            RandShiftIntensityd(image_key, offsets=0.1, prob=0.5),
            EnsureTyped(keys, track_meta=True),
        ]
    )


def val_transforms(preset: TaskPreset, keys: Sequence[str] = ("image", "label")) -> Compose:
    """Validation chain: the preprocessing only, whole images (for sliding-window inference), invertible.

    Args:
        preset: the task preset.
        keys: ``(image_key, label_key)``, or ``(image_key,)`` for unlabelled images.
    """
    return Compose(preprocess_transforms(preset, keys) + [EnsureTyped(list(keys), track_meta=True)])


def infer_transforms(preset: TaskPreset, keys: Sequence[str] = ("image",)) -> Compose:
    """Inference chain for unlabelled images: the preprocessing, keeping the metadata ``Invertd`` needs.

    Unlike validation, NaN/Inf voxels are replaced (with a warning naming the case and the count) by the value
    ``non_finite_fill_value`` gives: background for the preset's normalisation (0 for MRI, the CT window's
    floor, i.e. air, for CT). A user's image at inference cannot be sent back to be fixed the way training data
    can, and a few NaN voxels (1.6% in issue 9) must not turn the whole prediction into background.

    Args:
        preset: the task preset.
        keys: ``(image_key,)``.
    """
    return Compose(preprocess_transforms(preset, keys, replace_non_finite=True)
                   + [EnsureTyped(list(keys), track_meta=True)])
