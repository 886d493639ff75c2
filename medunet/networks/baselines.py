"""The MONAI networks medunet is measured against, in the configurations people actually use.

Each factory takes the MONAI-style ``spatial_dims, in_channels, out_channels`` and returns MONAI's own
class wrapped in :class:`PadToDivisible`, so that, like medunet's networks, they take any input size
(MONAI's classes need multiples of 2**levels). The MONAI module is ``.network``; its state dict is
the wrapper's under the ``network.`` prefix.

``monai_segresnet_unshuffle`` (and ``_16f``) is MONAI's SegResNet run at half resolution (:class:`HalfResolution`):
not a configuration people use, but the measurement of what SegResNet's full-resolution first level buys (issue 10,
benchmarks/README.md).
"""

from __future__ import annotations

from typing import Any

import torch
from monai.networks.nets import BasicUNet, DynUNet, SegResNet, UNet
from monai.networks.nets.unet import CheckpointUNet
from torch import nn

from medunet.errors import MedunetError
from medunet.networks.layers import PixelShuffle, PixelUnshuffle, crop_spatial, pad_to_multiple
from medunet.networks.registry import register_preset


class PadToDivisible(nn.Module):
    """Let ``network`` take any input size: pad to a multiple of ``divisor`` (and at least ``min_size``)
    before the forward, crop the output back after (:func:`~medunet.networks.layers.pad_to_multiple`, the padding
    medunet's own networks use). The wrapped network is ``self.network``."""

    def __init__(self, network: nn.Module, divisor: int, min_size: int = 0) -> None:
        super().__init__()
        self.network = network
        self.divisor = divisor
        self.min_size = min_size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # crop_spatial cuts the trailing axes only, so DynUNet's stacked deep-supervision output crops too.
        return crop_spatial(self.network(pad_to_multiple(x, self.divisor, self.min_size)), x.shape[2:])


class HalfResolution(nn.Module):
    """Run ``network`` at half resolution: a pixel-unshuffle in (no information lost: each 2x2(x2) block of voxels
    becomes one voxel of ``2**spatial_dims`` times the channels) and a pixel-shuffle of its output back to full
    resolution, so its last layer predicts each block's voxels (a sub-pixel head). ``network`` takes
    ``in_channels * 2**spatial_dims`` channels and returns ``out_channels * 2**spatial_dims``; inputs need even sizes
    (:class:`PadToDivisible` around it gives any size). The medunet unshuffle stem (``LUNet(stem="unshuffle")``)
    applied to a network that was not built for it."""

    def __init__(self, network: nn.Module, spatial_dims: int) -> None:
        super().__init__()
        self.unshuffle = PixelUnshuffle(spatial_dims, 2)
        self.network = network
        self.shuffle = PixelShuffle(spatial_dims, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.shuffle(self.network(self.unshuffle(x)))


def _no_deep_supervision(name: str, deep_supervision: int) -> None:
    """Refuse deep-supervision heads for a MONAI network that has none (0 is accepted: workflows pass it)."""
    if deep_supervision:
        raise MedunetError(f"{name} has no deep-supervision heads (deep_supervision={deep_supervision!r}). "
                           "Fix: set deep_supervision=0 for it; medunet's U-Nets and monai_dynunet_nnunet have them.")


def monai_unet_spleen(spatial_dims: int = 3, in_channels: int = 1, out_channels: int = 2, checkpoint: bool = False,
                      deep_supervision: int = 0, **kwargs: Any) -> nn.Module:
    """MONAI UNet as in the spleen segmentation bundle: channels 16..256, 4 stride-2 levels, 2 residual units."""
    _no_deep_supervision("monai_unet_spleen", deep_supervision)
    cls = CheckpointUNet if checkpoint else UNet
    config = dict(channels=(16, 32, 64, 128, 256), strides=(2, 2, 2, 2), num_res_units=2, norm="batch")
    return PadToDivisible(cls(spatial_dims, in_channels, out_channels, **{**config, **kwargs}), 16)


def monai_basicunet(spatial_dims: int = 3, in_channels: int = 1, out_channels: int = 2, deep_supervision: int = 0,
                    **kwargs: Any) -> nn.Module:
    """MONAI BasicUNet with its default features (32, 32, 64, 128, 256, 32)."""
    _no_deep_supervision("monai_basicunet", deep_supervision)
    return PadToDivisible(BasicUNet(spatial_dims, in_channels, out_channels, **kwargs), 16)


def monai_segresnet(spatial_dims: int = 3, in_channels: int = 1, out_channels: int = 2, deep_supervision: int = 0,
                    **kwargs: Any) -> nn.Module:
    """MONAI SegResNet with its defaults (8 initial filters, blocks (1, 2, 2, 4))."""
    _no_deep_supervision("monai_segresnet", deep_supervision)
    return PadToDivisible(
        SegResNet(spatial_dims=spatial_dims, in_channels=in_channels, out_channels=out_channels, **kwargs), 8
    )


def monai_segresnet_unshuffle(spatial_dims: int = 3, in_channels: int = 1, out_channels: int = 2,
                              deep_supervision: int = 0, head_kernel: int = 3, **kwargs: Any) -> nn.Module:
    """MONAI SegResNet with its defaults run at half resolution (:class:`HalfResolution`): the same layers, widths
    and parameters less the first and last convolutions' extra channels, every level at half the size. Its last
    convolution has kernel ``head_kernel`` (3: a 3x3x3 sub-pixel head, as the medunet unshuffle presets)."""
    _no_deep_supervision("monai_segresnet_unshuffle", deep_supervision)
    scale = 2**spatial_dims
    net = SegResNet(spatial_dims=spatial_dims, in_channels=in_channels * scale, out_channels=out_channels * scale,
                    **kwargs)
    if head_kernel != 1:  # SegResNet's last layer: norm, activation, then this 1x1 convolution (MONAI Convolution)
        last = net.conv_final[-1].conv
        conv = nn.Conv3d if spatial_dims == 3 else nn.Conv2d
        net.conv_final[-1].conv = conv(last.in_channels, last.out_channels, head_kernel, padding=head_kernel // 2)
    return PadToDivisible(HalfResolution(net, spatial_dims), 16)


def monai_dynunet_nnunet(spatial_dims: int = 3, in_channels: int = 1, out_channels: int = 2, deep_supervision: int = 0,
                         **kwargs: Any) -> nn.Module:
    """MONAI DynUNet shaped like a 3D full-resolution nnU-Net: 6 levels, 32..320 filters, instance norm.
    ``deep_supervision=K`` (0..4) switches on DynUNet's own heads (``deep_supr_num=K``)."""
    kernels = [[3] * spatial_dims] * 6
    strides = [[1] * spatial_dims] + [[2] * spatial_dims] * 5
    config = dict(filters=[32, 64, 128, 256, 320, 320], norm_name="instance", res_block=False,
                  deep_supervision=deep_supervision > 0, deep_supr_num=max(1, deep_supervision))
    net = DynUNet(spatial_dims, in_channels, out_channels, kernels, strides, strides[1:], **{**config, **kwargs})
    # Instance norm needs more than one voxel at the bottleneck: at least 2 after 5 halvings.
    return PadToDivisible(net, 32, min_size=64)


# Test sizes: the MONAI defaults with every channel count shrunk; SegResNet's 8 initial filters are small already.
register_preset(
    "monai_unet_spleen", monai_unet_spleen, "baseline", monai_unet_spleen.__doc__,
    baseline=True, test_overrides={"channels": (2, 4, 4, 8, 8)},
)
register_preset(
    "monai_checkpoint_unet_spleen", monai_unet_spleen, "baseline",
    "MONAI CheckpointUNet (activation checkpointing) in the spleen-bundle configuration: the memory baseline. "
    "Not scriptable: it uses torch.utils.checkpoint.",
    baseline=True, scriptable=False, test_overrides={"channels": (2, 4, 4, 8, 8)}, checkpoint=True,
)
register_preset(
    "monai_basicunet", monai_basicunet, "baseline", monai_basicunet.__doc__,
    baseline=True, test_overrides={"features": (2, 2, 4, 4, 8, 2)},
)
register_preset("monai_segresnet", monai_segresnet, "baseline", monai_segresnet.__doc__, baseline=True)
register_preset(
    "monai_segresnet_unshuffle", monai_segresnet_unshuffle, "baseline",
    "monai_segresnet at half resolution: a pixel-unshuffle in, a 3x3x3 sub-pixel head out (what SegResNet's "
    "full-resolution first level buys)",
    baseline=True,
)
register_preset(
    "monai_segresnet_unshuffle_16f", monai_segresnet_unshuffle, "baseline",
    "monai_segresnet_unshuffle with 16 initial filters: 16 channels at half resolution, as many features per voxel "
    "as the medunet unshuffle presets' first level (widths 16, 32, 64, 128)",
    baseline=True, init_filters=16, test_overrides={"init_filters": 8},
)
register_preset(
    "monai_dynunet_nnunet", monai_dynunet_nnunet, "baseline", monai_dynunet_nnunet.__doc__,
    baseline=True, test_overrides={"filters": [2, 4, 4, 8, 8, 8]},
)
