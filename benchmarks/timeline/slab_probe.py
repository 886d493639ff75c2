"""What inference by slabs buys on the CPU (issue 10): process peak and latency at 1x1x128³, slabs off and on.

"Off" is ``MEDUNET_INFERENCE_SLABS=0``: whole-volume convolutions, the concatenation made, the sub-pixel head
shuffled as a whole (the forward before 2026-12-05). Peak memory: the profiler's own figure (``measure_peak``: a fresh
process per figure, glibc's mmap threshold fixed), three processes each; latency: the same process for both, median of
5 after a warm-up, off and on interleaved.

Usage: ``OMP_NUM_THREADS=2 python benchmarks/timeline/slab_probe.py [networks...]``
"""

from __future__ import annotations

import os
import statistics
import sys
import time

import torch

from medunet.networks import create_network, layers
from medunet.profiling.profiler import measure_peak

SHAPE = (1, 1, 128, 128, 128)
NETWORKS = ["monai_unet_spleen", "monai_segresnet", "lunet_small_16f_unshuffle", "lunet_16f_4level_unshuffle_subpixel_in",
            "lunet_16f_4level_unshuffle_subpixel_in_res", "lunet_16f_4level_unshuffle_subpixel_deep_in_res"]


def peaks_mib(name: str, slabs: bool) -> list[float]:
    os.environ["MEDUNET_INFERENCE_SLABS"] = "1" if slabs else "0"
    try:
        return [round(measure_peak(name, SHAPE, out_channels=3)[0] / 2**20, 1) for _ in range(3)]
    finally:
        del os.environ["MEDUNET_INFERENCE_SLABS"]


def latency_ms(net: torch.nn.Module, x: torch.Tensor, slabs: bool) -> float:
    layers.SLAB_CONV_MIN_BYTES = 8 * 2**20 if slabs else float("inf")
    start = time.perf_counter()
    net(x)
    return 1000 * (time.perf_counter() - start)


def main(names: list[str]) -> None:
    x = torch.randn(SHAPE)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; 1x1x128^3, 3 classes")
    print("| network | peak MiB, slabs off | peak MiB, slabs on | fwd ms, off | fwd ms, on |")
    print("|---|---|---|---|---|")
    for name in names:
        off, on = peaks_mib(name, False), peaks_mib(name, True)
        torch.manual_seed(0)
        net = create_network(name, spatial_dims=3, in_channels=1, out_channels=3).eval()
        times: dict[bool, list[float]] = {False: [], True: []}
        with torch.no_grad():
            latency_ms(net, x, False), latency_ms(net, x, True)  # warm-up
            for _ in range(5):
                for slabs in (False, True):
                    times[slabs].append(latency_ms(net, x, slabs))
        print(f"| {name} | {statistics.median(off):.1f} ({', '.join(map(str, off))}) | "
              f"{statistics.median(on):.1f} ({', '.join(map(str, on))}) | {statistics.median(times[False]):.0f} | "
              f"{statistics.median(times[True]):.0f} |", flush=True)


if __name__ == "__main__":
    main(sys.argv[1:] or NETWORKS)
