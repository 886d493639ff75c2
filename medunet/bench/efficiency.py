"""The efficiency half of ``medunet bench``: every network profiled at the same inputs, side by side.

Each network is measured with :func:`medunet.profiling.profile` (parameters, multiply-adds, measured peak
memory of inference and of a training step, skip memory, latency) at each input shape, plus the
sliding-window throughput over a CT-sized volume. Ratios are taken against a baseline measured in
the same run.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import torch
from monai.inferers import SlidingWindowInferer
from tqdm import tqdm

from medunet.profiling import ProfileResult, profile
from medunet.profiling.profiler import build

#: The networks a full benchmark compares: MONAI's baselines and the 3D presets of each seed idea.
BENCH_NETWORKS = (
    "monai_unet_spleen",
    "monai_checkpoint_unet_spleen",
    "monai_basicunet",
    "monai_segresnet",
    "monai_dynunet_nnunet",
    "lunet_small_8f",
    "lunet_small_16f",
    "lunet_small_16f_unshuffle",
    "unet_small_8f_unshuffle",
    "onenet_e4_8f",
    "onenet_ed4_8f",
    "onenet_ed4_16f",
    "nafnet_w8_light",
    "unetmm_nafnet_w8_light_coarsest",
    "unetmm_unet_small_8f_unshuffle_coarsest",
    "unetmm_lunet_small_16f_unshuffle_intermediate",
    "unetmm_lunet_small_16f_unshuffle_intermediate_wide",
    "unetmm_lunet_small_16f_unshuffle_intermediate_wider",
    "unetmm_lunet_small_16f_unshuffle_finest",
)
#: ``--quick``: one network per idea and the reference baseline, at small shapes.
QUICK_NETWORKS = ("monai_unet_spleen", "lunet_small_8f", "onenet_ed4_8f", "unetmm_lunet_small_8f_coarsest")

FULL_SHAPES = ("1x1x96x96x96", "1x1x128x128x128", "1x3x256x256")
QUICK_SHAPES = ("1x1x64x64x64",)
FULL_VOLUME = (512, 512, 128)
QUICK_VOLUME = (160, 160, 64)


@dataclass
class EfficiencyResult:
    """The profile of one network at one shape, and its sliding-window throughput when measured."""

    profile: ProfileResult
    throughput_vps: float | None = None

    def as_dict(self) -> dict[str, Any]:
        return {**self.profile.as_dict(), "throughput_vps": self.throughput_vps}


def sliding_window_throughput(
    network: torch.nn.Module,
    volume: tuple[int, int, int],
    roi_size: tuple[int, int, int] = (96, 96, 96),
    overlap: float = 0.25,
    sw_batch_size: int = 1,
    device: str | torch.device = "cpu",
    in_channels: int = 1,
) -> float:
    """Voxels per second of sliding-window inference over one ``volume`` of ``in_channels`` channels."""
    device = torch.device(device)
    network = network.to(device).eval()
    inferer = SlidingWindowInferer(roi_size=roi_size, sw_batch_size=sw_batch_size, overlap=overlap, mode="gaussian")
    image = torch.randn(1, in_channels, *volume)
    with torch.no_grad():
        start = time.perf_counter()
        inferer(image.to(device), network)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        seconds = time.perf_counter() - start
    return image[0, 0].numel() / seconds


def run_efficiency(
    networks: list[str],
    shapes: list[str],
    device: str = "cpu",
    out_channels: int = 2,
    memory: bool = True,
    train: bool = True,
    repeats: int = 3,
    volume: tuple[int, int, int] | None = FULL_VOLUME,
    roi_size: tuple[int, int, int] = (96, 96, 96),
) -> list[EfficiencyResult]:
    """Profile every network at every shape; with ``volume``, add each network's sliding-window
    throughput (one 3D single-channel volume, windows of ``roi_size``) to its 3D rows."""
    throughput: dict[str, float] = {}
    if volume is not None:
        for name in tqdm(networks, desc="sliding window", unit="net"):
            net = build(name, (1, 1, *roi_size), out_channels=out_channels)
            throughput[name] = sliding_window_throughput(net, volume, roi_size, device=device)
    results = []
    jobs = [(shape, name) for shape in shapes for name in networks]
    for shape, name in tqdm(jobs, desc="efficiency", unit="run"):
        result = profile(name, shape, device=device, train=train, memory=memory, repeats=repeats, out_channels=out_channels)
        is_3d = len(result.input_shape) == 5
        results.append(EfficiencyResult(result, throughput.get(name) if is_3d else None))
    return results
