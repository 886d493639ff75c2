"""NAFNet as a segmentation U-Net, in 2D and 3D: the host network of UNet--.

Based on Chen et al., "Simple Baselines for Image Restoration" (ECCV 2022): blocks with a per-pixel
channel LayerNorm, SimpleGate instead of activations, simplified channel attention, and learnable
residual scales initialised to zero; strided 2x2 convs down, 1x1 conv + pixel-shuffle up, skips added.
For segmentation the image-restoration global residual is dropped and the last conv emits logits.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from monai.networks.layers.factories import Conv
from torch import nn

from medunet.errors import MedunetError
from medunet.networks.layers import ChannelLayerNorm, PixelShuffle, SimplifiedChannelAttention, pointwise
from medunet.networks.registry import register_class, register_preset
from medunet.networks.skeleton import UNetBlocks, UNetParts, UNetSkeleton, compose_unet, level_widths
from medunet.networks.skips import OrdinarySkips


class SimpleGate(nn.Module):
    """Split the channels in two halves and multiply them: NAFNet's replacement for an activation."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, b = x.chunk(2, dim=1)
        return a * b


class NAFBlock(nn.Module):
    """One NAFNet block: 7c^2 + 33c parameters in 2D (the depthwise conv has 27 taps in 3D)."""

    def __init__(self, spatial_dims: int, channels: int, expansion: int = 2) -> None:
        super().__init__()
        hidden = channels * expansion
        conv = Conv[Conv.CONV, spatial_dims]
        shape = [1, channels] + [1] * spatial_dims
        self.norm1 = ChannelLayerNorm(channels)
        self.conv1 = pointwise(spatial_dims, channels, hidden)
        self.conv2 = conv(hidden, hidden, 3, padding=1, groups=hidden)
        self.gate = SimpleGate()
        self.attention = SimplifiedChannelAttention(spatial_dims, hidden // 2)
        self.conv3 = pointwise(spatial_dims, hidden // 2, channels)
        self.beta = nn.Parameter(torch.zeros(shape))
        self.norm2 = ChannelLayerNorm(channels)
        self.conv4 = pointwise(spatial_dims, channels, hidden)
        self.conv5 = pointwise(spatial_dims, hidden // 2, channels)
        self.gamma = nn.Parameter(torch.zeros(shape))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv3(self.attention(self.gate(self.conv2(self.conv1(self.norm1(x))))))
        x = x + y * self.beta
        y = self.conv5(self.gate(self.conv4(self.norm2(x))))
        return x + y * self.gamma


def _blocks(spatial_dims: int, channels: int, count: int) -> nn.Sequential:
    return nn.Sequential(*[NAFBlock(spatial_dims, channels) for _ in range(count)])


class NAFNetBlocks(UNetBlocks):
    """NAFNet's stages: NAF blocks; a strided 2x2 conv down; a bias-free 1x1 conv + pixel-shuffle up; a 3x3 head.

    Encoder level ``l`` runs ``encoder_blocks[l]`` blocks (the coarsest level ``middle_blocks``); decoder level
    ``l`` runs ``decoder_blocks`` (coarsest first). With ``merge="concat"`` a 1x1 conv first halves the channels.
    """

    def __init__(self, *, spatial_dims: int, encoder_blocks: Sequence[int], middle_blocks: int,
                 decoder_blocks: Sequence[int]) -> None:
        if len(encoder_blocks) < 1 or len(decoder_blocks) != len(encoder_blocks):
            raise MedunetError(
                f"NAFNet needs as many decoder as encoder stages, got {list(encoder_blocks)} and {list(decoder_blocks)}"
            )
        self.spatial_dims = spatial_dims
        self.counts = list(encoder_blocks) + [middle_blocks]  # per encoder level, the coarsest last
        self.decoder_counts = list(decoder_blocks)

    def encoder_stage(self, level: int, widths: list[int], in_channels: int) -> nn.Module:
        d = self.spatial_dims
        conv = Conv[Conv.CONV, d]
        # Level l runs its encoder blocks; the next stage starts with the strided conv that halves it.
        first = conv(in_channels, widths[0], 3, padding=1) if level == 0 else conv(widths[level - 1], widths[level], 2, stride=2)
        return nn.Sequential(first, _blocks(d, widths[level], self.counts[level]))

    def decoder_stage(self, level: int, widths: list[int], merge: str) -> tuple[nn.Module, nn.Module, int]:
        d = self.spatial_dims
        width = widths[level]
        # 1x1 conv to width(level) * 2**d channels, then pixel-shuffle to width(level) at 2x resolution.
        up = nn.Sequential(pointwise(d, widths[level + 1], width * 2**d, bias=False), PixelShuffle(d, 2))
        count = self.decoder_counts[len(widths) - 2 - level]
        if merge == "concat":
            return up, nn.Sequential(pointwise(d, 2 * width, width), _blocks(d, width, count)), width
        return up, _blocks(d, width, count), width

    def head(self, in_channels: int, out_channels: int) -> nn.Module:
        return Conv[Conv.CONV, self.spatial_dims](in_channels, out_channels, 3, padding=1)


def nafnet_parts(
    *,
    spatial_dims: int,
    in_channels: int,
    out_channels: int,
    features: int = 32,
    flat: bool = False,
    widths: Sequence[int] | None = None,
    encoder_blocks: Sequence[int] = (2, 2, 4, 8),
    middle_blocks: int = 12,
    decoder_blocks: Sequence[int] = (2, 2, 2, 2),
    merge: str = "add",
    width: int | None = None,
) -> UNetParts:
    """Stages of NAFNet with ``len(encoder_blocks)`` downsamplings (the arguments are :class:`NAFNet`'s).

    Widths: ``features * 2**level`` as in the paper, ``features`` at every level (``flat``), or an explicit
    ``widths`` list of ``len(encoder_blocks) + 1`` entries (:func:`~medunet.networks.skeleton.level_widths`).
    """
    blocks = NAFNetBlocks(spatial_dims=spatial_dims, encoder_blocks=encoder_blocks, middle_blocks=middle_blocks,
                          decoder_blocks=decoder_blocks)
    if width is not None:  # the old name of ``features``, still in run folders written before it was renamed
        features = width
    widths = level_widths(features=features, levels=len(encoder_blocks) + 1, flat=flat, widths=widths)
    return compose_unet(blocks, in_channels=in_channels, out_channels=out_channels, widths=widths, merge=merge)


class NAFNet(UNetSkeleton):
    """NAFNet (Chen et al., ECCV 2022) as a 2D/3D segmentation network with additive skips.

    Args:
        spatial_dims: 2 or 3.
        in_channels: input channels.
        out_channels: output channels; forward returns logits.
        features: channels at full resolution; doubles at every level (unless ``flat``). Default 32.
        encoder_blocks: NAF blocks per encoder level; its length is the number of downsamplings.
        middle_blocks: NAF blocks at the coarsest level.
        decoder_blocks: NAF blocks per decoder level, coarsest first.
        pad_input: pad inputs to a multiple of ``2**len(encoder_blocks)`` and crop the output back.
        deep_supervision: 1x1 heads on the decoder levels above the finest, used in training mode only
            (:class:`~medunet.networks.skeleton.UNetSkeleton`).
        flat: constant width ``features`` at every level (a lean NAFNet) instead of doubling. Default False.
        widths: an explicit width per level, ``len(encoder_blocks) + 1`` of them, instead of ``features`` and ``flat``.
        width: the former name of ``features`` (run folders written before the rename still load); prefer ``features``.

    The published configurations are width 32 with ``(2, 2, 4, 8) / 12 / (2, 2, 2, 2)`` (SIDD) and
    ``(1, 1, 1, 28) / 1 / (1, 1, 1, 1)`` (GoPro); the registry has lighter presets for 3D volumes.

    Example::

        net = NAFNet(spatial_dims=3, in_channels=1, out_channels=2, features=8,
                     encoder_blocks=(1, 1, 1, 1), middle_blocks=1, decoder_blocks=(1, 1, 1, 1))
        lean = NAFNet(spatial_dims=3, in_channels=1, out_channels=2, features=16, flat=True,
                      encoder_blocks=(1, 1, 1, 1), middle_blocks=1, decoder_blocks=(1, 1, 1, 1))
    """

    def __init__(
        self,
        spatial_dims: int = 3,
        in_channels: int = 1,
        out_channels: int = 2,
        features: int = 32,
        encoder_blocks: Sequence[int] = (2, 2, 4, 8),
        middle_blocks: int = 12,
        decoder_blocks: Sequence[int] = (2, 2, 2, 2),
        pad_input: bool = True,
        deep_supervision: int = 0,
        flat: bool = False,
        widths: Sequence[int] | None = None,
        width: int | None = None,
    ) -> None:
        parts = nafnet_parts(
            spatial_dims=spatial_dims, in_channels=in_channels, out_channels=out_channels, features=features,
            flat=flat, widths=widths, encoder_blocks=encoder_blocks, middle_blocks=middle_blocks,
            decoder_blocks=decoder_blocks, width=width,
        )
        super().__init__(spatial_dims, parts, OrdinarySkips(parts.skip_levels), pad_input, deep_supervision)


# The paper's configurations (SIDD denoising, GoPro deblurring) and two light ones; UNet--
# (unet_minus.py) reuses them as backbones.
NAFNET_W32_SIDD = dict(features=32, encoder_blocks=(2, 2, 4, 8), middle_blocks=12, decoder_blocks=(2, 2, 2, 2))
NAFNET_W32_GOPRO = dict(features=32, encoder_blocks=(1, 1, 1, 28), middle_blocks=1, decoder_blocks=(1, 1, 1, 1))
NAFNET_W16_LIGHT = dict(features=16, encoder_blocks=(1, 1, 1, 1), middle_blocks=1, decoder_blocks=(1, 1, 1, 1))
NAFNET_W8_LIGHT = dict(features=8, encoder_blocks=(1, 1, 1, 1), middle_blocks=1, decoder_blocks=(1, 1, 1, 1))

register_class(NAFNet)
#: Test size: base width 4; block counts stay the preset's own.
_TEST_SIZE = {"features": 4}
register_preset(
    "nafnet_w32_sidd", NAFNet, "nafnet", "NAFNet width 32, blocks (2, 2, 4, 8)/12/(2, 2, 2, 2)",
    **NAFNET_W32_SIDD, test_overrides=_TEST_SIZE,
)
register_preset(
    "nafnet_w32_gopro", NAFNet, "nafnet", "NAFNet width 32, blocks (1, 1, 1, 28)/1/(1, 1, 1, 1)",
    **NAFNET_W32_GOPRO, test_overrides=_TEST_SIZE,
)
register_preset(
    "nafnet_w16_light", NAFNet, "nafnet", "NAFNet width 16, blocks (1, 1, 1, 1)/1/(1, 1, 1, 1)",
    **NAFNET_W16_LIGHT, test_overrides=_TEST_SIZE,
)
register_preset(
    "nafnet_w8_light", NAFNet, "nafnet", "NAFNet width 8, blocks (1, 1, 1, 1)/1/(1, 1, 1, 1)",
    **NAFNET_W8_LIGHT, test_overrides=_TEST_SIZE,
)
