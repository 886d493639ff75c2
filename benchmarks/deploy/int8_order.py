"""Does conv -> BN -> ReLU (BN folds into the conv) make int8 faster than fp32 under onnxruntime?

``lunet_small_16f_unshuffle`` as registered (STAMP's conv -> ReLU -> BN, ``order="AND"``) against the same network
with ``order="NA"``, both untrained (speed does not depend on the weights; BN statistics are randomised so BN is
not an identity), exported to ONNX and quantized as ``medunet export-deploy`` does (QDQ, per-channel int8 weights).
Times one batch of 4 Hippocampus windows (48x64x48), median of 15 runs after 3 warm-ups.

Usage: ``OMP_NUM_THREADS=1 python benchmarks/deploy/int8_order.py [--threads 1] [--work /tmp/int8_order]``
"""

from __future__ import annotations

import argparse
import collections
import statistics
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime
import torch

from medunet.bundle.onnx import export_onnx
from medunet.deploy.export import quantize_int8
from medunet.networks import create_network

WINDOW = (1, 1, 48, 64, 48)


def median_ms(model: Path, batch: np.ndarray, threads: int) -> float:
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
    session = onnxruntime.InferenceSession(str(model), options, providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    for _ in range(3):
        session.run(None, {name: batch})
    times = []
    for _ in range(15):
        start = time.perf_counter()
        session.run(None, {name: batch})
        times.append((time.perf_counter() - start) * 1000)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--work", type=Path, default=Path("/tmp/int8_order"))
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    windows = [rng.standard_normal(WINDOW).astype(np.float32) for _ in range(8)]
    batch = np.concatenate(windows[:4])
    for order in ("AND", "NA"):
        net = create_network("lunet_small_16f_unshuffle", spatial_dims=3, in_channels=1, out_channels=3, order=order)
        for module in net.modules():
            if isinstance(module, torch.nn.BatchNorm3d):
                module.running_mean.uniform_(-0.5, 0.5)
                module.running_var.uniform_(0.5, 2.0)
        fp32, int8 = args.work / f"{order}.onnx", args.work / f"{order}.int8.onnx"
        export_onnx(net, fp32, WINDOW)
        quantize_int8(fp32, int8, windows)
        ops = collections.Counter(node.op_type for node in onnx.load(str(int8)).graph.node)
        fp32_ms, int8_ms = median_ms(fp32, batch, args.threads), median_ms(int8, batch, args.threads)
        print(f"order {order}: fp32 {fp32_ms:.1f} ms, int8 {int8_ms:.1f} ms, int8 speed-up {fp32_ms / int8_ms:.2f}x; "
              f"float BatchNormalization nodes left in the int8 graph: {ops.get('BatchNormalization', 0)}", flush=True)


if __name__ == "__main__":
    main()
