"""The CPU process-peak floor under the lean U-Nets, and what ``OneDNNConv3d`` buys (issue 14).

1. ``measure_peak`` (the profiler's own figure: a fresh process, glibc's mmap threshold fixed) of the first encoder
   block of ``lunet_small_16f_unshuffle`` alone, against the whole backbone and its UNet-- variants, at 1x1x128³.
2. Forward latency at 1x1x128³ with every ``OneDNNConv3d`` turned back into a plain ``torch.nn.Conv3d`` (ATen's own
   kernel choice) against as built, the same process, median of 5 after a warm-up.

Usage: ``OMP_NUM_THREADS=2 python benchmarks/timeline/floor_probe.py``
"""

from __future__ import annotations

import statistics
import time

import torch
from torch import nn

from medunet.networks import create_network
from medunet.networks.layers import OneDNNConv3d, PixelUnshuffle, use_onednn_convs
from medunet.profiling.profiler import measure_peak

SHAPE = (1, 1, 128, 128, 128)
NETWORKS = ["lunet_small_16f_unshuffle", "unetmm_lunet_small_16f_unshuffle_finest",
            "unetmm_lunet_small_16f_unshuffle_coarsest", "unetmm_lunet_small_16f_unshuffle_intermediate"]


def peak_mib(network: nn.Module | str) -> list[float]:
    return [round(measure_peak(network, SHAPE, out_channels=2)[0] / 2**20, 1) if isinstance(network, str)
            else round(measure_peak(network, SHAPE)[0] / 2**20, 1) for _ in range(3)]


def median_ms(net: nn.Module, x: torch.Tensor) -> float:
    with torch.no_grad():
        net(x)
        times = []
        for _ in range(5):
            start = time.perf_counter()
            net(x)
            times.append(1000 * (time.perf_counter() - start))
    return statistics.median(times)


def main() -> None:
    probe = use_onednn_convs(nn.Sequential(PixelUnshuffle(3, 2), nn.Conv3d(8, 16, 3, padding=1), nn.ReLU(inplace=True),
                                           nn.Conv3d(16, 16, 3, padding=1)))
    print("process peak MiB at 1x1x128^3 (three fresh processes):")
    print(f"  {'first encoder block alone':45s} {peak_mib(probe)}")
    for name in NETWORKS:
        print(f"  {name:45s} {peak_mib(name)}")
    print("forward ms at 1x1x128^3, ATen's conv choice -> OneDNNConv3d:")
    x = torch.randn(SHAPE)
    for name in [*NETWORKS[:2], "lunet_small_16f_unshuffle_wide", "monai_unet_spleen"]:
        torch.manual_seed(0)
        net = create_network(name, spatial_dims=3, in_channels=1, out_channels=2).eval()
        fast = median_ms(net, x)
        for module in net.modules():
            if type(module) is OneDNNConv3d:
                module.__class__ = nn.Conv3d
        print(f"  {name:45s} {median_ms(net, x):6.0f} -> {fast:6.0f}")


if __name__ == "__main__":
    main()
