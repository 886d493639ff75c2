"""Why ``medunet export-deploy`` writes 3D convolutions as 2D ones, and runs windows in parallel threads.

Two measurements under onnxruntime on this CPU, every figure the median of 5 rounds (each the median of 5 runs)
after warm-up, the variants interleaved round by round so that drift hits them alike:

1. One 16 -> 16 channel 3x3x3 convolution on 4 windows of 24x32x24 (``lunet_small_16f_unshuffle``'s level 0 on a
   Hippocampus window): as an ONNX 3D ``Conv``, and as the 2D ``Conv`` over depth slices that
   :class:`medunet.networks.layers.DepthStackedConv3d` writes; fp32 and int8 (quantized as ``export-deploy``
   does), one thread.
2. A whole network (``--run``: a trained run's; default an untrained ``lunet_small_16f_unshuffle`` with
   randomised BN statistics, speed does not depend on the weights) on a batch of 4 windows: exported with plain
   3D convolutions and with ``conv3d_as_2d``, fp32 and int8, at 1 and 2 threads, with 2 threads either inside
   onnxruntime (``intra_op_num_threads=2``) or as two windows at a time on one thread each (the runner's
   ``onnx_predictor``).

Usage: ``python benchmarks/deploy/conv2d_export.py [--run RUN_DIR] [--work /tmp/conv2d_export] [--out FILE.json]``
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnxruntime
import torch
from torch import nn

from medunet.atomic import atomic_write_text
from medunet.bundle.onnx import export_onnx
from medunet.deploy import runner
from medunet.deploy.export import quantize_int8
from medunet.networks import create_network


def session_predictor(model: Path, intra_op_threads: int) -> Callable[[np.ndarray], np.ndarray]:
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads, options.inter_op_num_threads = intra_op_threads, 1
    session = onnxruntime.InferenceSession(str(model), options, providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    return lambda x: session.run(None, {name: x})[0]


def interleaved_medians(predictors: dict[str, Callable], x: np.ndarray, rounds: int = 5) -> dict[str, float]:
    for predict in predictors.values():
        predict(x), predict(x)
    times: dict[str, list[float]] = {key: [] for key in predictors}
    for _ in range(rounds):
        for key, predict in predictors.items():
            runs = []
            for _ in range(5):
                start = time.perf_counter()
                predict(x)
                runs.append(1000 * (time.perf_counter() - start))
            times[key].append(statistics.median(runs))
    return {key: round(statistics.median(values), 1) for key, values in times.items()}


def export_pair(network: nn.Module, folder: Path, shape: tuple[int, ...], windows: list[np.ndarray]) -> dict[str, Path]:
    models = {}
    for layout, as_2d in (("3d", False), ("2d", True)):
        fp32, int8 = folder / f"{layout}.onnx", folder / f"{layout}.int8.onnx"
        export_onnx(network, fp32, shape, conv3d_as_2d=as_2d)
        quantize_int8(fp32, int8, windows)
        models[f"{layout} fp32"], models[f"{layout} int8"] = fp32, int8
    return models


def single_convolution(work: Path) -> dict[str, float]:
    torch.manual_seed(0)
    shape = (4, 16, 24, 32, 24)
    x = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
    models = export_pair(nn.Conv3d(16, 16, 3, padding=1).eval(), work / "conv", (1, *shape[1:]), [x])
    return interleaved_medians({key: session_predictor(path, 1) for key, path in models.items()}, x)


def whole_network(work: Path, run: str | None) -> dict[str, float]:
    if run:
        from medunet.engines.inference import load_run

        network, _, record = load_run(run, "best")
        roi = tuple(record.sliding_window["roi_size"])
    else:
        torch.manual_seed(0)
        network, roi = create_network("lunet_small_16f_unshuffle", spatial_dims=3, in_channels=1, out_channels=3), (48, 64, 48)
        for module in network.modules():
            if isinstance(module, nn.BatchNorm3d):
                module.running_mean.uniform_(-0.5, 0.5)
                module.running_var.uniform_(0.5, 2.0)
    rng = np.random.default_rng(0)
    windows = [rng.standard_normal((1, 1, *roi)).astype(np.float32) for _ in range(8)]
    models = export_pair(network.eval(), work / "network", (1, 1, *roi), windows)
    predictors = {}
    for key, path in models.items():
        predictors[f"{key}, 1 thread"] = session_predictor(path, 1)
        predictors[f"{key}, 2 threads inside onnxruntime"] = session_predictor(path, 2)
        predictors[f"{key}, 2 threads, windows in parallel"] = runner.onnx_predictor(path, 2)
    return interleaved_medians(predictors, np.concatenate(windows[:4]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", help="a trained run folder (default: an untrained lunet_small_16f_unshuffle)")
    parser.add_argument("--work", type=Path, default=Path("/tmp/conv2d_export"))
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    for folder in ("conv", "network"):
        (args.work / folder).mkdir(parents=True, exist_ok=True)
    results = {"single_convolution_ms": single_convolution(args.work)}
    print(json.dumps(results, indent=2), flush=True)
    results["network_ms"] = whole_network(args.work, args.run)
    print(json.dumps(results["network_ms"], indent=2), flush=True)
    if args.out:
        atomic_write_text(json.dumps(results, indent=2) + "\n", args.out)


if __name__ == "__main__":
    main()
