"""Inference frees as it goes: the no-grad forward of a ``UNetSkeleton`` gives the plain composition's output with a
lower peak of live tensors (issue 14; benchmarks/timeline/README.md, "After the change")."""

from __future__ import annotations

import types

import pytest
import torch
from torch import nn

from medunet.networks import UNetSkeleton, create_network, get_preset
from medunet.networks.layers import add_pixel_shuffled_, pixel_shuffle, pixel_unshuffle
from medunet.networks.skips import AggregatedSkips
from medunet.profiling.timeline import record_timeline

#: Ordinary skips (concat; add for NAFNet) and UNet-- with E' at each target, on conv, NAFNet and OneNet backbones.
PRESETS = [
    "lunet_small_16f_unshuffle",
    "nafnet_w8_light",
    "onenet_ed4_8f",
    "unetmm_lunet_small_16f_unshuffle_coarsest",
    "unetmm_lunet_small_16f_unshuffle_intermediate",
    "unetmm_lunet_small_16f_unshuffle_finest",
    "unetmm_nafnet_w8_light_finest",
    "unetmm_unet_small_8f_intermediate",
]


def plain_forward(net: UNetSkeleton, x: torch.Tensor) -> torch.Tensor:
    """The reference composition: the skeleton's plain loop (each stage called as a whole, skips by ``expand``)."""
    return net._forward_plain(x)


def has_level_coarser_than_aggregate(net: nn.Module) -> bool:
    """IEM folds the unshuffle into its projection there: the same map, summed in another order."""
    skips = getattr(net, "skips", None)
    return isinstance(skips, AggregatedSkips) and any(expander.steps < 0 for expander in skips.expanders)


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
    if has_level_coarser_than_aggregate(net):
        # Float rounding only (about 1e-7 here): the strided conv sums the same products in another order.
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
    for name in ("unetmm_lunet_small_16f_unshuffle_coarsest", "unetmm_lunet_small_16f_unshuffle_intermediate"):
        before, after = peak_bytes(name, shape, plain=True), peak_bytes(name, shape, plain=False)
        assert after < before, name
        assert after <= 0.6 * backbone_before, (name, after, backbone_before)
        assert after < backbone_after, name
    assert backbone_after < backbone_before
