"""The three seams combine: any block family x any width schedule x any skip strategy, by arguments alone."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from medunet.errors import MedunetError
from medunet.networks import LUNet, NAFNet, OneNet, UNetMinus, UNetSkeleton
from medunet.networks.baselines import HalfResolution, PadToDivisible
from medunet.networks.conv_unet import conv_unet_parts
from medunet.networks.layers import crop_spatial, pad_to_multiple
from medunet.networks.nafnet import nafnet_parts
from medunet.networks.onenet import onenet_parts
from medunet.networks.skeleton import level_widths
from medunet.networks.skips import AggregatedSkips, OrdinarySkips, SkipStrategy

LIGHT = dict(encoder_blocks=(1, 1, 1, 1), middle_blocks=1, decoder_blocks=(1, 1, 1, 1))


def n_params(net: nn.Module) -> int:
    return sum(p.numel() for p in net.parameters())


def nafnet_formula(widths: list[int], spatial_dims: int, in_channels: int, out_channels: int,
                   encoder_blocks: tuple[int, ...], middle_blocks: int, decoder_blocks: tuple[int, ...]) -> int:
    """NAFNet's parameters level by level: 3x3 intro and head, strided 2x2 down, bias-free 1x1 up, NAF blocks."""
    taps, sub = 3**spatial_dims, 2**spatial_dims

    def block(c: int) -> int:  # 7c^2 + 33c in 2D: the depthwise conv has 2c * 3**d taps
        return 7 * c * c + (15 + 2 * taps) * c

    counts = list(encoder_blocks) + [middle_blocks]
    total = in_channels * widths[0] * taps + widths[0] + widths[0] * out_channels * taps + out_channels
    for level, width in enumerate(widths):
        total += counts[level] * block(width)
        if level > 0:
            total += widths[level - 1] * width * sub + width  # down
            total += width * widths[level - 1] * sub  # up to level - 1
            total += decoder_blocks[len(widths) - 1 - level] * block(widths[level - 1])
    return total


def onenet_ed_formula(widths: list[int], spatial_dims: int, in_channels: int, out_channels: int,
                      stem_repeat: int = 3, spatial_kernel: int = 9) -> int:
    """OneNet_ed's parameters level by level: pointwise conv + batch norm everywhere, one spatial filter per stage."""
    sub, top = 2**spatial_dims, len(widths) - 1

    def pw(cin: int, cout: int) -> int:  # 1x1 conv with bias, then batch norm (weight and bias)
        return cin * cout + 3 * cout

    spatial = spatial_kernel + 1
    total = pw(in_channels, widths[0]) + (stem_repeat - 1) * pw(widths[0], widths[0])
    for level in range(1, top + 1):
        total += spatial + pw(sub * widths[level - 1], widths[level]) + pw(widths[level], widths[level])
    total += pw(widths[top], sub * widths[top - 1])  # the coarsest feature, ready for the first pixel-shuffle
    for level in range(top - 1, -1, -1):
        block_in = 2 * widths[level] if level > 0 else widths[0]  # concat at every level but 0
        block_out = sub * widths[level - 1] if level > 0 else widths[0]
        total += spatial + pw(block_in, block_out) + pw(block_out, block_out)
    return total + widths[0] * out_channels + out_channels


def test_onenet_ed_formula_reproduces_the_paper_count() -> None:
    """The per-level formula is right: it gives OneNet_ed,4's Table 2 count (2D, in 3, out 4, base 64)."""
    assert onenet_ed_formula([64 * 2**level for level in range(5)], 2, 3, 4) == 9_073_876


@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_lean_onenet_parameters_follow_its_width_schedule(spatial_dims: int) -> None:
    lean = OneNet(spatial_dims, 1, 2, variant="ed", features=8, flat=True)
    doubling = OneNet(spatial_dims, 1, 2, variant="ed", features=8)
    assert n_params(lean) == onenet_ed_formula([8] * 5, spatial_dims, 1, 2)
    assert n_params(doubling) == onenet_ed_formula([8, 16, 32, 64, 128], spatial_dims, 1, 2)
    assert 10 * n_params(lean) < n_params(doubling)
    explicit = OneNet(spatial_dims, 1, 2, variant="ed", widths=(8, 12, 16, 16, 16))
    assert n_params(explicit) == onenet_ed_formula([8, 12, 16, 16, 16], spatial_dims, 1, 2)


@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_lean_nafnet_parameters_follow_its_width_schedule(spatial_dims: int) -> None:
    lean = NAFNet(spatial_dims, 1, 2, features=8, flat=True, **LIGHT)
    doubling = NAFNet(spatial_dims, 1, 2, features=8, **LIGHT)
    assert n_params(lean) == nafnet_formula([8] * 5, spatial_dims, 1, 2, **LIGHT)
    assert n_params(doubling) == nafnet_formula([8, 16, 32, 64, 128], spatial_dims, 1, 2, **LIGHT)
    assert 20 * n_params(lean) < n_params(doubling)
    sidd = dict(encoder_blocks=(2, 2, 4, 8), middle_blocks=12, decoder_blocks=(2, 2, 2, 2))
    explicit = NAFNet(spatial_dims, 1, 2, widths=(4, 6, 8, 8, 8), **sidd)
    assert n_params(explicit) == nafnet_formula([4, 6, 8, 8, 8], spatial_dims, 1, 2, **sidd)


@pytest.mark.parametrize(
    ("cls", "kwargs", "widths"),
    [
        (LUNet, dict(features=4, levels=4, flat=False), (4, 8, 16, 32)),
        (OneNet, dict(variant="e", features=4, levels=3), (4, 8, 16, 32)),
        (NAFNet, dict(features=4, encoder_blocks=(1, 1, 1), middle_blocks=1, decoder_blocks=(1, 1, 1)), (4, 8, 16, 32)),
    ],
)
def test_explicit_doubling_widths_build_the_doubling_network(cls: type[nn.Module], kwargs: dict, widths: tuple) -> None:
    by_schedule = cls(3, 1, 2, **kwargs).state_dict()
    by_list = cls(3, 1, 2, **{**kwargs, "widths": widths}).state_dict()
    assert {k: v.shape for k, v in by_list.items()} == {k: v.shape for k, v in by_schedule.items()}


@pytest.mark.parametrize("backbone", ["unet", "nafnet", "onenet"])
@pytest.mark.parametrize("schedule", [{"flat": True}, {"widths": (4, 4, 6, 8, 8)}])
def test_every_block_family_takes_every_width_schedule_and_aggregated_skips(backbone: str, schedule: dict) -> None:
    extra = {"unet": {"levels": 5}, "nafnet": LIGHT, "onenet": {"variant": "ed"}}[backbone]
    net = UNetMinus(3, 1, 2, backbone=backbone, target="intermediate", features=4, **extra, **schedule).eval()
    expected = [4] * 5 if "flat" in schedule else list(schedule["widths"])
    assert [piece.reduce.in_channels for piece in net.skips.pieces] == [expected[level] for level in net.skips.skip_levels]
    with torch.no_grad():
        assert net(torch.randn(1, 1, 20, 24, 28)).shape == (1, 2, 20, 24, 28)


def test_nafnet_still_takes_its_former_width_keyword() -> None:
    """Run folders written before ``width`` became ``features`` record ``width``; they must still build."""
    old = NAFNet(3, 1, 2, width=4, **LIGHT)
    assert n_params(old) == n_params(NAFNet(3, 1, 2, features=4, **LIGHT))
    assert n_params(UNetMinus(3, 1, 2, backbone="nafnet", width=4, **LIGHT)) == n_params(
        UNetMinus(3, 1, 2, backbone="nafnet", features=4, **LIGHT))


@pytest.mark.parametrize("builder", [conv_unet_parts, onenet_parts, nafnet_parts])
def test_parts_builders_take_keywords_only(builder) -> None:
    with pytest.raises(TypeError):
        builder(3, 1, 2)
    parts = builder(spatial_dims=3, in_channels=1, out_channels=2, features=2, flat=True)
    assert set(parts.channels) == {2}


def test_width_schedules_and_their_errors() -> None:
    assert level_widths(features=8, levels=4) == [8, 16, 32, 64]
    assert level_widths(features=8, levels=4, flat=True) == [8, 8, 8, 8]
    assert level_widths(features=8, levels=None, widths=(16, 24, 32)) == [16, 24, 32]
    with pytest.raises(MedunetError, match="5 positive level widths"):
        NAFNet(3, 1, 2, widths=(8, 16, 32), **LIGHT)  # 4 downsamplings need 5 widths
    with pytest.raises(MedunetError, match="at least 2"):
        level_widths(features=8, levels=1)
    with pytest.raises(MedunetError, match="positive"):
        LUNet(3, 1, 2, widths=(8, 0, 8))


def test_skip_strategies_share_one_protocol() -> None:
    ordinary = OrdinarySkips([0, 1])
    aggregated = AggregatedSkips(3, [4, 4, 4], [0, 1], {0: 4, 1: 4})
    assert isinstance(ordinary, SkipStrategy) and isinstance(aggregated, SkipStrategy)
    parts = conv_unet_parts(spatial_dims=3, in_channels=1, out_channels=2, features=2, levels=3)
    with pytest.raises(MedunetError, match="SkipStrategy"):
        UNetSkeleton(3, parts, nn.Identity())


@pytest.mark.parametrize("size", [(19, 23), (16, 32), (19, 23, 21)])
def test_one_padding_for_medunet_networks_and_monai_baselines(size: tuple[int, ...]) -> None:
    x = torch.randn(1, 2, *size)
    padded = pad_to_multiple(x, 8, min_size=24)
    assert all(s % 8 == 0 and s >= 24 for s in padded.shape[2:])
    assert torch.equal(crop_spatial(padded, list(size)), x)
    wrapped = PadToDivisible(nn.Identity(), 8, min_size=24)
    assert torch.equal(wrapped(x), x)


@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_half_resolution_hands_the_network_each_blocks_voxels_as_channels_and_puts_them_back(spatial_dims: int) -> None:
    """HalfResolution around a network that passes its input through returns the input itself, and the network
    sees half the size with 2**dims times the channels."""
    seen = []
    inner = nn.Identity()
    inner.register_forward_hook(lambda module, args, out: seen.append(tuple(args[0].shape)))
    x = torch.randn(2, 3, *(6, 10, 4)[:spatial_dims])
    assert torch.equal(HalfResolution(inner, spatial_dims)(x), x)
    assert seen == [(2, 3 * 2**spatial_dims, *(3, 5, 2)[:spatial_dims])]


def test_segresnet_at_half_resolution_is_segresnet_with_wider_first_and_last_convolutions() -> None:
    """monai_segresnet_unshuffle (issue 10's test of what SegResNet's full-resolution first level buys) runs MONAI's
    SegResNet on the unshuffled input, and differs from monai_segresnet only by its first convolution's 8x input
    channels (bias-free) and a 3x3x3 sub-pixel head with 8x outputs in place of the 1x1 one."""
    from monai.networks.nets import SegResNet

    from medunet.networks import create_network

    half = create_network("monai_segresnet_unshuffle", spatial_dims=3, in_channels=1, out_channels=3).eval()
    full = create_network("monai_segresnet", spatial_dims=3, in_channels=1, out_channels=3)
    segresnet = half.network.network
    assert isinstance(segresnet, SegResNet)
    seen = []
    segresnet.register_forward_hook(lambda module, args, out: seen.append((tuple(args[0].shape), tuple(out.shape))))
    with torch.no_grad():
        assert half(torch.randn(1, 1, 48, 64, 47)).shape == (1, 3, 48, 64, 47)
    assert seen == [((1, 8, 24, 32, 24), (1, 24, 24, 32, 24))]  # 47 padded to 48, then halved
    first, head = 8 * 27 * (8 - 1), (8 * 24 * 27 + 24) - (8 * 3 + 3)
    assert n_params(half) - n_params(full) == first + head


# -- issue 10: the sub-pixel head (head_kernel) ------------------------------------------------------------------
@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_a_sub_pixel_head_lets_each_full_resolution_voxel_see_the_half_resolution_neighbourhood(spatial_dims: int) -> None:
    """With the unshuffle stem, a 1x1 head maps one half-resolution voxel to its own 2x2(x2) block only; a 3x3(x3)
    head (head_kernel=3) also reaches the neighbouring blocks. Probed on the head alone: one feature voxel changed."""
    size = (6,) * spatial_dims
    reach = {}
    for kernel in (1, 3):
        head = conv_unet_parts(spatial_dims=spatial_dims, in_channels=1, out_channels=2, widths=(4, 4), stem="unshuffle",
                               head_kernel=kernel).head.eval()
        features = torch.zeros(1, 4, *size)
        bumped = features.clone()
        bumped[(0, slice(None), *(s // 2 for s in size))] = 1.0
        with torch.no_grad():
            changed = (head(bumped) - head(features)).abs().sum(1)[0] > 0
        assert changed.shape == tuple(2 * s for s in size)
        reach[kernel] = [int(changed.any(dim=tuple(a for a in range(spatial_dims) if a != axis)).sum())
                         for axis in range(spatial_dims)]
    assert reach[1] == [2] * spatial_dims  # its own 2x2(x2) block
    assert reach[3] == [6] * spatial_dims  # and the blocks of its 3x3(x3) neighbours


def test_the_head_kernel_must_be_odd_and_the_sub_pixel_preset_keeps_the_output_size() -> None:
    from medunet.networks import create_network, get_preset

    with pytest.raises(MedunetError, match="head_kernel must be an odd kernel size"):
        LUNet(spatial_dims=3, in_channels=1, out_channels=2, features=2, levels=2, head_kernel=2)
    name = "lunet_small_16f_unshuffle_wide_subpixel"
    net = create_network(name, spatial_dims=3, in_channels=1, out_channels=3, **get_preset(name).test_overrides).eval()
    with torch.no_grad():
        assert net(torch.zeros(1, 1, 20, 24, 18)).shape == (1, 3, 20, 24, 18)


@pytest.mark.parametrize(("name", "divisor"), [("lunet_small_16f_unshuffle_wide_subpixel", 32),
                                               ("lunet_16f_4level_unshuffle_subpixel", 16),
                                               ("lunet_16f_4level_unshuffle_subpixel_in", 16)])
def test_the_size_divisor_decides_whether_a_hippocampus_patch_is_padded(name: str, divisor: int) -> None:
    from medunet.networks import create_network, get_preset

    net = create_network(name, spatial_dims=3, in_channels=1, out_channels=3, **get_preset(name).test_overrides).eval()
    assert net.size_divisor == divisor
    patch = (48, 64, 48)  # the Task04 preset's patch size
    assert all(size % net.size_divisor == 0 for size in patch) == (divisor == 16)
    with torch.no_grad():
        assert net(torch.zeros(1, 1, *patch)).shape == (1, 3, *patch)


# -- issue 10: residual conv blocks ------------------------------------------------------------------------------
@pytest.mark.parametrize(("in_channels", "out_channels"), [(4, 4), (3, 5)])
def test_a_residual_block_adds_its_input_through_a_projection_only_where_the_width_changes(in_channels: int,
                                                                                              out_channels: int) -> None:
    from monai.networks.blocks import ResidualUnit

    from medunet.networks.conv_unet import conv_block

    options = dict(convs=2, act="relu", norm=None, dropout=None, bias=True, order="AND")
    plain = conv_block(3, in_channels, out_channels, **options)
    block = conv_block(3, in_channels, out_channels, residual=True, **options)
    assert isinstance(block, ResidualUnit) and not isinstance(plain, ResidualUnit)
    assert n_params(block) - n_params(plain) == (0 if in_channels == out_channels else (in_channels + 1) * out_channels)
    x = torch.randn(2, in_channels, 6, 5, 4, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        for conv in block.conv.modules():
            if isinstance(conv, nn.Conv3d):
                conv.weight.zero_()
                conv.bias.zero_()
        # With the convolutions silenced, the block is its shortcut: the input itself, or its 1x1 projection.
        expected = x if in_channels == out_channels else block.residual(x)
        torch.testing.assert_close(block(x), expected)
        assert (block(x) - expected).abs().max() == 0 and expected.abs().max() > 0


def test_the_residual_preset_is_the_instance_norm_preset_plus_shortcuts() -> None:
    from medunet.networks import create_network

    kwargs = dict(spatial_dims=3, in_channels=1, out_channels=3)
    plain = create_network("lunet_16f_4level_unshuffle_subpixel_in", **kwargs)
    residual = create_network("lunet_16f_4level_unshuffle_subpixel_in_res", **kwargs)
    # 1x1 projections where the width changes: 8->16 (stem), 16->32, 32->48, and the decoders' concat -> width.
    projections = (8 + 1) * 16 + (16 + 1) * 32 + (32 + 1) * 48 + (64 + 1) * 32 + (64 + 1) * 32 + (32 + 1) * 16
    assert n_params(residual) - n_params(plain) == projections
    assert n_params(residual) <= 4_809_920 // 10  # at most a tenth of the MONAI UNet's parameters
    residual.eval()
    with torch.no_grad():
        assert residual(torch.zeros(1, 1, 48, 64, 48)).shape == (1, 3, 48, 64, 48)


# -- issue 10: deeper encoder levels where the volume is small ----------------------------------------------------
def conv_count(module: nn.Module) -> int:
    return sum(isinstance(m, nn.Conv3d) and m.kernel_size == (3, 3, 3) for m in module.modules())


@pytest.mark.parametrize("residual", [False, True])
def test_encoder_convs_sets_each_encoder_levels_depth_and_leaves_the_decoder(residual: bool) -> None:
    net = LUNet(spatial_dims=3, in_channels=1, out_channels=2, widths=(2, 3, 4), encoder_convs=(1, 3, 4),
                convs_per_block=2, residual=residual, stem="unshuffle")
    assert [conv_count(stage) for stage in net.encoder] == [1, 3, 4]
    assert [conv_count(stage.blocks) for stage in net.decoder] == [2, 2]
    if residual:  # more than two convolutions: residual units of two, stacked as SegResNet stacks its blocks
        from monai.networks.blocks import ResidualUnit

        assert [len([m for m in stage.modules() if isinstance(m, ResidualUnit)]) for stage in net.encoder] == [1, 2, 2]
    net.eval()
    with torch.no_grad():
        assert net(torch.randn(1, 1, 16, 16, 16)).shape == (1, 2, 16, 16, 16)


@pytest.mark.parametrize(("encoder_convs", "message"), [((2, 2), "lists 2 levels and widths 3"),
                                                         ((2, 0, 2), "at least one convolution per level")])
def test_encoder_convs_that_do_not_fit_the_widths_are_refused(encoder_convs: tuple, message: str) -> None:
    with pytest.raises(MedunetError, match=message):
        LUNet(spatial_dims=3, in_channels=1, out_channels=2, widths=(2, 3, 4), encoder_convs=encoder_convs)


def test_the_deep_preset_fits_the_parameter_budget_and_the_task04_patch() -> None:
    from medunet.networks import create_network

    net = create_network("lunet_16f_4level_unshuffle_subpixel_deep_in_res", spatial_dims=3, in_channels=1,
                         out_channels=3).eval()
    assert [conv_count(stage) for stage in net.encoder] == [2, 2, 3, 4]
    assert n_params(net) <= 4_809_920 // 10  # at most a tenth of the MONAI UNet's parameters
    with torch.no_grad():
        assert net(torch.zeros(1, 1, 48, 64, 48)).shape == (1, 3, 48, 64, 48)


# -- issue 10: the head that reads the image (head_image) ---------------------------------------------------------
IMAGE_PRESET = "lunet_16f_4level_unshuffle_subpixel_in_image"


def image_guided(seed: int = 0, weight_seed: int | None = 1) -> nn.Module:
    """The image-guided preset at test size, its image map given random weights (``weight_seed``) or left at zero."""
    from medunet.networks import create_network, get_preset

    torch.manual_seed(seed)
    net = create_network(IMAGE_PRESET, spatial_dims=3, in_channels=1, out_channels=3,
                         **get_preset(IMAGE_PRESET).test_overrides)
    if weight_seed is not None:
        with torch.no_grad():
            net.head.image.weight.copy_(torch.randn(net.head.image.weight.shape,
                                                    generator=torch.Generator().manual_seed(weight_seed)))
    return net


def test_the_image_guided_head_starts_as_the_plain_sub_pixel_head() -> None:
    """Its image map starts at zero and is built after everything else: the same seed gives the plain preset's
    network and output, plus 8 x 8 x 3 weights."""
    from medunet.networks import create_network, get_preset

    plain_name = "lunet_16f_4level_unshuffle_subpixel_in"
    torch.manual_seed(0)
    plain = create_network(plain_name, spatial_dims=3, in_channels=1, out_channels=3,
                           **get_preset(plain_name).test_overrides).eval()
    guided = image_guided(weight_seed=None).eval()
    assert n_params(guided) - n_params(plain) == 8 * 8 * 3
    x = torch.randn(1, 1, 32, 32, 32, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert torch.equal(guided(x), plain(x))


@pytest.mark.parametrize("grad", [False, True])
def test_the_image_guided_head_adds_each_blocks_own_intensities_to_its_logits(grad: bool) -> None:
    """Its share of the logits is a 1x1 map of each 2x2x2 block's 8 voxels: one voxel of the image changed moves
    the image share of its own block's logits only. Checked on the slab path (no autograd) and the plain one."""
    from medunet.networks.layers import pixel_shuffle, pixel_unshuffle

    head = image_guided().head.eval()
    features = torch.randn(1, head.head[0].in_channels, 8, 8, 8, generator=torch.Generator().manual_seed(3))
    image = torch.randn(1, 1, 16, 16, 16, generator=torch.Generator().manual_seed(4))
    bumped = image.clone()
    bumped[0, 0, 5, 6, 7] += 1.0
    with torch.set_grad_enabled(grad):
        base, moved, alone = head(features, image), head(features, bumped), head.head(features)
    expected = pixel_shuffle(head.image(pixel_unshuffle(image, 3, 2)), 3, 2)
    torch.testing.assert_close(base - alone, expected, atol=1e-5, rtol=1e-5)
    changed = (moved - base).abs().sum(1)[0] > 1e-6
    assert changed[4:6, 6:8, 6:8].all() and int(changed.sum()) == 8  # the voxel's own 2x2x2 block, all of it


def test_the_image_guided_network_is_the_same_by_slabs_scripted_and_trained() -> None:
    """Inference (the releasing forward, image share by slabs), the plain loop, TorchScript: the same logits. In
    training the loss reaches the image map."""
    net = image_guided().eval()
    x = torch.randn(1, 1, 48, 64, 48, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        released = net(x)
        scripted = torch.jit.script(net)(x)
    plain = net._forward_plain(x)
    torch.testing.assert_close(released, plain.detach(), atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(scripted, plain.detach(), atol=1e-4, rtol=1e-4)
    net.train()
    net(x[:, :, :32, :32, :32]).square().mean().backward()
    assert net.head.image.weight.grad is not None and net.head.image.weight.grad.abs().sum() > 0


def test_the_image_guided_network_exports_to_onnx(tmp_path) -> None:
    pytest.importorskip("onnxruntime")
    from medunet.bundle.onnx import export_onnx

    exported = export_onnx(image_guided(), tmp_path / "model.onnx", (1, 1, 32, 32, 32), conv3d_as_2d=True)
    assert exported.max_abs_difference < 1e-3


def test_the_image_guided_head_needs_the_unshuffle_stem() -> None:
    with pytest.raises(MedunetError, match="only the unshuffle stem has"):
        LUNet(spatial_dims=3, in_channels=1, out_channels=2, widths=(2, 3), head_image=True)


# -- issue 10: a thin full-resolution refinement after the sub-pixel head (head_refine) -----------------------------
REFINE_PRESET = "lunet_16f_4level_unshuffle_subpixel_in_refine"


def refined(weight_seed: int | None = 1) -> nn.Module:
    """The refining preset at test size, its last (zero-initialised) conv given random weights unless ``weight_seed`` is None."""
    from medunet.networks import create_network, get_preset

    torch.manual_seed(0)
    net = create_network(REFINE_PRESET, spatial_dims=3, in_channels=1, out_channels=3,
                         **get_preset(REFINE_PRESET).test_overrides)
    if weight_seed is not None:
        with torch.no_grad():
            net.head.out.weight.copy_(torch.randn(net.head.out.weight.shape,
                                                  generator=torch.Generator().manual_seed(weight_seed)))
    return net


def test_the_refined_head_starts_as_the_plain_sub_pixel_head() -> None:
    """The refinement's last conv starts at zero and the refinement is built after everything else: the same seed
    gives the plain preset's output, plus (3 + 1) x 27 x 8 + 8 + 8 x 3 + 3 weights."""
    from medunet.networks import create_network, get_preset

    plain_name = "lunet_16f_4level_unshuffle_subpixel_in"
    torch.manual_seed(0)
    plain = create_network(plain_name, spatial_dims=3, in_channels=1, out_channels=3,
                           **get_preset(plain_name).test_overrides).eval()
    net = refined(weight_seed=None).eval()
    assert n_params(net) - n_params(plain) == 4 * 27 * 8 + 8 + 8 * 3 + 3
    x = torch.randn(1, 1, 32, 32, 32, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert torch.equal(net(x), plain(x))


@pytest.mark.parametrize("depth", [16, 18, 40])
def test_the_refinement_by_slabs_is_the_whole_volume_refinement(depth: int) -> None:
    """At inference the refinement runs slab by slab in place; each slab reads its neighbours' original logits.
    Against the whole-volume formula, at depths that split into slabs of different sizes, with a fresh image voxel
    bumped at a slab boundary moving only the logits within one voxel of it."""
    head = refined().head.eval()
    features = torch.randn(1, head.head[0].in_channels, depth // 2, 8, 8, generator=torch.Generator().manual_seed(3))
    image = torch.randn(1, 1, depth, 16, 16, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        assert head._by_slabs_applies(head.head(features))
        slabs = head(features, image)
        whole = head._add_whole(head.head(features), image)
        bumped = image.clone()
        bumped[0, 0, 8, 5, 5] += 1.0
        moved = head(features, bumped)
    torch.testing.assert_close(slabs, whole, atol=1e-5, rtol=1e-5)
    changed = ((moved - slabs).abs().sum(1)[0] > 1e-6).nonzero()
    assert len(changed) and (changed - torch.tensor([8, 5, 5])).abs().max() <= 1


def test_the_refined_network_is_the_same_by_slabs_scripted_and_exported(tmp_path) -> None:
    """Inference (releasing forward, refinement by slabs), the plain loop, TorchScript and ONNX Runtime: the same
    logits. In training the loss reaches the refinement."""
    net = refined().eval()
    x = torch.randn(1, 1, 48, 64, 48, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        released = net(x)
        scripted = torch.jit.script(net)(x)
    plain = net._forward_plain(x).detach()
    torch.testing.assert_close(released, plain, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(scripted, plain, atol=1e-4, rtol=1e-4)
    net.train()
    net(x[:, :, :32, :32, :32]).square().mean().backward()
    assert net.head.refine.weight.grad is not None and net.head.refine.weight.grad.abs().sum() > 0
    pytest.importorskip("onnxruntime")
    from medunet.bundle.onnx import export_onnx

    exported = export_onnx(net.eval(), tmp_path / "model.onnx", (1, 1, 32, 32, 32), conv3d_as_2d=True)
    assert exported.max_abs_difference < 1e-3


@pytest.mark.parametrize(("options", "match"), [
    (dict(head_refine=4), "unshuffle stem"),
    (dict(stem="unshuffle", head_refine=4, head_image=True), "without head_image"),
    (dict(stem="unshuffle", head_refine=-1), "width of the full-resolution refinement"),
])
def test_the_refined_head_refuses_what_it_cannot_build(options: dict, match: str) -> None:
    with pytest.raises(MedunetError, match=match):
        LUNet(spatial_dims=3, in_channels=1, out_channels=2, widths=(2, 3), **options)
