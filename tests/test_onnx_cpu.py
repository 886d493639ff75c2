"""onnxruntime on the CPU: 3D convolutions exported as 2D ones over depth slices
(``medunet.networks.layers.DepthStackedConv3d``) give the 3D network's outputs, in PyTorch and under onnxruntime,
with no 3D ``Conv`` left in the graph; the deploy runner's window-parallel predictor gives the serial one's."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from medunet.networks import create_network
from medunet.networks.layers import DepthStackedConv3d, OneDNNConv3d, conv3d_as_2d


@pytest.mark.parametrize("options", [
    {"kernel_size": 3, "padding": 1},
    {"kernel_size": 3},
    {"kernel_size": (3, 1, 1), "padding": (1, 0, 0), "stride": (1, 2, 2), "bias": False},
    {"kernel_size": (5, 3, 3), "padding": (2, 2, 1), "dilation": (1, 2, 1)},
    {"kernel_size": 1},
])
def test_depth_stacked_conv_equals_the_3d_convolution(options: dict) -> None:
    torch.manual_seed(0)
    reference = nn.Conv3d(6, 5, **options)
    stacked = conv3d_as_2d(nn.Sequential(nn.Conv3d(6, 5, **options)))
    stacked.load_state_dict(nn.Sequential(reference).state_dict())  # same keys and shapes: the weight stays 3D
    assert type(stacked[0]) is DepthStackedConv3d
    x = torch.randn(2, 6, 9, 10, 11)
    with torch.no_grad():
        expected, out = reference(x), stacked(x)
    assert out.shape == expected.shape
    assert torch.allclose(out, expected, atol=1e-5)


@pytest.mark.parametrize("options", [{"groups": 2}, {"stride": 2}, {"padding": 1, "padding_mode": "reflect"},
                                     {"padding": "same"}])
def test_convolutions_it_cannot_compute_are_left_alone(options: dict) -> None:
    net = conv3d_as_2d(nn.Sequential(nn.Conv3d(4, 4, 3, **options), OneDNNConv3d(4, 4, 3, padding=1)))
    assert type(net[0]) is nn.Conv3d
    assert type(net[1]) is DepthStackedConv3d


def test_export_writes_only_2d_convolutions_and_matches_the_3d_network(tmp_path) -> None:
    onnx = pytest.importorskip("onnx")
    onnxruntime = pytest.importorskip("onnxruntime")
    from medunet.bundle.onnx import export_onnx

    torch.manual_seed(0)
    network = create_network("lunet_small_8f_unshuffle", spatial_dims=3, in_channels=1, out_channels=3,
                             **{"features": 4}).eval()
    for module in network.modules():  # BN statistics away from the identity, so they matter
        if isinstance(module, nn.BatchNorm3d):
            module.running_mean.uniform_(-0.5, 0.5)
            module.running_var.uniform_(0.5, 2.0)
    plain, stacked = tmp_path / "plain.onnx", tmp_path / "stacked.onnx"
    export_onnx(network, plain, (1, 1, 16, 24, 16))
    export_onnx(network, stacked, (1, 1, 16, 24, 16), conv3d_as_2d=True)

    def conv_weight_ranks(path) -> set[int]:
        model = onnx.load(str(path))
        weights = {init.name: len(init.dims) for init in model.graph.initializer}
        return {weights.get(node.input[1], -1) for node in model.graph.node if node.op_type == "Conv"}

    assert conv_weight_ranks(plain) == {5}
    assert conv_weight_ranks(stacked) == {4}  # folded to 2D weights at export
    assert all(type(m) is not DepthStackedConv3d for m in network.modules())  # the network itself is unchanged
    x = torch.rand(3, 1, 16, 24, 16, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = network(x).numpy()
    session = onnxruntime.InferenceSession(str(stacked), providers=["CPUExecutionProvider"])
    np.testing.assert_allclose(session.run(None, {"image": x.numpy()})[0], expected, atol=1e-4)


def test_windows_in_parallel_give_the_serial_predictions(tmp_path) -> None:
    pytest.importorskip("onnxruntime")
    from medunet.bundle.onnx import export_onnx
    from medunet.deploy import runner

    torch.manual_seed(0)
    network = create_network("lunet_small_8f_unshuffle", spatial_dims=3, in_channels=1, out_channels=2,
                             **{"features": 4})
    export_onnx(network, tmp_path / "model.onnx", (1, 1, 16, 16, 16), conv3d_as_2d=True)
    serial, parallel = (runner.onnx_predictor(tmp_path / "model.onnx", threads) for threads in (1, 3))
    windows = np.random.default_rng(0).random((5, 1, 16, 16, 16), dtype=np.float32)
    for batch in (windows, windows[:1], windows[:2]):  # 5 windows in 3 parts; one window on all threads; 2 parts
        expected = serial(batch)
        got = parallel(batch)
        assert got.shape == expected.shape == (len(batch), 2, 16, 16, 16)
        np.testing.assert_allclose(got, expected, atol=1e-6)
    assert not np.allclose(expected[0], expected[1])  # distinct windows, so a mixed-up order would show


def test_the_runner_keeps_a_session_per_model_file_until_the_file_changes(tmp_path) -> None:
    pytest.importorskip("onnxruntime")
    import os

    from medunet.bundle.onnx import export_onnx
    from medunet.deploy import runner

    model = tmp_path / "model.onnx"
    window = np.random.default_rng(0).random((1, 1, 16, 16, 16), dtype=np.float32)
    outputs = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        network = create_network("lunet_small_8f_unshuffle", spatial_dims=3, in_channels=1, out_channels=2,
                                 **{"features": 4})
        export_onnx(network, model, (1, 1, 16, 16, 16))
        os.utime(model, ns=(seed * 10**9, seed * 10**9))  # distinct stamps even within one clock tick
        first = runner._session_predictor(model, 1)
        assert runner._session_predictor(model, 1) is first  # one session for all the cases of a process
        outputs.append(first(window))
    assert not np.allclose(outputs[0], outputs[1])  # the rewritten file was loaded, not the cached session


@pytest.mark.parametrize("name", ["lunet_small_8f_unshuffle", "lunet_16f_4level_unshuffle_subpixel_in_res",
                                  "onenet_ed4_8f", "nafnet_w8_light",
                                  "unetmm_lunet_small_16f_unshuffle_finest", "monai_unet_spleen", "monai_segresnet"])
def test_every_family_exports_with_2d_convolutions(name: str, tmp_path) -> None:
    """``export-deploy``'s default layout on each block family and MONAI's baselines: export_onnx compares
    onnxruntime with the (3D) network and raises on a mismatch."""
    pytest.importorskip("onnxruntime")
    from medunet.bundle.onnx import export_onnx
    from medunet.networks import get_preset

    torch.manual_seed(0)
    network = create_network(name, spatial_dims=3, in_channels=1, out_channels=2, **get_preset(name).test_overrides)
    exported = export_onnx(network, tmp_path / "model.onnx", (1, 1, 32, 32, 32), conv3d_as_2d=True)
    assert exported.max_abs_difference < 1e-3
