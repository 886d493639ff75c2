"""Lean UNet and its doubling twin: plain convolutional U-Nets of the STAMP family.

Based on Hassler et al., "Lean Unet: A Compact Model for Image Segmentation", arXiv 2512.03834:
keep the channel count constant at every level instead of doubling it as resolution halves.
"""

from __future__ import annotations

from collections.abc import Sequence

from monai.networks.blocks import ResidualUnit
from monai.networks.layers.factories import Conv
from torch import nn

from medunet.errors import MedunetError
from medunet.networks.layers import (
    ActType,
    DropoutType,
    ImageGuidedHead,
    MaxPoolHalving,
    NormType,
    PixelShuffle,
    PixelUnshuffle,
    RefinedHead,
    SubPixelHead,
    adn_order,
    conv_norm_act,
)
from medunet.networks.registry import register_class, register_preset
from medunet.networks.skeleton import UNetBlocks, UNetParts, UNetSkeleton, compose_unet, level_widths
from medunet.networks.skips import OrdinarySkips

STEMS = ("full", "unshuffle")


def conv_block(
    spatial_dims: int,
    in_channels: int,
    out_channels: int,
    *,
    convs: int,
    act: ActType,
    norm: NormType,
    dropout: DropoutType,
    bias: bool,
    order: str,
    residual: bool = False,
) -> nn.Module:
    """``convs`` x [3x3(x3) conv -> activation/norm/dropout in ``order``] (STAMP uses conv-ReLU-BN-dropout).

    ``residual=True`` adds the block's input to its output (through a 1x1 conv where the widths differ): MONAI's
    ``ResidualUnit`` with the same convolutions, as in the MONAI UNet (``num_res_units``) and SegResNet. More than two
    convolutions make a stack of units of two (the last of one where ``convs`` is odd), as SegResNet stacks its
    residual blocks.
    """
    if residual:
        units = [
            ResidualUnit(spatial_dims, in_channels if first == 0 else out_channels, out_channels, kernel_size=3,
                         subunits=min(2, convs - first) if convs > 2 else convs,
                         adn_ordering=adn_order(order, act=act, norm=norm, dropout=dropout), act=act, norm=norm,
                         dropout=dropout, bias=bias)
            for first in range(0, convs, 2 if convs > 2 else convs)
        ]
        return units[0] if len(units) == 1 else nn.Sequential(*units)
    layers = [
        conv_norm_act(spatial_dims, in_channels if i == 0 else out_channels, out_channels, kernel_size=3, act=act,
                      norm=norm, dropout=dropout, bias=bias, order=order)
        for i in range(convs)
    ]
    return nn.Sequential(*layers)


class ConvBlocks(UNetBlocks):
    """The conv family's stages: conv blocks, max-pool down, transposed conv (kernel 2, stride 2) up, 1x1 head (``head_kernel``).

    ``stem="unshuffle"`` starts with a pixel-unshuffle (space-to-depth, no information lost) so level 0
    runs at half resolution, and ends with a 1x1 conv + pixel-shuffle back to full resolution, the way
    MONAI's UNet starts with a strided conv: no kxk convolution touches the full-resolution volume,
    which is where a 3D network's activations and (on the CPU) its convolution workspace peak.

    ``head_kernel=3`` makes the head conv a kxk one: with the unshuffle stem it is a sub-pixel convolution (Shi et
    al., ESPCN, CVPR 2016), so the logits of the 2x2x2 full-resolution voxels that one half-resolution voxel becomes
    see its whole neighbourhood instead of that voxel's features alone.

    ``head_image=True`` (unshuffle stem only) adds the image itself to those logits: each 2x2x2 block's voxel
    intensities through a 1x1 map (:class:`~medunet.networks.layers.ImageGuidedHead`, ``image_channels`` inputs).

    ``head_refine=N`` (unshuffle stem only) adds a thin full-resolution stage after the sub-pixel head: a 3x3x3
    convolution of the logits and the image to ``N`` channels, leaky ReLU, a 1x1 convolution added to the logits
    (:class:`~medunet.networks.layers.RefinedHead`; by slabs at inference).
    """

    def __init__(self, *, spatial_dims: int, convs_per_block: int, act: ActType, norm: NormType,
                 dropout: DropoutType, bias: bool, order: str, stem: str, head_kernel: int = 1,
                 residual: bool = False, encoder_convs: Sequence[int] | None = None, head_image: bool = False,
                 image_channels: int = 1, head_refine: int = 0) -> None:
        if stem not in STEMS:
            raise MedunetError(f"stem must be one of {STEMS}, got {stem!r}")
        if head_kernel < 1 or head_kernel % 2 == 0:
            raise MedunetError(f"head_kernel must be an odd kernel size (1, 3, ...), got {head_kernel!r}")
        if encoder_convs is not None and (not encoder_convs or min(encoder_convs) < 1):
            raise MedunetError(f"encoder_convs must give at least one convolution per level, got {encoder_convs!r}")
        if head_image and stem != "unshuffle":
            raise MedunetError("head_image=True reads the image block by block into the sub-pixel head, which only the "
                               "unshuffle stem has. Fix: stem=\"unshuffle\", or head_image=False.")
        if isinstance(head_refine, bool) or not isinstance(head_refine, int) or head_refine < 0:
            raise MedunetError(f"head_refine is the width of the full-resolution refinement (0: none), got {head_refine!r}")
        if head_refine and (stem != "unshuffle" or head_image):
            raise MedunetError("head_refine refines the sub-pixel head of the unshuffle stem, without head_image (the "
                               "refinement reads the image itself). Fix: stem=\"unshuffle\" and head_image=False, or "
                               "head_refine=0.")
        self.head_refine = head_refine
        self.head_kernel = head_kernel
        self.head_reads_input = head_image or head_refine > 0
        self.image_channels = image_channels
        self.spatial_dims = spatial_dims
        self.convs_per_block = convs_per_block
        self.encoder_convs = None if encoder_convs is None else [int(c) for c in encoder_convs]
        self.block_options = dict(act=act, norm=norm, dropout=dropout, bias=bias, order=order, residual=residual)
        self.scale = 2**spatial_dims if stem == "unshuffle" else 1  # channels gained by the unshuffle stem
        self.input_stride = 2 if stem == "unshuffle" else 1

    def block(self, in_channels: int, out_channels: int, convs: int | None = None) -> nn.Module:
        return conv_block(self.spatial_dims, in_channels, out_channels, convs=convs or self.convs_per_block,
                          **self.block_options)

    def encoder_stage(self, level: int, widths: list[int], in_channels: int) -> nn.Module:
        d = self.spatial_dims
        if self.encoder_convs is not None and len(self.encoder_convs) != len(widths):
            raise MedunetError(f"encoder_convs lists {len(self.encoder_convs)} levels and widths {len(widths)}. "
                               f"Fix: one convolution count per level, e.g. {[self.convs_per_block] * len(widths)}.")
        convs = None if self.encoder_convs is None else self.encoder_convs[level]
        if level > 0:
            return nn.Sequential(MaxPoolHalving(d), self.block(widths[level - 1], widths[level], convs))
        first = self.block(in_channels * self.scale, widths[0], convs)
        return nn.Sequential(PixelUnshuffle(d, 2), first) if self.scale > 1 else first

    def decoder_stage(self, level: int, widths: list[int], merge: str) -> tuple[nn.Module, nn.Module, int]:
        width = widths[level]
        up = Conv[Conv.CONVTRANS, self.spatial_dims](widths[level + 1], width, 2, stride=2)
        return up, self.block(2 * width if merge == "concat" else width, width), width

    def head(self, in_channels: int, out_channels: int) -> nn.Module:
        d = self.spatial_dims
        head: nn.Module = Conv[Conv.CONV, d](in_channels, out_channels * self.scale, kernel_size=self.head_kernel,
                                             padding=self.head_kernel // 2)
        if self.scale == 1:
            return head
        sub_pixel = SubPixelHead(head, PixelShuffle(d, 2))
        if self.head_refine:
            slope = 0.01
            act = self.block_options["act"]
            if isinstance(act, tuple) and str(act[0]).lower() == "leakyrelu":
                slope = float(act[1].get("negative_slope", slope))
            return RefinedHead(sub_pixel, self.image_channels, self.head_refine, negative_slope=slope)
        return ImageGuidedHead(sub_pixel, self.image_channels) if self.head_reads_input else sub_pixel


def conv_unet_parts(
    *,
    spatial_dims: int,
    in_channels: int,
    out_channels: int,
    features: int = 8,
    levels: int = 5,
    flat: bool = True,
    widths: Sequence[int] | None = None,
    convs_per_block: int = 2,
    act: ActType = ("relu", {"inplace": True}),
    norm: NormType = "batch",
    dropout: DropoutType = None,
    bias: bool = True,
    order: str = "AND",
    merge: str = "concat",
    stem: str = "full",
    head_kernel: int = 1,
    residual: bool = False,
    encoder_convs: Sequence[int] | None = None,
    head_image: bool = False,
    head_refine: int = 0,
) -> UNetParts:
    """Stages of a convolutional U-Net with ``levels`` resolution levels (the arguments are :class:`LUNet`'s).

    Encoder: a conv block at full resolution, then max-pool + conv block per level. Decoder:
    transposed conv (kernel 2, stride 2) to the finer width, merge the skip, conv block. Head: a conv of kernel
    ``head_kernel`` (1 by default).
    Widths: :func:`~medunet.networks.skeleton.level_widths` (``features``, ``flat`` or an explicit ``widths``).
    """
    blocks = ConvBlocks(spatial_dims=spatial_dims, convs_per_block=convs_per_block, act=act, norm=norm,
                        dropout=dropout, bias=bias, order=order, stem=stem, head_kernel=head_kernel,
                        residual=residual, encoder_convs=encoder_convs, head_image=head_image,
                        image_channels=in_channels, head_refine=head_refine)
    widths = level_widths(features=features, levels=None if widths is not None else levels, flat=flat, widths=widths)
    return compose_unet(blocks, in_channels=in_channels, out_channels=out_channels, widths=widths, merge=merge)


class LUNet(UNetSkeleton):
    """Lean U-Net: a STAMP-style U-Net whose channel count stays constant at every level.

    Hassler et al., arXiv 2512.03834. With ``flat=False`` the same network doubles its width at each
    level: the conventional U-Net of the same family, for like-for-like comparisons. The authors'
    presets are ``small`` (5 levels x 2 convs) and ``large`` (4 levels x 3 convs).

    Args:
        spatial_dims: 2 or 3.
        in_channels: input channels.
        out_channels: output channels (classes, background included); forward returns logits.
        features: width of the first level (of every level when ``flat``). Default 8.
        levels: resolution levels (``levels - 1`` downsamplings). Default 5.
        convs_per_block: 3x3(x3) convolutions per block. Default 2.
        flat: constant width (Lean UNet, default) or doubling width (conventional twin).
        act, norm, dropout: MONAI factory names or ``(name, kwargs)``; defaults ReLU, batch norm, none.
        bias: convolution bias.
        order: activation/norm/dropout order after each conv (MONAI letters); STAMP's is ``"AND"``.
        stem: ``"full"`` (level 0 at full resolution, as in the paper) or ``"unshuffle"`` (pixel-unshuffle
            in, pixel-shuffle out: level 0 at half resolution, far less activation memory in 3D).
        pad_input: pad inputs to a multiple of ``2**(levels-1)`` (``2**levels`` with the unshuffle stem)
            and crop the output back.
        deep_supervision: auxiliary heads on the decoder levels above the finest (0..levels-2), used in
            training mode only (:class:`~medunet.networks.skeleton.UNetSkeleton`).
        widths: an explicit width per level (e.g. ``(16, 24, 32, 32, 32)``) instead of ``features``, ``levels``
            and ``flat``.
        head_kernel: kernel of the head conv (default 1); 3 with the unshuffle stem is a sub-pixel convolution
            (:class:`ConvBlocks`).
        residual: residual conv blocks (MONAI's ``ResidualUnit``: the block's input added to its output).
        encoder_convs: convolutions of each encoder level's block, finest first (e.g. ``(2, 2, 3, 4)``: deeper
            where the volume is small, as SegResNet's ``blocks_down``); the decoder keeps ``convs_per_block``.
        head_image: with the unshuffle stem, the head also reads each 2x2x2 block's voxel intensities (a 1x1 map
            added to its logits, :class:`~medunet.networks.layers.ImageGuidedHead`).
        head_refine: with the unshuffle stem, a full-resolution refinement of that many channels after the sub-pixel
            head (3x3x3 conv of logits and image, leaky ReLU, 1x1 conv added to the logits,
            :class:`~medunet.networks.layers.RefinedHead`). Default 0 (none).

    Example::

        net = LUNet(spatial_dims=3, in_channels=1, out_channels=3, features=8)
        logits = net(torch.zeros(1, 1, 64, 64, 64))  # (1, 3, 64, 64, 64)
    """

    def __init__(
        self,
        spatial_dims: int = 3,
        in_channels: int = 1,
        out_channels: int = 2,
        features: int = 8,
        levels: int = 5,
        convs_per_block: int = 2,
        flat: bool = True,
        act: ActType = ("relu", {"inplace": True}),
        norm: NormType = "batch",
        dropout: DropoutType = None,
        bias: bool = True,
        order: str = "AND",
        stem: str = "full",
        pad_input: bool = True,
        deep_supervision: int = 0,
        widths: Sequence[int] | None = None,
        head_kernel: int = 1,
        residual: bool = False,
        encoder_convs: Sequence[int] | None = None,
        head_image: bool = False,
        head_refine: int = 0,
    ) -> None:
        parts = conv_unet_parts(
            spatial_dims=spatial_dims, in_channels=in_channels, out_channels=out_channels, features=features,
            levels=levels, flat=flat, widths=widths, convs_per_block=convs_per_block, act=act, norm=norm,
            dropout=dropout, bias=bias, order=order, stem=stem, head_kernel=head_kernel, residual=residual,
            encoder_convs=encoder_convs, head_image=head_image, head_refine=head_refine,
        )
        super().__init__(spatial_dims, parts, OrdinarySkips(parts.skip_levels), pad_input, deep_supervision)


register_class(LUNet)
#: Test size: every width 2; levels and convs per block stay the preset's own.
_TEST_SIZE = {"features": 2}
# The authors' presets, each Lean UNet (constant width) next to its doubling twin; Nf = first-level
# width. Small: 5 levels x 2 convs.
register_preset(
    "lunet_small_1f", LUNet, "lunet", "Lean UNet, 5 levels x 2 convs, constant width 1",
    features=1, levels=5, convs_per_block=2, flat=True, test_overrides=_TEST_SIZE,
)
register_preset(
    "unet_small_1f", LUNet, "lunet", "Doubling twin of lunet_small_1f: widths 1..16",
    features=1, levels=5, convs_per_block=2, flat=False, test_overrides=_TEST_SIZE,
)
register_preset(
    "lunet_small_2f", LUNet, "lunet", "Lean UNet, 5 levels x 2 convs, constant width 2",
    features=2, levels=5, convs_per_block=2, flat=True, test_overrides=_TEST_SIZE,
)
register_preset(
    "unet_small_2f", LUNet, "lunet", "Doubling twin of lunet_small_2f: widths 2..32",
    features=2, levels=5, convs_per_block=2, flat=False, test_overrides=_TEST_SIZE,
)
register_preset(
    "lunet_small_3f", LUNet, "lunet", "Lean UNet, 5 levels x 2 convs, constant width 3",
    features=3, levels=5, convs_per_block=2, flat=True, test_overrides=_TEST_SIZE,
)
register_preset(
    "unet_small_3f", LUNet, "lunet", "Doubling twin of lunet_small_3f: widths 3..48",
    features=3, levels=5, convs_per_block=2, flat=False, test_overrides=_TEST_SIZE,
)
register_preset(
    "lunet_small_4f", LUNet, "lunet", "Lean UNet, 5 levels x 2 convs, constant width 4",
    features=4, levels=5, convs_per_block=2, flat=True, test_overrides=_TEST_SIZE,
)
register_preset(
    "unet_small_4f", LUNet, "lunet", "Doubling twin of lunet_small_4f: widths 4..64",
    features=4, levels=5, convs_per_block=2, flat=False, test_overrides=_TEST_SIZE,
)
register_preset(
    "lunet_small_8f", LUNet, "lunet", "Lean UNet, 5 levels x 2 convs, constant width 8",
    features=8, levels=5, convs_per_block=2, flat=True, test_overrides=_TEST_SIZE,
)
register_preset(
    "unet_small_8f", LUNet, "lunet", "Doubling twin of lunet_small_8f: widths 8..128",
    features=8, levels=5, convs_per_block=2, flat=False, test_overrides=_TEST_SIZE,
)
register_preset(
    "lunet_small_16f", LUNet, "lunet", "Lean UNet, 5 levels x 2 convs, constant width 16",
    features=16, levels=5, convs_per_block=2, flat=True, test_overrides=_TEST_SIZE,
)
register_preset(
    "unet_small_16f", LUNet, "lunet", "Doubling twin of lunet_small_16f: widths 16..256",
    features=16, levels=5, convs_per_block=2, flat=False, test_overrides=_TEST_SIZE,
)
# Large: 4 levels x 3 convs.
register_preset(
    "lunet_large_6f", LUNet, "lunet", "Lean UNet, 4 levels x 3 convs, constant width 6",
    features=6, levels=4, convs_per_block=3, flat=True, test_overrides=_TEST_SIZE,
)
register_preset(
    "unet_large_6f", LUNet, "lunet", "Doubling twin of lunet_large_6f: widths 6..48",
    features=6, levels=4, convs_per_block=3, flat=False, test_overrides=_TEST_SIZE,
)
register_preset(
    "lunet_large_12f", LUNet, "lunet", "Lean UNet, 4 levels x 3 convs, constant width 12",
    features=12, levels=4, convs_per_block=3, flat=True, test_overrides=_TEST_SIZE,
)
register_preset(
    "unet_large_12f", LUNet, "lunet", "Doubling twin of lunet_large_12f: widths 12..96",
    features=12, levels=4, convs_per_block=3, flat=False, test_overrides=_TEST_SIZE,
)
register_preset(
    "lunet_large_24f", LUNet, "lunet", "Lean UNet, 4 levels x 3 convs, constant width 24",
    features=24, levels=4, convs_per_block=3, flat=True, test_overrides=_TEST_SIZE,
)
register_preset(
    "unet_large_24f", LUNet, "lunet", "Doubling twin of lunet_large_24f: widths 24..192",
    features=24, levels=4, convs_per_block=3, flat=False, test_overrides=_TEST_SIZE,
)
# Pixel-unshuffle stem: level 0 at half resolution, no kxk conv on the full-resolution volume (3D memory).
register_preset(
    "lunet_small_8f_unshuffle", LUNet, "lunet",
    "lunet_small_8f with a pixel-unshuffle stem and pixel-shuffle head (level 0 at half resolution)",
    features=8, levels=5, convs_per_block=2, flat=True, stem="unshuffle", test_overrides=_TEST_SIZE,
)
register_preset(
    "unet_small_8f_unshuffle", LUNet, "lunet",
    "unet_small_8f with a pixel-unshuffle stem and pixel-shuffle head (level 0 at half resolution)",
    features=8, levels=5, convs_per_block=2, flat=False, stem="unshuffle", test_overrides=_TEST_SIZE,
)
register_preset(
    "lunet_small_16f_unshuffle", LUNet, "lunet",
    "lunet_small_16f with a pixel-unshuffle stem and pixel-shuffle head (level 0 at half resolution)",
    features=16, levels=5, convs_per_block=2, flat=True, stem="unshuffle", test_overrides=_TEST_SIZE,
)
register_preset(
    "unet_small_16f_unshuffle", LUNet, "lunet",
    "unet_small_16f with a pixel-unshuffle stem and pixel-shuffle head (level 0 at half resolution)",
    features=16, levels=5, convs_per_block=2, flat=False, stem="unshuffle", test_overrides=_TEST_SIZE,
)
# Issue 10: lean at the expensive (finest) level, wider where the volume is small.
_WIDE = dict(widths=(16, 24, 32, 32, 32), convs_per_block=2, stem="unshuffle", test_overrides={"widths": (2, 3, 4, 4, 4)})
register_preset(
    "lunet_small_16f_unshuffle_wide", LUNet, "lunet",
    "lunet_small_16f_unshuffle with wider coarse levels: widths 16, 24, 32, 32, 32 (cheap: those levels are small)",
    **_WIDE,
)
register_preset(
    "lunet_small_16f_unshuffle_wide_subpixel", LUNet, "lunet",
    "lunet_small_16f_unshuffle_wide with a 3x3x3 sub-pixel head: each full-resolution voxel sees the half-resolution "
    "neighbourhood",
    head_kernel=3, **_WIDE,
)
# Four levels instead of five: a 48x64x48 Hippocampus patch needs no padding (five unshuffle levels pad it to 64^3),
# and part of the coarsest level's parameters go to levels 1 and 3 (434k in all at 3 classes, against 466k).
_FOUR_LEVELS = dict(widths=(16, 32, 32, 48), convs_per_block=2, stem="unshuffle", head_kernel=3,
                    test_overrides={"widths": (2, 3, 3, 4)})
# nnU-Net's normalisation and activation (the `_in` presets): instance norm with affine, leaky ReLU 0.01.
_NNUNET_NORM_ACT = dict(norm=("instance", {"affine": True}),
                        act=("leakyrelu", {"negative_slope": 0.01, "inplace": True}))
register_preset(
    "lunet_16f_4level_unshuffle_subpixel", LUNet, "lunet",
    "Four-level unshuffle Lean UNet with a 3x3x3 sub-pixel head: widths 16, 32, 32, 48",
    **_FOUR_LEVELS,
)
register_preset(
    "lunet_16f_4level_unshuffle_subpixel_in", LUNet, "lunet",
    "lunet_16f_4level_unshuffle_subpixel with nnU-Net's instance norm (affine) and leaky ReLU instead of batch norm and ReLU",
    **_NNUNET_NORM_ACT, **_FOUR_LEVELS,
)
register_preset(
    "lunet_16f_4level_unshuffle_subpixel_in_res", LUNet, "lunet",
    "lunet_16f_4level_unshuffle_subpixel_in with residual conv blocks (MONAI's ResidualUnit, 1x1 projection where "
    "the width changes)",
    **_NNUNET_NORM_ACT, residual=True, **_FOUR_LEVELS,
)
register_preset(
    "lunet_16f_4level_unshuffle_subpixel_deep_in_res", LUNet, "lunet",
    "lunet_16f_4level_unshuffle_subpixel_in_res deeper where the volume is small, as SegResNet: widths 16, 24, 32, 40 "
    "with 2, 2, 3, 4 encoder convolutions (stacked residual units of two)",
    **_NNUNET_NORM_ACT, residual=True,
    widths=(16, 24, 32, 40), encoder_convs=(2, 2, 3, 4), convs_per_block=2, stem="unshuffle", head_kernel=3,
    test_overrides={"widths": (2, 3, 3, 4)},
)
register_preset(
    "lunet_16f_4level_unshuffle_subpixel_in_image", LUNet, "lunet",
    "lunet_16f_4level_unshuffle_subpixel_in whose sub-pixel head also reads the image: each 2x2x2 block's voxel "
    "intensities, through a 1x1 map, added to its logits",
    **_NNUNET_NORM_ACT, head_image=True, **_FOUR_LEVELS,
)
# Three levels: the coarsest at 1/8 of the input (6x8x6 for the 48x64x48 patch, as SegResNet's
# fourth level), its parameters moved to level 2 (392k at 3 classes).
register_preset(
    "lunet_16f_3level_unshuffle_subpixel_in", LUNet, "lunet",
    "lunet_16f_4level_unshuffle_subpixel_in with three levels, widths 16, 32, 72: the coarsest at 1/8 of the input "
    "size, as SegResNet's",
    **_NNUNET_NORM_ACT, widths=(16, 32, 72), convs_per_block=2, stem="unshuffle", head_kernel=3, test_overrides={"widths": (2, 3, 4)},
)
register_preset(
    "lunet_16f_4level_unshuffle_subpixel_in_refine", LUNet, "lunet",
    "lunet_16f_4level_unshuffle_subpixel_in with a thin full-resolution refinement after the sub-pixel head: a 3x3x3 "
    "conv of the logits and the image to 8 channels, leaky ReLU, a 1x1 conv added to the logits",
    **_NNUNET_NORM_ACT, head_refine=8, **_FOUR_LEVELS,
)
