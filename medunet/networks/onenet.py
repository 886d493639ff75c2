"""OneNet: a U-Net whose encoder has no kxk convolution, only pixel-unshuffle and channel-wise convs.

Based on Byun et al., "OneNet: A Channel-Wise 1D Convolutional U-Net", arXiv 2411.09838. The
authors' "channel-wise 1D convolution" (a Conv1d with kernel = stride = C_in over the flattened
tensor) is numerically a 1x1(x1) convolution, which is what is used here. Layer order follows the
authors' code: conv -> ReLU -> BatchNorm. Parameter counts reproduce the paper's Table 2 exactly
(see ``tests/test_networks_onenet.py``).
"""

from __future__ import annotations

from collections.abc import Sequence

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
from medunet.networks.skeleton import UNetBlocks, UNetParts, UNetSkeleton, compose_unet, level_widths
from medunet.networks.skips import OrdinarySkips

VARIANTS = ("e", "ed")


def _spatial(kernel_size: int) -> nn.Module:
    return FlatSpatialFilter(kernel_size) if kernel_size > 1 else nn.Identity()


class OneNetBlocks(UNetBlocks):
    """OneNet's stages: pointwise stem, then per level pixel-unshuffle + spatial filter + two pointwise convs.

    ``variant="e"``: a conventional decoder (transposed conv, two 3x3 conv+BN+ReLU; plain convs on top).
    ``variant="ed"``: a channel-wise decoder (pixel-shuffle, spatial filter, two pointwise convs). Each of its
    levels ends with ``2**d * widths[level - 1]`` channels so the next pixel-shuffle lands on that width.
    """

    def __init__(self, *, spatial_dims: int, variant: str, stem_repeat: int, spatial_kernel: int, act: ActType,
                 norm: NormType) -> None:
        if variant not in VARIANTS:
            raise MedunetError(f"OneNet variant must be one of {VARIANTS}, got {variant!r}")
        if stem_repeat < 1:
            raise MedunetError(f"OneNet needs stem_repeat >= 1, got {stem_repeat}")
        self.spatial_dims = spatial_dims
        self.variant = variant
        self.stem_repeat = stem_repeat
        self.spatial_kernel = spatial_kernel
        self.act = act
        self.norm = norm
        self.sub = 2**spatial_dims  # channels gained by a pixel-unshuffle of 2

    def pw(self, in_channels: int, out_channels: int) -> nn.Module:
        """Pointwise conv -> act -> norm (the authors' order)."""
        return conv_norm_act(self.spatial_dims, in_channels, out_channels, kernel_size=1, act=self.act,
                             norm=self.norm, order="AN")

    def skip_levels(self, levels: int) -> list[int]:
        # OneNet never concatenates the full-resolution stem feature: level 0 has no skip.
        return list(range(1, levels - 1))

    def encoder_stage(self, level: int, widths: list[int], in_channels: int) -> nn.Module:
        if level == 0:
            stem = [self.pw(in_channels, widths[0])] + [self.pw(widths[0], widths[0]) for _ in range(self.stem_repeat - 1)]
            return nn.Sequential(*stem)
        cin, cout = widths[level - 1], widths[level]
        layers = [PixelUnshuffle(self.spatial_dims, 2), _spatial(self.spatial_kernel), self.pw(self.sub * cin, cout),
                  self.pw(cout, cout)]
        if self.variant == "ed" and level == len(widths) - 1:
            layers.append(self.pw(cout, self.sub * cin))  # the coarsest feature, ready for the first pixel-shuffle
        return nn.Sequential(*layers)

    def decoder_stage(self, level: int, widths: list[int], merge: str) -> tuple[nn.Module, nn.Module, int]:
        d = self.spatial_dims
        width = widths[level]
        top = level == 0
        block_in = 2 * width if merge == "concat" else width
        if self.variant == "e":
            act, norm = (None, None) if top else (self.act, self.norm)
            block = nn.Sequential(
                conv_norm_act(d, block_in, width, kernel_size=3, act=act, norm=norm),
                conv_norm_act(d, width, width, kernel_size=3, act=act, norm=norm),
            )
            return Conv[Conv.CONVTRANS, d](widths[level + 1], width, 2, stride=2), block, width
        block_out = width if top else self.sub * widths[level - 1]
        block = nn.Sequential(_spatial(self.spatial_kernel), self.pw(block_in, block_out), self.pw(block_out, block_out))
        return PixelShuffle(d, 2), block, block_out

    def aux_head(self, level: int, channels: int, out_channels: int) -> nn.Module | None:
        if level == 0:
            return None
        if self.variant == "e":
            return Conv[Conv.CONV, self.spatial_dims](channels, out_channels, 3, padding=1)
        return Conv[Conv.CONV, self.spatial_dims](channels, out_channels, 1)

    def head(self, in_channels: int, out_channels: int) -> nn.Module:
        if self.variant == "e":
            return Conv[Conv.CONV, self.spatial_dims](in_channels, out_channels, 3, padding=1)
        return Conv[Conv.CONV, self.spatial_dims](in_channels, out_channels, 1)


def onenet_parts(
    *,
    spatial_dims: int,
    in_channels: int,
    out_channels: int,
    variant: str = "e",
    features: int = 64,
    levels: int = 4,
    flat: bool = False,
    widths: Sequence[int] | None = None,
    stem_repeat: int = 3,
    spatial_kernel: int = 9,
    act: ActType = "relu",
    norm: NormType = "batch",
    auxiliary_heads: bool = False,
    merge: str = "concat",
) -> UNetParts:
    """Stages of OneNet with ``levels`` downscalings (the arguments are :class:`OneNet`'s).

    Widths: ``features * 2**level`` as in the paper, ``features`` at every level (``flat``), or an explicit
    ``widths`` list of ``levels + 1`` entries (:func:`~medunet.networks.skeleton.level_widths`).
    """
    if levels < 1:
        raise MedunetError(f"OneNet needs levels >= 1, got {levels}")
    blocks = OneNetBlocks(spatial_dims=spatial_dims, variant=variant, stem_repeat=stem_repeat,
                          spatial_kernel=spatial_kernel, act=act, norm=norm)
    widths = level_widths(features=features, levels=None if widths is not None else levels + 1, flat=flat,
                          widths=widths)
    return compose_unet(blocks, in_channels=in_channels, out_channels=out_channels, widths=widths, merge=merge,
                        auxiliary_heads=auxiliary_heads)


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
        features: stem width b; level ``l`` has ``b * 2**l`` channels (``b`` with ``flat``). The paper uses 64 (2D);
            3D volumes suit 8-16 because a 3D unshuffle multiplies channels by 8.
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
        flat: constant width ``features`` at every level (a lean OneNet, as Lean UNet does for conv U-Nets)
            instead of doubling. Default False (the paper's).
        widths: an explicit width per level, ``levels + 1`` of them (e.g. ``(8, 16, 16, 16, 16)``), instead of
            ``features``, ``levels`` and ``flat``.

    Example::

        net = OneNet(spatial_dims=2, in_channels=3, out_channels=4, variant="ed")
        logits = net(torch.zeros(1, 3, 256, 256))  # (1, 4, 256, 256)
        lean = OneNet(spatial_dims=3, in_channels=1, out_channels=2, features=16, flat=True)  # 16 channels everywhere
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
        flat: bool = False,
        widths: Sequence[int] | None = None,
    ) -> None:
        parts = onenet_parts(
            spatial_dims=spatial_dims, in_channels=in_channels, out_channels=out_channels, variant=variant,
            features=features, levels=levels, flat=flat, widths=widths, stem_repeat=stem_repeat,
            spatial_kernel=spatial_kernel, act=act, norm=norm, auxiliary_heads=auxiliary_heads,
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
