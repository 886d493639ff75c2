"""The efficiency half of ``medunet bench``: every network profiled at the same inputs, side by side.

Each network is measured with :func:`medunet.profiling.profile` (parameters, multiply-adds, measured peak
memory of inference and of a training step, skip memory, latency) at each input shape, plus the
sliding-window throughput over a CT-sized volume. Ratios are taken against a baseline measured in
the same run.

CPU peak-memory figures move by about +-0.15 of the baseline between runs on a shared 2-core machine;
``repeats_memory=3`` (``medunet bench --repeats-memory 3``) measures each peak three times, each in a fresh
process, and reports the median (every measurement is kept in ``memory_runs``). On a GPU the CUDA allocator's
figures are exact and one measurement is enough.

CPU latency drifts too (turbo, other load: the same network measured 30% apart minutes later), and a network
timed a minute after the baseline sees another machine state. So after the profiles, the forward latencies at each
shape are measured again round-robin: every network built once, warmed up, then timed in turn, ``repeats``
rounds, the median per network (:func:`interleaved_latency`). A drift then moves every network's figure alike and
the ratios to the baseline hold.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass, field
from typing import Any

import torch
from monai.inferers import SlidingWindowInferer
from tqdm import tqdm

from medunet.checks import parse_shape
from medunet.profiling import ProfileResult, profile
from medunet.profiling.profiler import build, measure_peak

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
    #: Every peak-memory measurement (bytes) when it was repeated: ``{"infer": [...], "train": [...]}``; the
    #: profile holds their median.
    memory_runs: dict[str, list[int]] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        runs = {f"peak_{kind}_runs": values for kind, values in self.memory_runs.items()}
        return {**self.profile.as_dict(), "throughput_vps": self.throughput_vps, **runs}


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
    repeats_memory: int = 1,
) -> list[EfficiencyResult]:
    """Profile every network at every shape; with ``volume``, add each network's sliding-window
    throughput (one 3D single-channel volume, windows of ``roi_size``) to its 3D rows. With
    ``repeats_memory`` > 1 each peak-memory figure is the median of that many measurements (fresh processes)."""
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
        runs = _repeat_memory(result, name, device, train, repeats_memory, out_channels) if memory else {}
        results.append(EfficiencyResult(result, throughput.get(name) if is_3d else None, runs))
    if len(networks) > 1:
        for shape in shapes:
            latency = interleaved_latency(networks, shape, device=device, repeats=repeats, out_channels=out_channels)
            for item in results:
                if item.profile.input_shape == parse_shape(shape):
                    item.profile.latency_ms = latency[item.profile.name]
    return results


def interleaved_latency(networks: list[str], shape: str, device: str = "cpu", repeats: int = 3,
                        out_channels: int = 2) -> dict[str, float]:
    """Median no-grad forward milliseconds of each network at ``shape``, the networks timed in turn, ``repeats``
    rounds after one warm-up forward each, so that a drift of the machine's speed reaches them all alike."""
    dims = parse_shape(shape)
    nets = {name: build(name, dims, out_channels=out_channels).to(device).eval() for name in networks}
    x = torch.randn(dims, device=device)
    times: dict[str, list[float]] = {name: [] for name in networks}
    cuda = torch.device(device).type == "cuda"
    with torch.no_grad():
        for net in nets.values():
            net(x)
        for _ in tqdm(range(repeats), desc=f"latency, interleaved, {shape}", unit="round"):
            for name, net in nets.items():
                if cuda:
                    torch.cuda.synchronize(device)
                start = time.perf_counter()
                net(x)
                if cuda:
                    torch.cuda.synchronize(device)
                times[name].append((time.perf_counter() - start) * 1000)
    return {name: statistics.median(values) for name, values in times.items()}


def _repeat_memory(result: ProfileResult, name: str, device: str, train: bool, repeats: int,
                   out_channels: int) -> dict[str, list[int]]:
    """Measure ``result``'s peaks ``repeats`` times in all (the profile's own first) and put their medians in it."""
    if repeats <= 1:
        return {}
    runs: dict[str, list[int]] = {}
    for kind, attribute, training in (("infer", "peak_infer_bytes", False), ("train", "peak_train_bytes", True)):
        first = getattr(result, attribute)
        if first is None or (training and not train):
            continue
        values = [first] + [measure_peak(name, result.input_shape, device, training, out_channels=out_channels)[0]
                            for _ in range(repeats - 1)]
        setattr(result, attribute, int(statistics.median(values)))
        runs[kind] = values
    return runs
