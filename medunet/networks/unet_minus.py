"""UNet--: any medunet backbone with its per-level skips replaced by MSIAM + IEM.

Based on Yin et al., "UNet--: Memory-Efficient and Feature-Enhanced Network Architecture based on
U-Net with Reduced Skip-Connections", arXiv 2412.18276. See :mod:`medunet.networks.skips` for the
modules; this file only chooses the backbone.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from medunet.errors import MedunetError
from medunet.networks.conv_unet import conv_unet_parts
from medunet.networks.nafnet import (
    NAFNET_W8_LIGHT,
    NAFNET_W16_LIGHT,
    NAFNET_W32_GOPRO,
    NAFNET_W32_SIDD,
    nafnet_parts,
)
from medunet.networks.onenet import onenet_parts
from medunet.networks.registry import register_class, register_preset
from medunet.networks.skeleton import UNetParts, UNetSkeleton
from medunet.networks.skips import AggregatedSkips

#: Backbone name -> (its family's parts builder, the keywords UNet-- passes unless told otherwise). Every builder
#: takes the same width keywords (``features``, ``flat``, ``widths``), so the backbone's own are passed through.
BACKBONES: dict[str, tuple[Callable[..., UNetParts], dict[str, Any]]] = {
    "unet": (conv_unet_parts, {"features": 16, "levels": 4, "flat": False}),
    "lunet": (conv_unet_parts, {"features": 16, "levels": 4, "flat": True}),
    "nafnet": (nafnet_parts, {}),
    "onenet": (onenet_parts, {}),
}


class UNetMinus(UNetSkeleton):
    """UNet--: one aggregated tensor E' instead of per-level skip connections.

    Yin et al., arXiv 2412.18276. MSIAM reduces each encoder feature's channels, resizes it to the
    target level by pixel-(un)shuffle and folds it into E' by a 1x1 conv as soon as it is produced,
    so the full-resolution maps are freed during inference. IEM regenerates each decoder level's skip
    from E' just before that level needs it.

    Args:
        spatial_dims: 2 or 3.
        in_channels: input channels.
        out_channels: output channels; forward returns logits.
        backbone: ``"unet"`` (doubling conv U-Net), ``"lunet"`` (Lean UNet widths), ``"nafnet"``, or
            ``"onenet"``; its own arguments are passed as extra keywords. Every backbone takes the width
            schedule ``features``, ``flat``, ``widths`` (the conv ones default to ``features=16, levels=4``); then
            e.g. ``levels``, ``stem`` (conv), ``encoder_blocks``... (NAFNet), ``variant`` (OneNet).
        target: level of E': ``"coarsest"`` (default), ``"intermediate"``, ``"finest"`` or an index.
        agg_channels: channels of E' (default: the backbone's width at the target level).
        piece_channels: channels each level contributes to E' before fusion (default: an equal share).
        iem: ``"enhanced"`` (residual depthwise refinement + channel gate) or ``"plain"`` projection.
        merge: how the regenerated skip joins the decoder: ``"add"`` (default, as NAFNet; no
            full-resolution concatenation buffer) or ``"concat"``.
        pad_input: pad inputs to a multiple of ``2**downsamplings`` and crop the output back.
        deep_supervision: 1x1 heads on the decoder levels above the finest, used in training mode only
            (:class:`~medunet.networks.skeleton.UNetSkeleton`).

    Example::

        net = UNetMinus(spatial_dims=3, in_channels=1, out_channels=3, backbone="lunet", features=16)
        lean_onenet = UNetMinus(spatial_dims=3, in_channels=1, out_channels=3, backbone="onenet", features=8, flat=True)
    """

    def __init__(
        self,
        spatial_dims: int = 3,
        in_channels: int = 1,
        out_channels: int = 2,
        backbone: str = "unet",
        target: str | int = "coarsest",
        agg_channels: int | None = None,
        piece_channels: int | None = None,
        iem: str = "enhanced",
        merge: str = "add",
        pad_input: bool = True,
        deep_supervision: int = 0,
        **backbone_kwargs: Any,
    ) -> None:
        if backbone not in BACKBONES:
            raise MedunetError(f"UNet-- backbone must be one of {sorted(BACKBONES)}, got {backbone!r}")
        if merge not in ("add", "concat"):
            raise MedunetError(f"UNet-- merge must be 'add' or 'concat', got {merge!r}")
        build_parts, defaults = BACKBONES[backbone]
        parts = build_parts(spatial_dims=spatial_dims, in_channels=in_channels, out_channels=out_channels, merge=merge,
                            **{**defaults, **backbone_kwargs})
        skips = AggregatedSkips(
            spatial_dims, parts.channels, parts.skip_levels, parts.skip_channels, target=target,
            agg_channels=agg_channels, piece_channels=piece_channels, iem=iem,
        )
        super().__init__(spatial_dims, parts, skips, pad_input, deep_supervision)


register_class(UNetMinus)
#: Test size: the backbone's widths shrunk (NAFNet width 4, conv U-Net features 2); levels, blocks, targets stay.
_TEST_SIZE_NAFNET = {"features": 4}
_TEST_SIZE_CONV = {"features": 2}
# Each backbone preset with E' at its coarsest, intermediate and finest skip level. NAFNet (the paper's host):
register_preset(
    "unetmm_nafnet_w32_sidd_coarsest", UNetMinus, "unet--",
    "UNet-- on nafnet_w32_sidd, E' at the coarsest skip level",
    backbone="nafnet", target="coarsest", **NAFNET_W32_SIDD, test_overrides=_TEST_SIZE_NAFNET,
)
register_preset(
    "unetmm_nafnet_w32_sidd_intermediate", UNetMinus, "unet--",
    "UNet-- on nafnet_w32_sidd, E' at the intermediate skip level",
    backbone="nafnet", target="intermediate", **NAFNET_W32_SIDD, test_overrides=_TEST_SIZE_NAFNET,
)
register_preset(
    "unetmm_nafnet_w32_sidd_finest", UNetMinus, "unet--",
    "UNet-- on nafnet_w32_sidd, E' at the finest skip level",
    backbone="nafnet", target="finest", **NAFNET_W32_SIDD, test_overrides=_TEST_SIZE_NAFNET,
)
register_preset(
    "unetmm_nafnet_w32_gopro_coarsest", UNetMinus, "unet--",
    "UNet-- on nafnet_w32_gopro, E' at the coarsest skip level",
    backbone="nafnet", target="coarsest", **NAFNET_W32_GOPRO, test_overrides=_TEST_SIZE_NAFNET,
)
register_preset(
    "unetmm_nafnet_w32_gopro_intermediate", UNetMinus, "unet--",
    "UNet-- on nafnet_w32_gopro, E' at the intermediate skip level",
    backbone="nafnet", target="intermediate", **NAFNET_W32_GOPRO, test_overrides=_TEST_SIZE_NAFNET,
)
register_preset(
    "unetmm_nafnet_w32_gopro_finest", UNetMinus, "unet--",
    "UNet-- on nafnet_w32_gopro, E' at the finest skip level",
    backbone="nafnet", target="finest", **NAFNET_W32_GOPRO, test_overrides=_TEST_SIZE_NAFNET,
)
register_preset(
    "unetmm_nafnet_w16_light_coarsest", UNetMinus, "unet--",
    "UNet-- on nafnet_w16_light, E' at the coarsest skip level",
    backbone="nafnet", target="coarsest", **NAFNET_W16_LIGHT, test_overrides=_TEST_SIZE_NAFNET,
)
register_preset(
    "unetmm_nafnet_w16_light_intermediate", UNetMinus, "unet--",
    "UNet-- on nafnet_w16_light, E' at the intermediate skip level",
    backbone="nafnet", target="intermediate", **NAFNET_W16_LIGHT, test_overrides=_TEST_SIZE_NAFNET,
)
register_preset(
    "unetmm_nafnet_w16_light_finest", UNetMinus, "unet--",
    "UNet-- on nafnet_w16_light, E' at the finest skip level",
    backbone="nafnet", target="finest", **NAFNET_W16_LIGHT, test_overrides=_TEST_SIZE_NAFNET,
)
register_preset(
    "unetmm_nafnet_w8_light_coarsest", UNetMinus, "unet--",
    "UNet-- on nafnet_w8_light, E' at the coarsest skip level",
    backbone="nafnet", target="coarsest", **NAFNET_W8_LIGHT, test_overrides=_TEST_SIZE_NAFNET,
)
register_preset(
    "unetmm_nafnet_w8_light_intermediate", UNetMinus, "unet--",
    "UNet-- on nafnet_w8_light, E' at the intermediate skip level",
    backbone="nafnet", target="intermediate", **NAFNET_W8_LIGHT, test_overrides=_TEST_SIZE_NAFNET,
)
register_preset(
    "unetmm_nafnet_w8_light_finest", UNetMinus, "unet--",
    "UNet-- on nafnet_w8_light, E' at the finest skip level",
    backbone="nafnet", target="finest", **NAFNET_W8_LIGHT, test_overrides=_TEST_SIZE_NAFNET,
)
# The doubling and the lean conv U-Nets, 5 levels x 2 convs; with the unshuffle stem (level 0 at half
# resolution), E' at the coarsest or intermediate level; the finest one is below, with its own pieces.
register_preset(
    "unetmm_unet_small_8f_coarsest", UNetMinus, "unet--",
    "UNet-- on unet_small_8f (5 levels x 2 convs), E' at the coarsest skip level",
    backbone="unet", target="coarsest", features=8, levels=5, convs_per_block=2,
    test_overrides=_TEST_SIZE_CONV,
)
register_preset(
    "unetmm_unet_small_8f_intermediate", UNetMinus, "unet--",
    "UNet-- on unet_small_8f (5 levels x 2 convs), E' at the intermediate skip level",
    backbone="unet", target="intermediate", features=8, levels=5, convs_per_block=2,
    test_overrides=_TEST_SIZE_CONV,
)
register_preset(
    "unetmm_unet_small_8f_finest", UNetMinus, "unet--",
    "UNet-- on unet_small_8f (5 levels x 2 convs), E' at the finest skip level",
    backbone="unet", target="finest", features=8, levels=5, convs_per_block=2, test_overrides=_TEST_SIZE_CONV,
)
register_preset(
    "unetmm_unet_small_8f_unshuffle_coarsest", UNetMinus, "unet--",
    "UNet-- on unet_small_8f_unshuffle (level 0 at half resolution), E' at the coarsest skip level",
    backbone="unet", target="coarsest", features=8, levels=5, convs_per_block=2, stem="unshuffle",
    test_overrides=_TEST_SIZE_CONV,
)
register_preset(
    "unetmm_unet_small_8f_unshuffle_intermediate", UNetMinus, "unet--",
    "UNet-- on unet_small_8f_unshuffle (level 0 at half resolution), E' at the intermediate skip level",
    backbone="unet", target="intermediate", features=8, levels=5, convs_per_block=2, stem="unshuffle",
    test_overrides=_TEST_SIZE_CONV,
)
register_preset(
    "unetmm_lunet_small_8f_coarsest", UNetMinus, "unet--",
    "UNet-- on lunet_small_8f (5 levels x 2 convs), E' at the coarsest skip level",
    backbone="lunet", target="coarsest", features=8, levels=5, convs_per_block=2,
    test_overrides=_TEST_SIZE_CONV,
)
register_preset(
    "unetmm_lunet_small_8f_intermediate", UNetMinus, "unet--",
    "UNet-- on lunet_small_8f (5 levels x 2 convs), E' at the intermediate skip level",
    backbone="lunet", target="intermediate", features=8, levels=5, convs_per_block=2,
    test_overrides=_TEST_SIZE_CONV,
)
register_preset(
    "unetmm_lunet_small_8f_finest", UNetMinus, "unet--",
    "UNet-- on lunet_small_8f (5 levels x 2 convs), E' at the finest skip level",
    backbone="lunet", target="finest", features=8, levels=5, convs_per_block=2,
    test_overrides=_TEST_SIZE_CONV,
)
register_preset(
    "unetmm_lunet_small_8f_unshuffle_coarsest", UNetMinus, "unet--",
    "UNet-- on lunet_small_8f_unshuffle (level 0 at half resolution), E' at the coarsest skip level",
    backbone="lunet", target="coarsest", features=8, levels=5, convs_per_block=2, stem="unshuffle",
    test_overrides=_TEST_SIZE_CONV,
)
register_preset(
    "unetmm_lunet_small_8f_unshuffle_intermediate", UNetMinus, "unet--",
    "UNet-- on lunet_small_8f_unshuffle (level 0 at half resolution), E' at the intermediate skip level",
    backbone="lunet", target="intermediate", features=8, levels=5, convs_per_block=2, stem="unshuffle",
    test_overrides=_TEST_SIZE_CONV,
)
register_preset(
    "unetmm_unet_small_16f_coarsest", UNetMinus, "unet--",
    "UNet-- on unet_small_16f (5 levels x 2 convs), E' at the coarsest skip level",
    backbone="unet", target="coarsest", features=16, levels=5, convs_per_block=2,
    test_overrides=_TEST_SIZE_CONV,
)
register_preset(
    "unetmm_unet_small_16f_intermediate", UNetMinus, "unet--",
    "UNet-- on unet_small_16f (5 levels x 2 convs), E' at the intermediate skip level",
    backbone="unet", target="intermediate", features=16, levels=5, convs_per_block=2,
    test_overrides=_TEST_SIZE_CONV,
)
register_preset(
    "unetmm_unet_small_16f_finest", UNetMinus, "unet--",
    "UNet-- on unet_small_16f (5 levels x 2 convs), E' at the finest skip level",
    backbone="unet", target="finest", features=16, levels=5, convs_per_block=2,
    test_overrides=_TEST_SIZE_CONV,
)
register_preset(
    "unetmm_unet_small_16f_unshuffle_coarsest", UNetMinus, "unet--",
    "UNet-- on unet_small_16f_unshuffle (level 0 at half resolution), E' at the coarsest skip level",
    backbone="unet", target="coarsest", features=16, levels=5, convs_per_block=2, stem="unshuffle",
    test_overrides=_TEST_SIZE_CONV,
)
register_preset(
    "unetmm_unet_small_16f_unshuffle_intermediate", UNetMinus, "unet--",
    "UNet-- on unet_small_16f_unshuffle (level 0 at half resolution), E' at the intermediate skip level",
    backbone="unet", target="intermediate", features=16, levels=5, convs_per_block=2, stem="unshuffle",
    test_overrides=_TEST_SIZE_CONV,
)
register_preset(
    "unetmm_lunet_small_16f_coarsest", UNetMinus, "unet--",
    "UNet-- on lunet_small_16f (5 levels x 2 convs), E' at the coarsest skip level",
    backbone="lunet", target="coarsest", features=16, levels=5, convs_per_block=2,
    test_overrides=_TEST_SIZE_CONV,
)
register_preset(
    "unetmm_lunet_small_16f_intermediate", UNetMinus, "unet--",
    "UNet-- on lunet_small_16f (5 levels x 2 convs), E' at the intermediate skip level",
    backbone="lunet", target="intermediate", features=16, levels=5, convs_per_block=2,
    test_overrides=_TEST_SIZE_CONV,
)
register_preset(
    "unetmm_lunet_small_16f_finest", UNetMinus, "unet--",
    "UNet-- on lunet_small_16f (5 levels x 2 convs), E' at the finest skip level",
    backbone="lunet", target="finest", features=16, levels=5, convs_per_block=2,
    test_overrides=_TEST_SIZE_CONV,
)
register_preset(
    "unetmm_lunet_small_16f_unshuffle_coarsest", UNetMinus, "unet--",
    "UNet-- on lunet_small_16f_unshuffle (level 0 at half resolution), E' at the coarsest skip level",
    backbone="lunet", target="coarsest", features=16, levels=5, convs_per_block=2, stem="unshuffle",
    test_overrides=_TEST_SIZE_CONV,
)
register_preset(
    "unetmm_lunet_small_16f_unshuffle_intermediate", UNetMinus, "unet--",
    "UNet-- on lunet_small_16f_unshuffle (level 0 at half resolution), E' at the intermediate skip level",
    backbone="lunet", target="intermediate", features=16, levels=5, convs_per_block=2, stem="unshuffle",
    test_overrides=_TEST_SIZE_CONV,
)
# E' at the finest level of the unshuffle stem (half resolution): each level keeps 16 channels of its own.
register_preset(
    "unetmm_lunet_small_16f_unshuffle_finest", UNetMinus, "unet--",
    "UNet-- on lunet_small_16f_unshuffle, E' of 16 channels at the finest (half-resolution) level, pieces of 16",
    backbone="lunet", target="finest", features=16, levels=5, convs_per_block=2, stem="unshuffle",
    piece_channels=16, test_overrides=_TEST_SIZE_CONV,
)
# Wider aggregates for the lean backbone: E' sits at a coarse level, so 4x or 8x its channels costs next to
# no memory, and larger pieces let the finest level keep 4 or 8 channels of its own (1 by default).
register_preset(
    "unetmm_lunet_small_16f_unshuffle_intermediate_wide", UNetMinus, "unet--",
    "UNet-- on lunet_small_16f_unshuffle, E' of 64 channels at the intermediate level, pieces of 256",
    backbone="lunet", target="intermediate", features=16, levels=5, convs_per_block=2, stem="unshuffle",
    agg_channels=64, piece_channels=256, test_overrides=_TEST_SIZE_CONV,
)
register_preset(
    "unetmm_lunet_small_16f_unshuffle_intermediate_wider", UNetMinus, "unet--",
    "UNet-- on lunet_small_16f_unshuffle, E' of 128 channels at the intermediate level, pieces of 512",
    backbone="lunet", target="intermediate", features=16, levels=5, convs_per_block=2, stem="unshuffle",
    agg_channels=128, piece_channels=512, test_overrides=_TEST_SIZE_CONV,
)
