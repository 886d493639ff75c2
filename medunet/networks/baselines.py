"""The MONAI networks medunet is measured against, in the configurations people actually use.

Each factory takes the MONAI-style ``spatial_dims, in_channels, out_channels`` and returns MONAI's own
class (state dicts stay compatible with MONAI bundles). Like medunet's networks, they pad inputs to a
size they accept and crop the output back, through forward hooks.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from monai.networks.nets import BasicUNet, DynUNet, SegResNet, UNet
from monai.networks.nets.unet import CheckpointUNet
from torch import nn

from medunet.networks.registry import register_preset


def _pad_input(module: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...]:
    x = args[0]
    divisor = module._medunet_size_divisor
    spatial = list(x.shape[2:])
    module._medunet_input_size = spatial
    pad: list[int] = []
    for size in spatial[::-1]:
        pad += [0, (divisor - size % divisor) % divisor]
    return (F.pad(x, pad), *args[1:]) if any(pad) else args


def _crop_output(module: nn.Module, args: tuple[Any, ...], output: torch.Tensor) -> torch.Tensor:
    spatial = module._medunet_input_size
    return output[(slice(None), slice(None), *(slice(0, s) for s in spatial))]


def pad_to_divisible(net: nn.Module, divisor: int) -> nn.Module:
    """Let ``net`` take any input size: pad to a multiple of ``divisor`` before, crop after."""
    net._medunet_size_divisor = divisor
    net.register_forward_pre_hook(_pad_input)
    net.register_forward_hook(_crop_output)
    return net


def monai_unet_spleen(spatial_dims: int = 3, in_channels: int = 1, out_channels: int = 2, checkpoint: bool = False,
                      **kwargs: Any) -> nn.Module:
    """MONAI UNet as in the spleen segmentation bundle: channels 16..256, 4 stride-2 levels, 2 residual units."""
    cls = CheckpointUNet if checkpoint else UNet
    config = dict(channels=(16, 32, 64, 128, 256), strides=(2, 2, 2, 2), num_res_units=2, norm="batch")
    return pad_to_divisible(cls(spatial_dims, in_channels, out_channels, **{**config, **kwargs}), 16)


def monai_basicunet(spatial_dims: int = 3, in_channels: int = 1, out_channels: int = 2, **kwargs: Any) -> nn.Module:
    """MONAI BasicUNet with its default features (32, 32, 64, 128, 256, 32)."""
    return pad_to_divisible(BasicUNet(spatial_dims, in_channels, out_channels, **kwargs), 16)


def monai_segresnet(spatial_dims: int = 3, in_channels: int = 1, out_channels: int = 2, **kwargs: Any) -> nn.Module:
    """MONAI SegResNet with its defaults (8 initial filters, blocks (1, 2, 2, 4))."""
    return pad_to_divisible(
        SegResNet(spatial_dims=spatial_dims, in_channels=in_channels, out_channels=out_channels, **kwargs), 8
    )


def monai_dynunet_nnunet(spatial_dims: int = 3, in_channels: int = 1, out_channels: int = 2, **kwargs: Any) -> nn.Module:
    """MONAI DynUNet shaped like a 3D full-resolution nnU-Net: 6 levels, 32..320 filters, instance norm."""
    kernels = [[3] * spatial_dims] * 6
    strides = [[1] * spatial_dims] + [[2] * spatial_dims] * 5
    config = dict(filters=[32, 64, 128, 256, 320, 320], norm_name="instance", res_block=False)
    net = DynUNet(spatial_dims, in_channels, out_channels, kernels, strides, strides[1:], **{**config, **kwargs})
    return pad_to_divisible(net, 32)


register_preset("monai_unet_spleen", monai_unet_spleen, "baseline", monai_unet_spleen.__doc__, baseline=True)
register_preset(
    "monai_checkpoint_unet_spleen", monai_unet_spleen, "baseline",
    "MONAI CheckpointUNet (activation checkpointing) in the spleen-bundle configuration: the memory baseline.",
    baseline=True, checkpoint=True,
)
register_preset("monai_basicunet", monai_basicunet, "baseline", monai_basicunet.__doc__, baseline=True)
register_preset("monai_segresnet", monai_segresnet, "baseline", monai_segresnet.__doc__, baseline=True)
register_preset("monai_dynunet_nnunet", monai_dynunet_nnunet, "baseline", monai_dynunet_nnunet.__doc__, baseline=True)
