"""The networks against the facts of their papers: parameter counts, widths, skip memory."""

from __future__ import annotations

import gc
import weakref

import pytest
import torch
from torch import nn

from medunet.networks import LUNet, NAFNet, OneNet, UNetMinus, create_network, list_networks
from medunet.networks.layers import FlatSpatialFilter, pixel_shuffle, pixel_unshuffle
from medunet.profiling import count_macs, measure_skip_bytes


def n_params(net: nn.Module) -> int:
    return sum(p.numel() for p in net.parameters())


# ../shared/ARCHITECTURES.md: the 2D configuration of OneNet's Table 2 (in 3, out 4, base 64, stem
# repeat 3), with and without the per-level heads the authors build but never use.
@pytest.mark.parametrize(
    ("variant", "levels", "auxiliary_heads", "expected"),
    [
        ("e", 4, False, 16_355_948),
        ("e", 4, True, 16_388_216),
        ("ed", 4, False, 9_073_876),
        ("ed", 4, True, 9_081_056),
        ("e", 5, True, 65_727_622),
        ("ed", 5, True, 36_382_968),
    ],
)
def test_onenet_matches_the_paper_parameter_counts(variant: str, levels: int, auxiliary_heads: bool, expected: int) -> None:
    net = OneNet(2, 3, 4, variant=variant, features=64, levels=levels, stem_repeat=3, auxiliary_heads=auxiliary_heads)
    assert n_params(net) == expected


def test_onenet_encoder_has_no_spatial_convolution() -> None:
    net = OneNet(3, 1, 2, variant="ed", features=4)
    kernels = {m.kernel_size for m in net.encoder.modules() if isinstance(m, nn.Conv3d)}
    assert kernels == {(1, 1, 1)}


def test_channelwise_1d_convolution_is_a_pointwise_convolution() -> None:
    """The authors' Conv1d(1, C_out, kernel=C_in, stride=C_in) over channels-last data == a 1x1 conv."""
    torch.manual_seed(0)
    c_in, c_out = 8, 5
    x = torch.randn(2, c_in, 4, 6)
    conv1d = nn.Conv1d(1, c_out, kernel_size=c_in, stride=c_in)
    flat = x.permute(0, 2, 3, 1).reshape(2, 1, -1)
    authors = conv1d(flat).reshape(2, c_out, 4, 6)
    pointwise = nn.Conv2d(c_in, c_out, 1)
    pointwise.weight.data = conv1d.weight.data.reshape(c_out, c_in, 1, 1)
    pointwise.bias.data = conv1d.bias.data
    assert torch.allclose(pointwise(x), authors, atol=1e-6)


def test_spatial_filter_runs_over_the_channels_last_flattened_sequence() -> None:
    torch.manual_seed(0)
    spatial = FlatSpatialFilter(9).double()
    x = torch.randn(2, 8, 3, 4, dtype=torch.float64, requires_grad=True)
    flat = x.permute(0, 2, 3, 1).reshape(2, 1, -1)
    expected = torch.relu(spatial.conv(flat)).reshape(2, 3, 4, 8).permute(0, 3, 1, 2)
    out = spatial(x)
    assert torch.allclose(out, expected)
    assert n_params(spatial) == 10
    assert count_macs(spatial, x) == x.numel() * 9  # counted as the 9-tap convolution it is
    # Same gradients as the Conv1d it stands for (the shifted-sum form exists for speed only).
    upstream = torch.randn_like(out)
    inputs = (x, spatial.conv.weight, spatial.conv.bias)
    for ours, reference in zip(torch.autograd.grad(out, inputs, upstream), torch.autograd.grad(expected, inputs, upstream)):
        assert torch.allclose(ours, reference)


@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_pixel_shuffle_inverts_pixel_unshuffle(spatial_dims: int) -> None:
    x = torch.randn(2, 3, *([8] * spatial_dims))
    down = pixel_unshuffle(x, spatial_dims, 2)
    assert down.shape == (2, 3 * 2**spatial_dims, *([4] * spatial_dims))
    assert torch.equal(pixel_shuffle(down, spatial_dims, 2), x)


# Every small Lean UNet that has a doubling twin (lunet_small_16f_unshuffle_wide, widths 16..32, has none).
@pytest.mark.parametrize(
    "name", [n for n in list_networks("lunet_small_*") if n.replace("lunet_", "unet_", 1) in list_networks()]
)
def test_lean_unet_small_has_30x_fewer_parameters_than_its_doubling_twin(name: str) -> None:
    lean = create_network(name)
    doubling = create_network(name.replace("lunet_", "unet_"))
    assert n_params(doubling) >= 30 * n_params(lean)


def test_lean_unet_keeps_width_constant() -> None:
    net = LUNet(3, 1, 2, features=6, levels=4, convs_per_block=3)
    widths = {m.out_channels for m in net.encoder.modules() if isinstance(m, nn.Conv3d)}
    assert widths == {6}


def test_nafnet_block_has_the_published_parameter_count() -> None:
    from medunet.networks.nafnet import NAFBlock

    for c in (8, 32):
        assert n_params(NAFBlock(2, c)) == 7 * c * c + 33 * c


def test_unet_minus_cuts_nafnet_skip_memory_by_at_least_93_percent() -> None:
    """The paper's 93.3%: NAFNet width 32, 4 levels, E' at the coarsest skip level."""
    x = torch.randn(1, 3, 128, 128)
    nafnet = create_network("nafnet_w32_sidd", spatial_dims=2, in_channels=3, out_channels=3).eval()
    minus = create_network("unetmm_nafnet_w32_sidd_coarsest", spatial_dims=2, in_channels=3, out_channels=3).eval()
    ordinary, aggregated = measure_skip_bytes(nafnet, x), measure_skip_bytes(minus, x)
    assert ordinary == 4 * 32 * 128 * 128 * (1 + 1 / 2 + 1 / 4 + 1 / 8)  # 60 HW float32 values
    assert 1 - aggregated / ordinary >= 0.93


@pytest.mark.parametrize("target", ["coarsest", "intermediate", "finest"])
def test_unet_minus_frees_full_resolution_features_during_inference(target: str) -> None:
    """Eager aggregation: once level 1 is computed nothing refers to the level-0 map any more."""
    def level0_alive_at_level2(net: nn.Module) -> bool:
        refs: list[weakref.ref] = []
        alive: list[bool] = []

        def check(module: nn.Module, args: tuple, out: torch.Tensor) -> None:
            gc.collect()
            alive.append(refs[0]() is not None)

        hooks = [
            net.encoder[0].register_forward_hook(lambda m, i, out: refs.append(weakref.ref(out))),
            net.encoder[2].register_forward_hook(check),
        ]
        with torch.no_grad():
            net(torch.randn(1, 1, 32, 32, 32))
        for hook in hooks:
            hook.remove()
        return alive[0]

    kwargs = dict(spatial_dims=3, in_channels=1, out_channels=2, features=4, levels=4)
    assert level0_alive_at_level2(LUNet(flat=False, **kwargs).eval())
    assert not level0_alive_at_level2(UNetMinus(backbone="unet", target=target, **kwargs).eval())


@pytest.mark.parametrize("backbone", ["unet", "lunet", "nafnet", "onenet"])
@pytest.mark.parametrize("iem", ["enhanced", "plain"])
def test_unet_minus_runs_on_every_backbone(backbone: str, iem: str) -> None:
    sizes = {"nafnet": {"width": 4}, "onenet": {"features": 2}}.get(backbone, {"features": 4})
    net = UNetMinus(3, 1, 2, backbone=backbone, iem=iem, **sizes).eval()
    with torch.no_grad():
        assert net(torch.randn(1, 1, 20, 24, 28)).shape == (1, 2, 20, 24, 28)


def test_nafnet_adds_its_skips() -> None:
    """Each decoder stage's blocks receive the upsampled feature plus the encoder feature of that level
    (same width: added, not concatenated)."""
    torch.manual_seed(0)
    net = NAFNet(2, 1, 2, width=4, encoder_blocks=(1, 1), middle_blocks=1, decoder_blocks=(1, 1)).eval()
    encoded, upsampled, merged = [], [], []
    for stage in net.encoder:
        stage.register_forward_hook(lambda _m, _i, out: encoded.append(out.detach().clone()))
    for stage in net.decoder:
        stage.up.register_forward_hook(lambda _m, _i, out: upsampled.append(out.detach().clone()))
        stage.blocks.register_forward_pre_hook(lambda _m, args: merged.append(args[0].detach().clone()))
    with torch.no_grad():
        net(torch.randn(1, 1, 16, 16))
    assert len(merged) == len(net.decoder) >= 2
    for up, into_blocks in zip(upsampled, merged, strict=True):
        (skip,) = [feature for feature in encoded if feature.shape == up.shape]
        assert into_blocks.shape == up.shape  # not concatenated
        torch.testing.assert_close(into_blocks, up + skip)


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        # ../shared/ARCHITECTURES.md, counted with MONAI 1.6.1 (in 1, out 2)
        ("monai_unet_spleen", 4_808_917),
        ("monai_basicunet", 5_749_410),
        ("monai_segresnet", 1_176_186),
        ("monai_dynunet_nnunet", 31_181_730),
    ],
)
def test_baselines_are_the_configurations_people_use(name: str, expected: int) -> None:
    assert n_params(create_network(name, spatial_dims=3, in_channels=1, out_channels=2)) == expected


@pytest.mark.parametrize("net", [
    LUNet(3, 1, 3, features=4, stem="unshuffle"),
    UNetMinus(3, 1, 3, backbone="lunet", features=4, stem="unshuffle"),
])
def test_unshuffle_stem_keeps_kxk_convolutions_off_the_full_resolution_volume(net: nn.Module) -> None:
    size = (32, 40, 24)
    full_res_kxk: list[str] = []

    def check(module: nn.Module, args: tuple) -> None:
        if module.kernel_size != (1, 1, 1) and tuple(args[0].shape[2:]) == size:
            full_res_kxk.append(str(module))

    hooks = [m.register_forward_pre_hook(check) for m in net.modules() if isinstance(m, (nn.Conv3d, nn.ConvTranspose3d))]
    with torch.no_grad():
        out = net.eval()(torch.randn(1, 1, *size))
    for hook in hooks:
        hook.remove()
    assert out.shape == (1, 3, *size)
    assert not full_res_kxk
