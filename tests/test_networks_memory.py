"""Inference frees as it goes: the no-grad forward of a ``UNetSkeleton`` gives the plain composition's output with a
lower peak of live tensors (issue 14; benchmarks/timeline/README.md, "After the change")."""

from __future__ import annotations

import types

import pytest
import torch
from monai.networks.blocks import ResidualUnit
from torch import nn

from medunet.networks import UNetSkeleton, create_network, get_preset, layers
from medunet.networks.layers import (
    INFERENCE_SLABS,
    MaxPoolHalving,
    ShuffleConvTranspose3d,
    add_pixel_shuffled_,
    concat_releasing,
    pixel_shuffle,
    pixel_unshuffle,
    slab_bounds,
)
from medunet.networks.skips import AggregatedSkips, IEMExpand, MSIAMPiece
from medunet.profiling.timeline import record_timeline

#: Ordinary skips (concat; add for NAFNet) and UNet-- with E' at each target, on conv, NAFNet and OneNet backbones.
PRESETS = [
    "lunet_small_16f_unshuffle",
    "lunet_16f_4level_unshuffle_subpixel_in_res",
    "nafnet_w8_light",
    "onenet_ed4_8f",
    "unetmm_lunet_small_16f_unshuffle_coarsest",
    "unetmm_lunet_small_16f_unshuffle_intermediate",
    "unetmm_lunet_small_16f_unshuffle_finest",
    "unetmm_nafnet_w8_light_finest",
    "unetmm_unet_small_8f_intermediate",
]


def plain_forward(net: UNetSkeleton, x: torch.Tensor) -> torch.Tensor:
    """The reference composition: the skeleton's plain loop (each stage called as a whole, skips by ``expand``),
    and UNet--'s MSIAM as in training (each piece whole)."""
    skips = net.skips
    if isinstance(skips, AggregatedSkips):
        skips.forward = skips._forward_plain
    try:
        return net._forward_plain(x)
    finally:
        skips.__dict__.pop("forward", None)


def sums_in_another_order(net: nn.Module) -> bool:
    """UNet--: at inference MSIAM folds its linear steps into fewer convs and adds them slab by slab, and IEM folds
    the unshuffle into its projection: the same maps, summed in another order."""
    return isinstance(getattr(net, "skips", None), AggregatedSkips)


def build(name: str, spatial_dims: int) -> nn.Module:
    torch.manual_seed(0)
    net = create_network(name, spatial_dims=spatial_dims, in_channels=1, out_channels=3,
                         **get_preset(name).test_overrides)
    for module in net.modules():  # non-trivial running statistics, so eval-mode batch norm is not an identity
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            module.running_mean.uniform_(-0.2, 0.2)
            module.running_var.uniform_(0.5, 1.5)
    return net.eval()


@pytest.mark.parametrize("name", PRESETS)
@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_inference_forward_gives_the_plain_compositions_output(name: str, spatial_dims: int) -> None:
    net = build(name, spatial_dims)
    if not isinstance(net, UNetSkeleton):
        pytest.skip(f"{name} is not a UNetSkeleton")
    x = torch.randn(1, 1, *(32, 24, 40)[:spatial_dims])
    with torch.no_grad():
        reference = plain_forward(net, x)
        out = net(x)
    assert out.shape == reference.shape
    if sums_in_another_order(net):
        # Float rounding only (about 1e-7 here): the folded convs sum the same products in another order.
        assert (out - reference).abs().max() <= 1e-5 * max(1.0, reference.abs().max().item())
    else:
        assert torch.equal(out, reference)  # bit for bit


@pytest.mark.parametrize("name", ["lunet_small_16f_unshuffle", "unetmm_lunet_small_16f_unshuffle_finest"])
def test_with_autograd_the_forward_is_the_plain_one_and_trains(name: str) -> None:
    net = build(name, 3)
    x = torch.randn(2, 1, 32, 32, 32)  # two samples: train-mode batch norm at the 1-voxel coarsest level
    out = net(x)
    assert out.requires_grad and torch.equal(out, plain_forward(net, x))
    net.train()
    net(x).square().mean().backward()
    assert all(p.grad is not None for p in net.parameters())


def test_scripted_network_takes_the_plain_loop_and_agrees() -> None:
    net = build("unetmm_lunet_small_16f_unshuffle_intermediate", 3)
    scripted = torch.jit.script(net)
    x = torch.randn(1, 1, 32, 32, 32)
    with torch.no_grad():
        assert torch.allclose(scripted(x), net(x), atol=1e-6)


def test_leaf_hooks_still_fire_at_inference() -> None:
    net = build("unetmm_lunet_small_16f_unshuffle_coarsest", 3)
    seen: list[str] = []
    leaves = [(n, m) for n, m in net.named_modules() if next(m.children(), None) is None and n.startswith("decoder.3")]
    handles = [m.register_forward_hook(lambda m, a, o, n=n: seen.append(n)) for n, m in leaves]
    with torch.no_grad():
        net(torch.randn(1, 1, 32, 32, 32))
    for handle in handles:
        handle.remove()
    assert sorted(seen) == sorted(n for n, _ in leaves)


@pytest.mark.parametrize("spatial_dims", [2, 3])
@pytest.mark.parametrize("factor", [2, 4])
def test_adding_through_a_shuffled_view_is_adding_the_shuffled_copy(spatial_dims: int, factor: int) -> None:
    x = torch.randn(2, 3, *(8, 16, 4)[:spatial_dims])
    y = torch.randn(2, 3 * factor**spatial_dims, *[s // factor for s in x.shape[2:]])
    assert torch.equal(add_pixel_shuffled_(x.clone(), y, spatial_dims, factor), x + pixel_shuffle(y, spatial_dims, factor))


@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_folded_unshuffle_projection_keeps_the_1x1_weights(spatial_dims: int) -> None:
    net = build("unetmm_lunet_small_16f_unshuffle_finest", spatial_dims)
    expander = next(e for e in net.skips.expanders if e.steps < 0)
    factor, channels = expander.resize.factor, net.skips.agg_channels
    # Checkpoints load as before: the projection is still the 1x1 conv over the unshuffled channels.
    assert expander.project.weight.shape[1:] == (channels * factor**spatial_dims, *[1] * spatial_dims)
    again = build("unetmm_lunet_small_16f_unshuffle_finest", spatial_dims)
    again.load_state_dict(net.state_dict(), strict=True)
    aggregate = torch.randn(1, channels, *[4 * factor] * spatial_dims)
    with torch.no_grad():
        folded = expander.project_coarser(aggregate)
        reference = expander.project(pixel_unshuffle(aggregate, spatial_dims, factor))
    assert torch.allclose(folded, reference, atol=1e-6)


def test_adding_into_a_slab_view_writes_the_larger_tensor() -> None:
    x = torch.randn(1, 3, 8, 8, 8)
    y = torch.randn(1, 3 * 8, 2, 4, 4)
    expected = x.clone()
    expected[:, :, 2:6] += pixel_shuffle(y, 3, 2)
    add_pixel_shuffled_(x[:, :, 2:6], y, 3, 2)  # a non-contiguous view of x
    assert torch.equal(x, expected)


@pytest.mark.parametrize("size, multiple", [(16, 1), (7, 1), (64, 4), (12, 4), (3, 1)])
def test_slab_bounds_cover_the_axis_in_aligned_slabs(size: int, multiple: int) -> None:
    bounds = slab_bounds(size, multiple)
    assert bounds[0][0] == 0 and bounds[-1][1] == size
    assert all(stop == start for (_, stop), (start, _) in zip(bounds, bounds[1:]))
    assert all(start % multiple == 0 for start, _ in bounds)
    assert len(bounds) <= INFERENCE_SLABS and (size < INFERENCE_SLABS * multiple or len(bounds) > 1)


@pytest.mark.parametrize("spatial_dims", [2, 3])
@pytest.mark.parametrize("steps", [-2, -1, 0, 1])
@pytest.mark.parametrize("first", [True, False])
def test_msiam_piece_added_in_place_is_the_piece_added(spatial_dims: int, steps: int, first: bool) -> None:
    torch.manual_seed(steps + 3)
    piece = MSIAMPiece(spatial_dims, in_channels=4, piece_channels=3, steps=steps, out_channels=5)
    size = [8, 16, 12][:spatial_dims]  # the feature's size; E' is 2**-steps times it
    feature = torch.randn(2, 4, *size)
    bias = torch.randn(5)
    with torch.no_grad():
        contribution = piece(feature)
        aggregate = None if first else torch.randn_like(contribution)
        expected = contribution + bias.view(1, -1, *[1] * spatial_dims) if first else aggregate + contribution
        out = piece.add_into(None if first else aggregate.clone(), feature, bias)
    assert out.shape == expected.shape
    assert torch.allclose(out, expected, atol=1e-5)
    assert not torch.equal(out, torch.zeros_like(out))


@pytest.mark.parametrize("spatial_dims", [2, 3])
@pytest.mark.parametrize("steps", [-1, -2, 0])
@pytest.mark.parametrize("mode", ["enhanced", "plain"])
def test_iem_added_slab_by_slab_is_the_regenerated_skip_added(spatial_dims: int, steps: int, mode: str) -> None:
    torch.manual_seed(1)
    expander = IEMExpand(spatial_dims, agg_channels=4, out_channels=3, steps=steps, mode=mode)
    if expander.enhanced:  # a gate far from 0.5 and a refinement that matters, so both are checked
        nn.init.normal_(expander.refine.weight, std=0.5)
        nn.init.normal_(expander.gate.weight, std=2.0)
    aggregate = torch.randn(1, 4, *[36, 20, 12][:spatial_dims])  # 36 planes: slabs of 3 (or 4 = the factor) planes
    x = torch.randn(1, 3, *[s // 2 ** -steps for s in aggregate.shape[2:]])
    with torch.no_grad():
        expected = x + expander(aggregate)
        kept = aggregate.clone()
        out = expander.add_into(x.clone(), [aggregate], last=True)
    assert torch.allclose(out, expected, atol=1e-5)
    assert torch.equal(aggregate, kept)  # E' is read, not enhanced in place


@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_halving_max_pool_is_max_pool_without_indices(spatial_dims: int) -> None:
    pool = MaxPoolHalving(spatial_dims)
    reference = torch.nn.functional.max_pool2d if spatial_dims == 2 else torch.nn.functional.max_pool3d
    even, odd = torch.randn(2, 3, *(8, 6, 4)[:spatial_dims]), torch.randn(2, 3, *(7, 6, 5)[:spatial_dims])
    with torch.no_grad():
        assert torch.equal(pool(even), reference(even, 2))
        assert torch.equal(pool(odd), reference(odd, 2))  # odd sizes: the usual kernel (floor)
    assert torch.equal(pool(even.requires_grad_()), reference(even, 2))  # autograd: the usual kernel
    live = record_timeline(nn.Sequential(pool), (1, 16, 32, 32, 32)[: spatial_dims + 2], name="pool").peak_bytes
    assert live == 16 * 16**spatial_dims * 4  # the output only: no int64 indices twice its size


def peak_bytes(name: str, shape: tuple[int, ...], plain: bool) -> int:
    torch.manual_seed(0)
    net = create_network(name, spatial_dims=3, in_channels=shape[1], out_channels=2)
    if plain:
        net.forward = types.MethodType(plain_forward, net)
    return record_timeline(net, shape, name=name).peak_bytes


def test_unet_minus_peak_at_inference_is_at_most_0_6_of_its_backbones_original_peak() -> None:
    shape = (1, 1, 64, 64, 64)  # the real widths; a second or two on the CPU
    backbone_before = peak_bytes("lunet_small_16f_unshuffle", shape, plain=True)
    backbone_after = peak_bytes("lunet_small_16f_unshuffle", shape, plain=False)
    for name in ("unetmm_lunet_small_16f_unshuffle_coarsest", "unetmm_lunet_small_16f_unshuffle_intermediate",
                 "unetmm_lunet_small_16f_unshuffle_finest"):
        before, after = peak_bytes(name, shape, plain=True), peak_bytes(name, shape, plain=False)
        assert after < before, name
        assert after <= 0.6 * backbone_before, (name, after, backbone_before)
        assert after < backbone_after, (name, after, backbone_after)
    # The backbone's own concatenating merge no longer holds both parts beside the whole (concat_releasing).
    assert backbone_after <= 0.65 * backbone_before


def test_residual_blocks_cost_at_most_one_level0_tensor_at_the_inference_peak() -> None:
    """MONAI's ResidualUnit holds its input until the sum and makes the sum a new tensor; run child by child, with
    the shortcut first and added in place, it holds one tensor more than a plain block: the shortcut, beside the
    first conv's input (the 32-channel concatenation at the last decoder level) and output."""
    shape = (1, 1, 64, 64, 64)
    level0 = 16 * 32**3 * 4  # one 16-channel tensor at half resolution
    plain_blocks = peak_bytes("lunet_16f_4level_unshuffle_subpixel_in", shape, plain=False)
    residual_called_whole = peak_bytes("lunet_16f_4level_unshuffle_subpixel_in_res", shape, plain=True)
    residual = peak_bytes("lunet_16f_4level_unshuffle_subpixel_in_res", shape, plain=False)
    assert plain_blocks < residual <= plain_blocks + level0 < residual_called_whole


@pytest.mark.parametrize("up", [
    ShuffleConvTranspose3d(6, 4, 2, stride=2),  # written into the concatenation slab by slab
    nn.ConvTranspose3d(6, 4, 2, stride=2),  # any other up: computed, then copied in
    nn.ConvTranspose2d(6, 4, 2, stride=2),
])
def test_concatenating_merge_is_torch_cat_and_takes_its_inputs(up: nn.Module) -> None:
    torch.manual_seed(0)
    dims = 2 if isinstance(up, nn.ConvTranspose2d) else 3
    coarse, skip = torch.randn(1, 6, *(5, 3, 4)[:dims]), torch.randn(1, 5, *(10, 6, 8)[:dims])
    inputs, skips = [coarse.clone()], [skip.clone()]
    with torch.no_grad():
        out = concat_releasing(up, inputs, skips)
        assert torch.equal(out, torch.cat([up(coarse), skip], dim=1))
    assert inputs == [] and skips == []  # handed over: nothing here keeps them alive


def test_concatenating_merge_names_a_size_mismatch() -> None:
    with pytest.raises(ValueError, match="does not match the skip"), torch.no_grad():
        concat_releasing(nn.ConvTranspose3d(6, 4, 2, stride=2), [torch.randn(1, 6, 4, 4, 4)], [torch.randn(1, 5, 9, 8, 8)])


@pytest.mark.parametrize("name", ["lunet_16f_4level_unshuffle_subpixel_in", "lunet_16f_4level_unshuffle_subpixel_in_res",
                                  "lunet_16f_4level_unshuffle_subpixel_deep_in_res", "lunet_small_8f",
                                  "unetmm_unet_small_8f_intermediate"])
def test_large_volumes_split_the_first_convolution_over_the_concatenation(monkeypatch, name: str) -> None:
    """What a 128³ volume takes (convolutions by slabs, the skip's share of the decoder's first convolution before the
    up-convolution runs, the sub-pixel head written slab by slab), forced here on a small one."""
    monkeypatch.setattr(layers, "SLAB_CONV_MIN_BYTES", 0)
    net = build(name, 3)
    shares: list[int] = []
    real_share = layers.OneDNNConv3d.share
    monkeypatch.setattr(layers.OneDNNConv3d, "share", lambda self, *a: shares.append(1) or real_share(self, *a))
    x = torch.randn(1, 1, 32, 24, 40)
    with torch.no_grad():
        reference = plain_forward(net, x)
        out = net(x)
    concat_levels = sum(stage.merge == "concat" for stage in net.decoder)
    residual = isinstance(net.decoder[0].blocks, ResidualUnit)
    assert len(shares) == 2 * concat_levels * (2 if residual else 1)  # skip's and upsampled feature's, per conv
    assert (out - reference).abs().max() <= 1e-5 * max(1.0, reference.abs().max().item())  # summed in another order


def test_the_sub_pixel_head_by_slabs_is_the_shuffled_convolution(monkeypatch) -> None:
    monkeypatch.setattr(layers, "SLAB_CONV_MIN_BYTES", 0)
    head = build("lunet_16f_4level_unshuffle_subpixel_in", 3).head
    assert isinstance(head, layers.SubPixelHead) and head._by_slabs_applies(torch.randn(1, 2, 4, 4, 4)) is False  # grad on
    x = torch.randn(1, head[0].in_channels, 13, 6, 5)
    with torch.no_grad():
        assert head._by_slabs_applies(x)
        assert torch.equal(head(x), head[1](head[0](x)))


def test_the_split_convolution_is_for_float32_on_the_cpu_only(monkeypatch) -> None:
    monkeypatch.setattr(layers, "SLAB_CONV_MIN_BYTES", 0)
    net = build("lunet_16f_4level_unshuffle_subpixel_in_res", 3).to(torch.bfloat16)
    shares: list[int] = []
    monkeypatch.setattr(layers.OneDNNConv3d, "share", lambda *a: shares.append(1))
    x = torch.randn(1, 1, 32, 32, 32, dtype=torch.bfloat16)
    with torch.no_grad():
        out = net(x)
    assert shares == [] and out.dtype == torch.bfloat16 and out.shape == (1, 3, 32, 32, 32)
