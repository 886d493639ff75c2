"""Lean UNet and its doubling twin: plain convolutional U-Nets of the STAMP family.

Based on Hassler et al., "Lean Unet: A Compact Model for Image Segmentation", arXiv 2512.03834:
keep the channel count constant at every level instead of doubling it as resolution halves.
"""

from __future__ import annotations

from collections.abc import Sequence

from monai.networks.layers.factories import Conv, Pool
from torch import nn

from medunet.errors import MedunetError
from medunet.networks.layers import (
    ActType,
    DropoutType,
    NormType,
    PixelShuffle,
    PixelUnshuffle,
    conv_norm_act,
)
from medunet.networks.registry import register_class, register_preset
from medunet.networks.skeleton import DecoderStage, UNetParts, UNetSkeleton
from medunet.networks.skips import OrdinarySkips

STEMS = ("full", "unshuffle")


def conv_block(
    spatial_dims: int,
    in_channels: int,
    out_channels: int,
    convs: int,
    act: ActType,
    norm: NormType,
    dropout: DropoutType,
    bias: bool,
    order: str,
) -> nn.Sequential:
    """``convs`` x [3x3(x3) conv -> activation/norm/dropout in ``order``] (STAMP uses conv-ReLU-BN-dropout)."""
    layers = [
        conv_norm_act(spatial_dims, in_channels if i == 0 else out_channels, out_channels, 3, act, norm, dropout, bias, order)
        for i in range(convs)
    ]
    return nn.Sequential(*layers)


def conv_unet_parts(
    spatial_dims: int,
    in_channels: int,
    out_channels: int,
    widths: Sequence[int],
    convs_per_block: int = 2,
    act: ActType = ("relu", {"inplace": True}),
    norm: NormType = "batch",
    dropout: DropoutType = None,
    bias: bool = True,
    order: str = "AND",
    merge: str = "concat",
    stem: str = "full",
) -> UNetParts:
    """Stages of a convolutional U-Net with ``len(widths)`` resolution levels.

    Encoder: a conv block at full resolution, then max-pool + conv block per level. Decoder:
    transposed conv (kernel 2, stride 2) to the finer width, merge the skip, conv block. Head: 1x1 conv.

    ``stem="unshuffle"`` starts with a pixel-unshuffle (space-to-depth, no information lost) so level 0
    runs at half resolution, and ends with a 1x1 conv + pixel-shuffle back to full resolution, the way
    MONAI's UNet starts with a strided conv: no kxk convolution touches the full-resolution volume,
    which is where a 3D network's activations and (on the CPU) its convolution workspace peak.
    """
    if stem not in STEMS:
        raise MedunetError(f"stem must be one of {STEMS}, got {stem!r}")
    widths = list(widths)
    if len(widths) < 2:
        raise MedunetError(f"a U-Net needs at least 2 levels, got widths {widths}")

    def block(cin: int, cout: int) -> nn.Sequential:
        return conv_block(spatial_dims, cin, cout, convs_per_block, act, norm, dropout, bias, order)

    pool = Pool[Pool.MAX, spatial_dims]
    scale = 2**spatial_dims if stem == "unshuffle" else 1
    first = block(in_channels * scale, widths[0])
    encoder: list[nn.Module] = [nn.Sequential(PixelUnshuffle(spatial_dims, 2), first) if scale > 1 else first]
    encoder += [nn.Sequential(pool(2), block(widths[i - 1], widths[i])) for i in range(1, len(widths))]
    upconv = Conv[Conv.CONVTRANS, spatial_dims]
    decoder = []
    for level in range(len(widths) - 2, -1, -1):
        width = widths[level]
        block_in = 2 * width if merge == "concat" else width
        decoder.append(DecoderStage(upconv(widths[level + 1], width, 2, stride=2), block(block_in, width), merge))
    head: nn.Module = Conv[Conv.CONV, spatial_dims](widths[0], out_channels * scale, kernel_size=1)
    if scale > 1:
        head = nn.Sequential(head, PixelShuffle(spatial_dims, 2))
    return UNetParts(encoder, decoder, head, widths, skip_levels=list(range(len(widths) - 1)),
                     input_stride=2 if scale > 1 else 1,
                     decoder_channels=[widths[level] for level in range(len(widths) - 2, -1, -1)],
                     out_channels=out_channels)


def lunet_widths(features: int, levels: int, flat: bool) -> list[int]:
    """Constant width ``features`` at every level (lean) or ``features * 2**level`` (doubling)."""
    if features < 1 or levels < 2:
        raise MedunetError(f"LUNet needs features >= 1 and levels >= 2, got features={features}, levels={levels}")
    return [features if flat else features * 2**level for level in range(levels)]


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
    ) -> None:
        if widths is None:
            widths = lunet_widths(features, levels, flat)
        elif len(widths) < 2 or min(widths) < 1:
            raise MedunetError(f"widths must list at least 2 positive level widths, got {list(widths)}")
        parts = conv_unet_parts(
            spatial_dims, in_channels, out_channels, list(widths), convs_per_block, act, norm, dropout, bias, order,
            stem=stem,
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
register_preset(
    "lunet_small_16f_unshuffle_wide", LUNet, "lunet",
    "lunet_small_16f_unshuffle with wider coarse levels: widths 16, 24, 32, 32, 32 (cheap: those levels are small)",
    widths=(16, 24, 32, 32, 32), convs_per_block=2, stem="unshuffle", test_overrides={"widths": (2, 3, 4, 4, 4)},
)
