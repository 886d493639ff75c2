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

import math
import warnings
from collections.abc import Hashable, Mapping, Sequence
from typing import Any

import torch
from monai.config import KeysCollection
from monai.transforms import (
    BorderPadd,
    Compose,
    CropForegroundd,
    EnsureChannelFirstd,
    EnsureTyped,
    MapLabelValued,
    MapTransform,
    NormalizeIntensityd,
    Orientationd,
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
    ScaleIntensityRanged,
    Spacingd,
    SpatialPadd,
)

from medunet.data.presets import TaskPreset
from medunet.data.readers import load_image_transform
from medunet.errors import MedunetError


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
    if keys[1:] and not preset.labels_contiguous:  # e.g. 0, 1, 2, 4 -> classes 0..3; predictions map back
        chain.append(MapLabelValued(keys[1:], orig_labels=preset.label_values,
                                    target_labels=list(range(len(preset.labels)))))
    return chain


def class_to_label_transform(preset: TaskPreset, key: str = "pred") -> MapTransform | None:
    """Map predicted classes back to the task's label values (None when they coincide)."""
    if preset.labels_contiguous:
        return None
    return MapLabelValued(key, orig_labels=list(range(len(preset.labels))), target_labels=preset.label_values)


#: ``augment`` modes of :func:`train_transforms` (the workflow key ``augment``).
AUGMENTATIONS = ("none", "light", "nnunet")


def rotated_patch_size(
    patch_size: Sequence[int], max_angle: float = math.pi / 6, min_scale: float = 0.85
) -> tuple[int, ...]:
    """The crop that still fills ``patch_size`` after a rotation by up to ``max_angle`` (radians) about any axis
    and a zoom out to ``min_scale``, as nnU-Net enlarges its crops before the spatial transform.

    A ``p_i x p_j`` rectangle rotated by ``a`` spans ``p_i cos a + p_j sin a`` along axis ``i``: each axis takes
    the largest such span over the other axes (``a`` at most 45 degrees), then is divided by ``min_scale``.

    Args:
        patch_size: the training patch.
        max_angle: the largest rotation, radians.
        min_scale: the smallest scale the crop must cover (nnU-Net v2 sizes its crop for 0.85).

    Example::

        rotated_patch_size((48, 64, 48))  # (87, 94, 87)
    """
    angle = min(abs(max_angle), math.pi / 4)
    sizes = [int(s) for s in patch_size]
    spans = []
    for i, size in enumerate(sizes):
        span = max([size] + [size * math.cos(angle) + other * math.sin(angle)
                             for j, other in enumerate(sizes) if j != i])
        spans.append(math.ceil(span / min_scale))
    return tuple(spans)


def spatial_augmentation(
    keys: Sequence[str], patch_size: Sequence[int], max_angle: float = math.pi / 6,
    scale: tuple[float, float] = (0.7, 1.4), rotate_prob: float = 0.2, scale_prob: float = 0.2,
) -> list[MapTransform]:
    """nnU-Net's spatial augmentation with MONAI transforms, on a crop of :func:`rotated_patch_size`:
    an isotropic zoom (``RandZoomd``, ``scale``, p ``scale_prob``), then a rotation about every axis
    (``RandAffined``, up to ``max_angle``, p ``rotate_prob``) that also takes the central ``patch_size``, so every
    patch leaves it at the patch size whether or not it was rotated. Voxels from outside the image are 0: the
    background of both normalisations (MRI z-score keeps 0 at 0, the CT window maps air to 0).

    Args:
        keys: ``(image_key, label_key)``; the label is resampled with nearest neighbours.
        patch_size: the patch the chain must yield.
        max_angle: the largest rotation about each axis, radians (nnU-Net: 30 degrees).
        scale: zoom range (nnU-Net: 0.7-1.4), the same factor on every axis.
        rotate_prob, scale_prob: how often each is applied (nnU-Net: 0.2 each).
    """
    dims = len(patch_size)
    return [
        RandZoomd(keys, prob=scale_prob, min_zoom=scale[0], max_zoom=scale[1], mode=("trilinear" if dims == 3
                  else "bilinear", "nearest"), padding_mode="constant", keep_size=True),
        RandAffined(keys, spatial_size=tuple(patch_size), prob=rotate_prob, rotate_range=(max_angle,) * (3 if dims == 3 else 1),
                    mode=("bilinear", "nearest"), padding_mode="zeros"),
    ]


def intensity_augmentation(image_key: str) -> list[MapTransform]:
    """nnU-Net's intensity augmentation with MONAI transforms, in nnU-Net v2's order and probabilities:
    Gaussian noise (p 0.1), Gaussian blur (sigma 0.5-1, p 0.2), multiplicative brightness (0.75-1.25, p 0.15),
    contrast about the mean within the original range (0.75-1.25, p 0.15), simulated low resolution (zoom 0.5-1,
    p 0.25), gamma 0.7-1.5 on the inverted image (p 0.1) and on the image (p 0.3), both keeping mean and SD.

    Args:
        image_key: the image key (labels are never touched).
    """
    return [
        RandGaussianNoised(image_key, prob=0.1, mean=0.0, std=0.1),
        RandGaussianSmoothd(image_key, sigma_x=(0.5, 1.0), sigma_y=(0.5, 1.0), sigma_z=(0.5, 1.0), prob=0.2),
        RandScaleIntensityd(image_key, factors=0.25, prob=0.15),
        RandScaleIntensityFixedMeand(image_key, factors=0.25, preserve_range=True, prob=0.15),
        RandSimulateLowResolutiond(image_key, prob=0.25, zoom_range=(0.5, 1.0)),
        RandAdjustContrastd(image_key, prob=0.1, gamma=(0.7, 1.5), invert_image=True, retain_stats=True),
        RandAdjustContrastd(image_key, prob=0.3, gamma=(0.7, 1.5), invert_image=False, retain_stats=True),
    ]


def train_transforms(
    preset: TaskPreset, keys: Sequence[str] = ("image", "label"), num_samples: int = 2, augment: str = "light"
) -> Compose:
    """Training chain: preprocessing, pad to the patch, ``num_samples`` random patches, and the augmentation
    that ``augment`` names (the workflow key ``augment``):

    - ``"light"`` (the default, medunet's recipe so far): half the patches centred on foreground, random flips
      on every axis, intensity scale and shift by up to 10 %;
    - ``"nnunet"``: nnU-Net v2's recipe: a third of the patches centred on foreground (``pos=1, neg=2``), crops
      enlarged for rotation (:func:`rotated_patch_size`), zoom 0.7-1.4 and rotation up to 30 degrees about every
      axis (:func:`spatial_augmentation`), noise, blur, brightness, contrast, low resolution and gamma
      (:func:`intensity_augmentation`), mirroring on every axis;
    - ``"none"``: the patches only (half on foreground), for ablations.

    Args:
        preset: the task preset.
        keys: ``(image_key, label_key)``.
        num_samples: patches drawn per image per epoch; the dataset then yields a list of that many dicts.
        augment: ``"none"``, ``"light"`` or ``"nnunet"``.
    """
    if augment not in AUGMENTATIONS:
        raise MedunetError(f"augment is {augment!r}; it must be one of {AUGMENTATIONS}. "
                           "Fix: --set augment=nnunet (or light, none), or edit the workflow's augment key.")
    image_key, label_key = keys[0], keys[1]
    keys = [image_key, label_key]
    patch = tuple(preset.patch_size)
    nnunet = augment == "nnunet"
    crop = rotated_patch_size(patch) if nnunet else patch
    chain = preprocess_transforms(preset, keys) + [SpatialPadd(keys, spatial_size=patch)]
    if nnunet:
        # Pad so the enlarged crop around a voxel near the border keeps that voxel at its centre: the central
        # patch the rotation keeps is then the one a plain crop would take, and foreground stays foreground.
        chain.append(BorderPadd(keys, spatial_border=[(c - p + 1) // 2 for c, p in zip(crop, patch)], mode="constant"))
    chain.append(RandCropByPosNegLabeld(
        keys,
        label_key=label_key,
        spatial_size=crop,
        pos=1,
        neg=2 if nnunet else 1,  # nnU-Net forces a third of its patches onto foreground
        num_samples=num_samples,
        image_key=image_key,
        image_threshold=0,
        allow_smaller=True,
    ))
    if nnunet:
        chain += spatial_augmentation(keys, patch) + intensity_augmentation(image_key)
    if augment in ("light", "nnunet"):
        chain += [RandFlipd(keys, prob=0.5, spatial_axis=axis) for axis in range(len(patch))]
    if augment == "light":
        chain += [RandScaleIntensityd(image_key, factors=0.1, prob=0.5),
                  RandShiftIntensityd(image_key, offsets=0.1, prob=0.5)]
    chain.append(EnsureTyped(keys, track_meta=True))
    return Compose(chain)


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
