"""MONAI transform chains built from a ``TaskPreset``: training, validation and inference.

All three share one preprocessing prefix (``preprocess_transforms``):
load (nibabel for NIfTI, SimpleITK for DICOM/MHA/NRRD) -> channel first -> RAS -> target spacing ->
intensity (CT window to [0, 1], or MRI non-zero z-score per channel) -> crop to the body (CT).
Every step is an invertible MONAI transform, so predictions made on the validation/inference chain can be
mapped back to the original image grid with ``monai.transforms.Invertd(transform=<the chain>)``.
"""

from __future__ import annotations

from collections.abc import Sequence

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


def preprocess_transforms(preset: TaskPreset, keys: Sequence[str]) -> list[MapTransform]:
    """The deterministic, invertible prefix shared by all chains. ``keys[0]`` is the image, ``keys[1:]`` labels.

    Args:
        preset: the task preset (spacing, intensity, CT window).
        keys: data keys, the image first (e.g. ``("image", "label")`` or ``("image",)``).
    """
    keys = list(keys)
    image_key = keys[0]
    modes = ["bilinear"] + ["nearest"] * (len(keys) - 1)  # labels are resampled without mixing classes
    chain: list[MapTransform] = [
        load_image_transform(keys, image_only=True),
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
    """Inference chain for unlabelled images: the preprocessing only, keeping the metadata ``Invertd`` needs.

    Args:
        preset: the task preset.
        keys: ``(image_key,)``.
    """
    return val_transforms(preset, keys)
