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
from medunet.networks.skeleton import DecoderStage, UNetParts, UNetSkeleton
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


def nafnet_parts(
    spatial_dims: int,
    in_channels: int,
    out_channels: int,
    width: int = 32,
    encoder_blocks: Sequence[int] = (2, 2, 4, 8),
    middle_blocks: int = 12,
    decoder_blocks: Sequence[int] = (2, 2, 2, 2),
    merge: str = "add",
) -> UNetParts:
    """Stages of NAFNet: ``len(encoder_blocks)`` downsamplings, widths ``width * 2**level``."""
    levels = len(encoder_blocks)
    if levels < 1 or len(decoder_blocks) != levels:
        raise MedunetError(
            f"NAFNet needs as many decoder as encoder stages, got {list(encoder_blocks)} and {list(decoder_blocks)}"
        )
    d = spatial_dims
    conv = Conv[Conv.CONV, d]
    widths = [width * 2**level for level in range(levels + 1)]
    # Level l runs its encoder blocks; the next stage starts with the strided conv that halves it.
    encoder: list[nn.Module] = [nn.Sequential(conv(in_channels, width, 3, padding=1), _blocks(d, width, encoder_blocks[0]))]
    for level in range(1, levels + 1):
        count = encoder_blocks[level] if level < levels else middle_blocks
        encoder.append(nn.Sequential(conv(widths[level - 1], widths[level], 2, stride=2), _blocks(d, widths[level], count)))
    decoder = []
    for level in range(levels - 1, -1, -1):
        # 1x1 conv to width(level) * 2**d channels, then pixel-shuffle to width(level) at 2x resolution.
        up = nn.Sequential(pointwise(d, widths[level + 1], widths[level] * 2**d, bias=False), PixelShuffle(d, 2))
        if merge == "concat":
            blocks: nn.Module = nn.Sequential(pointwise(d, 2 * widths[level], widths[level]), _blocks(d, widths[level], decoder_blocks[levels - 1 - level]))
        else:
            blocks = _blocks(d, widths[level], decoder_blocks[levels - 1 - level])
        decoder.append(DecoderStage(up, blocks, merge))
    head = conv(width, out_channels, 3, padding=1)
    return UNetParts(encoder, decoder, head, widths, skip_levels=list(range(levels)),
                     decoder_channels=[widths[level] for level in range(levels - 1, -1, -1)], out_channels=out_channels)


class NAFNet(UNetSkeleton):
    """NAFNet (Chen et al., ECCV 2022) as a 2D/3D segmentation network with additive skips.

    Args:
        spatial_dims: 2 or 3.
        in_channels: input channels.
        out_channels: output channels; forward returns logits.
        width: channels at full resolution; doubles at every level. Default 32.
        encoder_blocks: NAF blocks per encoder level; its length is the number of downsamplings.
        middle_blocks: NAF blocks at the coarsest level.
        decoder_blocks: NAF blocks per decoder level, coarsest first.
        pad_input: pad inputs to a multiple of ``2**len(encoder_blocks)`` and crop the output back.
        deep_supervision: 1x1 heads on the decoder levels above the finest, used in training mode only
            (:class:`~medunet.networks.skeleton.UNetSkeleton`).

    The published configurations are width 32 with ``(2, 2, 4, 8) / 12 / (2, 2, 2, 2)`` (SIDD) and
    ``(1, 1, 1, 28) / 1 / (1, 1, 1, 1)`` (GoPro); the registry has lighter presets for 3D volumes.

    Example::

        net = NAFNet(spatial_dims=3, in_channels=1, out_channels=2, width=8,
                     encoder_blocks=(1, 1, 1, 1), middle_blocks=1, decoder_blocks=(1, 1, 1, 1))
    """

    def __init__(
        self,
        spatial_dims: int = 3,
        in_channels: int = 1,
        out_channels: int = 2,
        width: int = 32,
        encoder_blocks: Sequence[int] = (2, 2, 4, 8),
        middle_blocks: int = 12,
        decoder_blocks: Sequence[int] = (2, 2, 2, 2),
        pad_input: bool = True,
        deep_supervision: int = 0,
    ) -> None:
        parts = nafnet_parts(spatial_dims, in_channels, out_channels, width, encoder_blocks, middle_blocks, decoder_blocks)
        super().__init__(spatial_dims, parts, OrdinarySkips(parts.skip_levels), pad_input, deep_supervision)


# The paper's configurations (SIDD denoising, GoPro deblurring) and two light ones; UNet--
# (unet_minus.py) reuses them as backbones.
NAFNET_W32_SIDD = dict(width=32, encoder_blocks=(2, 2, 4, 8), middle_blocks=12, decoder_blocks=(2, 2, 2, 2))
NAFNET_W32_GOPRO = dict(width=32, encoder_blocks=(1, 1, 1, 28), middle_blocks=1, decoder_blocks=(1, 1, 1, 1))
NAFNET_W16_LIGHT = dict(width=16, encoder_blocks=(1, 1, 1, 1), middle_blocks=1, decoder_blocks=(1, 1, 1, 1))
NAFNET_W8_LIGHT = dict(width=8, encoder_blocks=(1, 1, 1, 1), middle_blocks=1, decoder_blocks=(1, 1, 1, 1))

register_class(NAFNet)
#: Test size: width 4; block counts stay the preset's own.
_TEST_SIZE = {"width": 4}
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
