"""OneNet: a U-Net whose encoder has no kxk convolution, only pixel-unshuffle and channel-wise convs.

Based on Byun et al., "OneNet: A Channel-Wise 1D Convolutional U-Net", arXiv 2411.09838. The
authors' "channel-wise 1D convolution" (a Conv1d with kernel = stride = C_in over the flattened
tensor) is numerically a 1x1(x1) convolution, which is what is used here. Layer order follows the
authors' code: conv -> ReLU -> BatchNorm. Parameter counts reproduce the paper's Table 2 exactly
(see ``tests/test_networks_onenet.py``).
"""

from __future__ import annotations

from monai.networks.layers.factories import Conv
from torch import nn

from medunet.errors import MedunetError
from medunet.networks.layers import (
    ActType,
    FlatSpatialFilter,
    NormType,
    PixelShuffle,
    PixelUnshuffle,
    conv_norm_act,
)
from medunet.networks.registry import register_class, register_preset
from medunet.networks.skeleton import DecoderStage, UNetParts, UNetSkeleton
from medunet.networks.skips import OrdinarySkips

VARIANTS = ("e", "ed")


def _spatial(kernel_size: int) -> nn.Module:
    return FlatSpatialFilter(kernel_size) if kernel_size > 1 else nn.Identity()


def onenet_parts(
    spatial_dims: int,
    in_channels: int,
    out_channels: int,
    variant: str = "e",
    features: int = 64,
    levels: int = 4,
    stem_repeat: int = 3,
    spatial_kernel: int = 9,
    act: ActType = "relu",
    norm: NormType = "batch",
    auxiliary_heads: bool = False,
    merge: str = "concat",
) -> UNetParts:
    """Stages of OneNet with ``levels`` downscalings; widths ``features * 2**level``."""
    if variant not in VARIANTS:
        raise MedunetError(f"OneNet variant must be one of {VARIANTS}, got {variant!r}")
    if levels < 1 or stem_repeat < 1:
        raise MedunetError(f"OneNet needs levels >= 1 and stem_repeat >= 1, got {levels}, {stem_repeat}")
    d = spatial_dims
    sub = 2**d  # channels gained by a pixel-unshuffle of 2
    widths = [features * 2**level for level in range(levels + 1)]

    def pw(cin: int, cout: int, with_norm: bool = True, with_act: bool = True) -> nn.Module:
        return conv_norm_act(d, cin, cout, 1, act if with_act else None, norm if with_norm else None, order="AN")

    stem = [pw(in_channels, widths[0])] + [pw(widths[0], widths[0]) for _ in range(stem_repeat - 1)]
    encoder: list[nn.Module] = [nn.Sequential(*stem)]
    for level in range(1, levels + 1):
        cin, cout = widths[level - 1], widths[level]
        encoder.append(
            nn.Sequential(PixelUnshuffle(d, 2), _spatial(spatial_kernel), pw(sub * cin, cout), pw(cout, cout))
        )

    # OneNet never concatenates the full-resolution stem feature: level 0 has no skip.
    skip_levels = list(range(1, levels))
    decoder: list[DecoderStage] = []
    decoder_channels: list[int] = []
    aux_heads: list[nn.Module] = []
    if variant == "e":
        # Conventional decoder: transposed conv, concat, two 3x3 conv+BN+ReLU; plain convs on top.
        for level in range(levels - 1, -1, -1):
            width = widths[level]
            top = level == 0
            block_in = width if top or merge != "concat" else 2 * width
            block = nn.Sequential(
                conv_norm_act(d, block_in, width, 3, None if top else act, None if top else norm),
                conv_norm_act(d, width, width, 3, None if top else act, None if top else norm),
            )
            up = Conv[Conv.CONVTRANS, d](widths[level + 1], width, 2, stride=2)
            decoder.append(DecoderStage(up, block, "none" if top else merge))
            decoder_channels.append(width)
            if not top:
                aux_heads.append(Conv[Conv.CONV, d](width, out_channels, 3, padding=1))
        head = Conv[Conv.CONV, d](widths[0], out_channels, 3, padding=1)
    else:
        # Channel-wise decoder: pixel-shuffle up, concat, spatial filter, two pointwise convs. Each
        # level ends with 2**d * width(level-1) channels so the next pixel-shuffle lands on that width.
        encoder[-1] = nn.Sequential(*encoder[-1], pw(widths[levels], sub * widths[levels - 1]))
        for level in range(levels - 1, -1, -1):
            width = widths[level]
            top = level == 0
            block_in = width if top or merge != "concat" else 2 * width
            block_out = width if top else sub * widths[level - 1]
            block = nn.Sequential(_spatial(spatial_kernel), pw(block_in, block_out), pw(block_out, block_out))
            decoder.append(DecoderStage(PixelShuffle(d, 2), block, "none" if top else merge))
            decoder_channels.append(block_out)
            if not top:
                aux_heads.append(Conv[Conv.CONV, d](block_out, out_channels, 1))
        head = Conv[Conv.CONV, d](widths[0], out_channels, 1)
    return UNetParts(
        encoder, decoder, head, widths, skip_levels, aux_heads=aux_heads if auxiliary_heads else [],
        decoder_channels=decoder_channels, out_channels=out_channels,
    )


class OneNet(UNetSkeleton):
    """OneNet: pixel-unshuffle + channel-wise (1x1) convolutions instead of kxk convolutions.

    Byun et al., arXiv 2411.09838. ``variant="e"`` pairs the channel-wise encoder with a conventional
    decoder (OneNet_e); ``variant="ed"`` makes the decoder channel-wise too, upsampling by
    pixel-shuffle with no learned upsampling at all (OneNet_ed).

    Args:
        spatial_dims: 2 or 3.
        in_channels: input channels.
        out_channels: output channels; forward returns logits at full resolution.
        variant: ``"e"`` or ``"ed"``.
        features: stem width b; level ``l`` has ``b * 2**l`` channels. The paper uses 64 (2D); 3D
            volumes suit 8-16 because a 3D unshuffle multiplies channels by 8.
        levels: downscalings (the paper's 4 or 5). Inputs are padded to a multiple of ``2**levels``.
        stem_repeat: pointwise convolutions at full resolution (3 reproduces the paper's counts).
        spatial_kernel: taps of the flattened spatial filter before each level's pointwise convs
            (9 in the paper; 1 or 0 switches it off).
        act, norm: applied after each pointwise conv as conv -> act -> norm (the authors' order).
        auxiliary_heads: also build the per-level heads of the authors' code. They are never used in
            forward but are part of the paper's parameter totals.
        pad_input: pad inputs to a multiple of ``2**levels`` and crop the output back.
        deep_supervision: 1x1 heads on the decoder levels above the finest (0..levels-1), used in training mode
            only; unlike ``auxiliary_heads`` they are trained (:class:`~medunet.networks.skeleton.UNetSkeleton`).

    Example::

        net = OneNet(spatial_dims=2, in_channels=3, out_channels=4, variant="ed")
        logits = net(torch.zeros(1, 3, 256, 256))  # (1, 4, 256, 256)
    """

    def __init__(
        self,
        spatial_dims: int = 3,
        in_channels: int = 1,
        out_channels: int = 2,
        variant: str = "e",
        features: int = 64,
        levels: int = 4,
        stem_repeat: int = 3,
        spatial_kernel: int = 9,
        act: ActType = "relu",
        norm: NormType = "batch",
        auxiliary_heads: bool = False,
        pad_input: bool = True,
        deep_supervision: int = 0,
    ) -> None:
        parts = onenet_parts(
            spatial_dims, in_channels, out_channels, variant, features, levels, stem_repeat, spatial_kernel,
            act, norm, auxiliary_heads,
        )
        super().__init__(spatial_dims, parts, OrdinarySkips(parts.skip_levels), pad_input, deep_supervision)


register_class(OneNet)
#: Test size: base width 2; variant, levels and stem repeat stay the preset's own.
_TEST_SIZE = {"features": 2}
# OneNet_e (channel-wise encoder, conventional decoder): the paper's Table 2 sizes, then sizes for 3D volumes.
register_preset(
    "onenet_e4_64f", OneNet, "onenet", "OneNet_e,4 as in the paper's Table 2: base width 64, stem repeat 3",
    variant="e", features=64, levels=4, stem_repeat=3, test_overrides=_TEST_SIZE,
)
register_preset(
    "onenet_e5_64f", OneNet, "onenet", "OneNet_e,5 as in the paper's Table 2: base width 64, stem repeat 3",
    variant="e", features=64, levels=5, stem_repeat=3, test_overrides=_TEST_SIZE,
)
register_preset(
    "onenet_e4_8f", OneNet, "onenet", "OneNet_e,4 sized for 3D volumes: base width 8",
    variant="e", features=8, levels=4, stem_repeat=3, test_overrides=_TEST_SIZE,
)
register_preset(
    "onenet_e4_16f", OneNet, "onenet", "OneNet_e,4 sized for 3D volumes: base width 16",
    variant="e", features=16, levels=4, stem_repeat=3, test_overrides=_TEST_SIZE,
)
# OneNet_ed: the decoder channel-wise too.
register_preset(
    "onenet_ed4_64f", OneNet, "onenet", "OneNet_ed,4 as in the paper's Table 2: base width 64, stem repeat 3",
    variant="ed", features=64, levels=4, stem_repeat=3, test_overrides=_TEST_SIZE,
)
register_preset(
    "onenet_ed5_64f", OneNet, "onenet", "OneNet_ed,5 as in the paper's Table 2: base width 64, stem repeat 3",
    variant="ed", features=64, levels=5, stem_repeat=3, test_overrides=_TEST_SIZE,
)
register_preset(
    "onenet_ed4_8f", OneNet, "onenet", "OneNet_ed,4 sized for 3D volumes: base width 8",
    variant="ed", features=8, levels=4, stem_repeat=3, test_overrides=_TEST_SIZE,
)
register_preset(
    "onenet_ed4_16f", OneNet, "onenet", "OneNet_ed,4 sized for 3D volumes: base width 16",
    variant="ed", features=16, levels=4, stem_repeat=3, test_overrides=_TEST_SIZE,
)
