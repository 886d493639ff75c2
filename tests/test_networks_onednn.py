"""Registry-built 3D networks run their convolutions with oneDNN on the CPU, where ATen would fall back to its
slow im2col kernel for a single small input (``medunet.networks.layers.OneDNNConv3d``)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from medunet.networks import create_network, get_preset, layers
from medunet.networks.layers import OneDNNConv3d, ShuffleConvTranspose3d, use_onednn_convs
from medunet.profiling.profiler import count_macs
from medunet.profiling.timeline import record_timeline


def conv(**options) -> nn.Conv3d:
    torch.manual_seed(0)
    return nn.Conv3d(16, 8, 3, **options)


@pytest.mark.parametrize("options", [{"padding": 1}, {"stride": 2}, {"padding": 2, "dilation": 2}, {"groups": 4}])
def test_onednn_conv_computes_the_same_convolution_and_gradients(options: dict) -> None:
    reference = conv(**options)
    fast = use_onednn_convs(nn.Sequential(conv(**options)))[0]
    assert type(fast) is OneDNNConv3d
    x = torch.randn(1, 16, 20, 12, 16, requires_grad=True)  # 1 x 16 x 20 x 12 = 3840 <= 20480: ATen's native kernel
    expected, out = reference(x), fast(x)
    assert torch.allclose(out, expected, atol=1e-5)
    grad = torch.randn_like(out)
    for a, b in zip(torch.autograd.grad(expected, (x, reference.weight, reference.bias), grad),
                    torch.autograd.grad(out, (x, fast.weight, fast.bias), grad)):
        assert torch.allclose(a, b, atol=1e-4)


def test_other_padding_modes_keep_the_ordinary_convolution() -> None:
    reference = conv(padding=1, padding_mode="reflect")
    fast = use_onednn_convs(nn.Sequential(conv(padding=1, padding_mode="reflect")))[0]
    x = torch.randn(1, 16, 8, 8, 8)
    assert torch.equal(fast(x), reference(x))


@pytest.mark.parametrize("name", ["lunet_small_16f_unshuffle", "monai_unet_spleen", "unetmm_lunet_small_16f_unshuffle_finest"])
def test_registry_networks_use_it_and_keep_their_outputs_and_checkpoints(name: str) -> None:
    torch.manual_seed(0)
    net = create_network(name, spatial_dims=3, in_channels=1, out_channels=3, **get_preset(name).test_overrides).eval()
    convs = [m for m in net.modules() if isinstance(m, nn.Conv3d) and not isinstance(m, nn.ConvTranspose3d)]
    assert convs and all(type(m) is OneDNNConv3d for m in convs)  # the MONAI baselines too: the comparison stays fair
    plain = get_preset(name).factory(**{**get_preset(name).defaults, "spatial_dims": 3, "in_channels": 1,
                                        "out_channels": 3, **get_preset(name).test_overrides}).eval()
    plain.load_state_dict(net.state_dict(), strict=True)  # the same keys: checkpoints load either way
    assert not any(type(m) is OneDNNConv3d for m in plain.modules())
    x = torch.randn(1, 1, 32, 32, 32)
    with torch.no_grad():
        assert torch.allclose(net(x), plain(x), atol=1e-5)
        assert torch.allclose(torch.jit.script(net)(x), plain(x), atol=1e-5)  # TorchScript: aten::convolution


def test_flop_counter_and_timeline_still_see_the_convolutions() -> None:
    net = use_onednn_convs(nn.Sequential(conv(padding=1)))
    x = torch.randn(1, 16, 8, 8, 8)
    assert count_macs(net, x) == 8 * 16 * 27 * 8 * 8 * 8
    assert record_timeline(net, tuple(x.shape), name="conv").peak_bytes == 8 * 8 * 8 * 8 * 4


def test_onnx_export_gets_the_ordinary_convolution(tmp_path) -> None:
    onnx = pytest.importorskip("onnx")
    net = use_onednn_convs(nn.Sequential(conv(padding=1))).eval()
    torch.onnx.export(net, (torch.randn(1, 16, 8, 8, 8),), str(tmp_path / "m.onnx"), dynamo=False)
    assert [node.op_type for node in onnx.load(str(tmp_path / "m.onnx")).graph.node] == ["Conv"]


def test_up_convolution_by_slabs_is_the_transposed_convolution() -> None:
    torch.manual_seed(0)
    reference = nn.ConvTranspose3d(12, 5, 2, stride=2)
    fast = use_onednn_convs(nn.Sequential(nn.ConvTranspose3d(12, 5, 2, stride=2)))
    fast.load_state_dict(nn.Sequential(reference).state_dict(), strict=True)
    assert type(fast[0]) is ShuffleConvTranspose3d
    x = torch.randn(2, 12, 19, 6, 10)  # 19 planes: slabs of 2 and a last one of 1
    with torch.no_grad():
        assert torch.allclose(fast(x), reference(x), atol=1e-6)
    assert torch.allclose(fast(x), reference(x), atol=1e-6)  # autograd: the ordinary kernel
    other = use_onednn_convs(nn.Sequential(nn.ConvTranspose3d(12, 5, 3, stride=2)))
    assert type(other[0]) is nn.ConvTranspose3d  # only the 2x2x2, stride-2 up-convolution is rewritten


@pytest.mark.parametrize("options", [
    {"padding": 1}, {"stride": 2, "padding": 1}, {"padding": 2, "dilation": 2}, {"groups": 4, "padding": 1},
    {"kernel_size": 1}, {"kernel_size": 5, "padding": 2}, {"stride": 3},
])
def test_inference_convolution_by_slabs_is_the_whole_volume_convolution(monkeypatch, options: dict) -> None:
    monkeypatch.setattr(layers, "SLAB_CONV_MIN_BYTES", 0)  # every output slabbed, even this small one
    torch.manual_seed(0)
    options = {"kernel_size": 3, **options}
    fast = use_onednn_convs(nn.Sequential(nn.Conv3d(16, 8, **options)))[0]
    x = torch.randn(2, 16, 37, 11, 9)  # 37 planes: slabs of 3 and a shorter last one; the ends zero-padded
    with torch.no_grad():
        out = fast(x)
    whole = torch.mkldnn_convolution(x, fast.weight, fast.bias, list(fast.padding), list(fast.stride),
                                     list(fast.dilation), fast.groups)
    assert torch.equal(out, whole)  # the same products and sums per output voxel
    assert torch.allclose(out, nn.functional.conv3d(x, fast.weight, fast.bias, fast.stride, fast.padding,
                                                    fast.dilation, fast.groups), atol=1e-5)


def test_slabs_are_for_large_outputs_without_autograd(monkeypatch) -> None:
    calls: list[int] = []
    real = torch.mkldnn_convolution
    monkeypatch.setattr(torch, "mkldnn_convolution", lambda x, *a: calls.append(x.shape[2]) or real(x, *a))
    fast = use_onednn_convs(nn.Sequential(conv(padding=1)))[0]
    big, small = torch.randn(1, 16, 64, 64, 64), torch.randn(1, 16, 8, 8, 8)  # outputs of 8 MiB and 16 KiB
    with torch.no_grad():
        fast(small)
        assert calls == [8]
        fast(big)
        assert len(calls) == 1 + len(layers.slab_bounds(64)) and max(calls[1:]) < 64
    calls.clear()
    fast(big.requires_grad_())  # training: the whole volume, as autograd expects
    assert calls == [64]


def test_the_environment_can_turn_inference_slabs_off() -> None:
    import os
    import subprocess
    import sys

    assert os.environ.get("MEDUNET_INFERENCE_SLABS") is None and layers.SLAB_CONV_MIN_BYTES == 8 * 2**20
    code = "import medunet.networks.layers as l; print(l.SLAB_CONV_MIN_BYTES)"
    off = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={**os.environ, "MEDUNET_INFERENCE_SLABS": "0"})
    assert off.stdout.strip() == "inf"
