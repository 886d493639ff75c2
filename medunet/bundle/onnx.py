"""``medunet export-onnx``: any network (or a trained run's) to ONNX, checked against PyTorch with onnxruntime.

Optional: needs ``pip install onnx onnxruntime`` (the ``onnx`` extra). The model is exported with the
TorchScript-based exporter at a fixed spatial shape (the sliding-window ROI) and a dynamic batch axis: several
medunet networks size their padding and skip resizing from the input shape in Python, which a traced graph
freezes, so other spatial shapes are refused by the graph rather than silently wrong.
"""

from __future__ import annotations

import copy
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from medunet.errors import MedunetError
from medunet.networks import layers

INPUT_NAME = "image"
OUTPUT_NAME = "pred"


@dataclass(frozen=True)
class OnnxExport:
    """What :func:`export_onnx` wrote and how closely onnxruntime reproduced PyTorch.

    Args:
        path: the ``.onnx`` file.
        input_shape: the exported input shape (batch is dynamic).
        max_abs_difference: largest |onnxruntime - PyTorch| over the checked batches.
        opset: the ONNX opset.
    """

    path: Path
    input_shape: tuple[int, ...]
    max_abs_difference: float
    opset: int


def _require_onnx() -> tuple[Any, Any]:
    try:
        import onnx
        import onnxruntime
    except ImportError:
        raise MedunetError(
            "ONNX export needs the optional packages onnx and onnxruntime. Fix: pip install 'medunet[onnx]' "
            "(or pip install onnx onnxruntime)."
        ) from None
    return onnx, onnxruntime


def export_onnx(
    network: nn.Module,
    path: str | Path,
    input_shape: tuple[int, ...],
    opset: int = 17,
    tolerance: float = 1e-4,
    conv3d_as_2d: bool = False,
) -> OnnxExport:
    """Export ``network`` to ONNX and check onnxruntime's output against PyTorch's on random inputs.

    Args:
        network: the module (its weights as they are; put it in eval mode or not, it is set to eval here).
        path: the ``.onnx`` file to write.
        input_shape: ``(B, C, *spatial)``; the spatial shape is fixed in the graph, the batch is dynamic.
        opset: ONNX opset version.
        tolerance: largest accepted |difference|, relative to the largest |PyTorch output| (at least 1).
        conv3d_as_2d: write 3D convolutions as 2D ones over depth slices
            (:class:`medunet.networks.layers.DepthStackedConv3d`): same outputs, much faster on onnxruntime's CPU
            kernels (int8 above all); the network itself is not changed, the check compares with it.

    Raises:
        MedunetError: onnx/onnxruntime missing, or the outputs differ by more than ``tolerance``.

    Example::

        net = create_network("lunet_small_8f", spatial_dims=3, in_channels=1, out_channels=3)
        export_onnx(net, "lunet.onnx", (1, 1, 96, 96, 96))
    """
    onnx, onnxruntime = _require_onnx()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    network = network.cpu().eval()
    graph = layers.conv3d_as_2d(copy.deepcopy(network)).eval() if conv3d_as_2d else network
    example = torch.rand(*input_shape, generator=torch.Generator().manual_seed(0))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tracer warnings about Python-side shape arithmetic (fixed shape here)
        torch.onnx.export(
            graph, (example,), str(path), dynamo=False, opset_version=opset,
            input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
            dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}},
        )
    onnx.checker.check_model(str(path))
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    worst = 0.0
    for batch in (input_shape[0], input_shape[0] + 1):
        x = torch.rand(batch, *input_shape[1:], generator=torch.Generator().manual_seed(batch))
        with torch.no_grad():
            expected = network(x).numpy()
        got = session.run([OUTPUT_NAME], {INPUT_NAME: x.numpy()})[0]
        if got.shape != expected.shape:
            raise MedunetError(f"{path}: onnxruntime output shape {got.shape} differs from PyTorch's {expected.shape}.")
        difference = float(np.abs(got - expected).max())
        if difference > tolerance * max(1.0, float(np.abs(expected).max())):
            raise MedunetError(
                f"{path}: onnxruntime differs from PyTorch by {difference:.2e} at batch {batch}. Fix: try another "
                "--opset, or use the TorchScript model (models/model.ts) for this network."
            )
        worst = max(worst, difference)
    return OnnxExport(path, tuple(input_shape), worst, opset)

