"""Profile a network: size, multiply-adds, measured peak memory, skip memory and latency.

Peak memory is measured, never estimated: CUDA allocator statistics on a GPU; on the CPU the growth
of a fresh process's peak resident set over the work (one process per figure, so no figure inherits
another's heap). See :mod:`medunet.profiling.memory`.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from medunet.checks import parse_shape
from medunet.networks import create_network
from medunet.profiling.memory import PeakMemory
from medunet.profiling.skips import measure_skip_bytes

MIB = 2**20


@dataclass
class ProfileResult:
    """What :func:`profile` measured for one network at one input shape."""

    name: str
    input_shape: tuple[int, ...]
    device: str
    params: int
    size_mb: float
    macs: int
    skip_bytes: int
    latency_ms: float
    peak_infer_bytes: int | None = None
    peak_train_bytes: int | None = None
    train_latency_ms: float | None = None
    memory_method: str = ""

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    def metrics(self) -> dict[str, float]:
        """The model facts as plain numbers (MB = MiB, as ``medunet profile`` prints them); unmeasured ones
        are left out rather than invented."""
        facts = {
            "model_params": self.params,
            "model_size_mb": self.size_mb,
            "model_macs": self.macs,
            "skip_memory_mb": self.skip_bytes / MIB,
            "latency_ms": self.latency_ms,
            "peak_infer_mb": None if self.peak_infer_bytes is None else self.peak_infer_bytes / MIB,
            "peak_train_mb": None if self.peak_train_bytes is None else self.peak_train_bytes / MIB,
            "train_latency_ms": self.train_latency_ms,
        }
        return {key: float(value) for key, value in facts.items() if value is not None}

    def as_params(self) -> dict[str, Any]:
        """What was profiled: network, input shape, device and how memory was measured."""
        return {"profile": {"network": self.name, "input_shape": "x".join(map(str, self.input_shape)),
                            "device": self.device, "memory_method": self.memory_method or "not measured"}}


def build(network: nn.Module | str, input_shape: tuple[int, ...], **overrides: Any) -> nn.Module:
    """A module as given, or a registry preset built for the input's channels and dimensionality."""
    if isinstance(network, nn.Module):
        return network
    overrides.setdefault("spatial_dims", len(input_shape) - 2)
    overrides.setdefault("in_channels", input_shape[1])
    return create_network(network, **overrides)


def _peak_bytes(network: nn.Module | str, overrides: dict, shape: tuple[int, ...], device: str, train: bool) -> tuple[int, str]:
    """Peak memory growth of one no-grad forward (or one forward+backward) on a fresh input."""
    torch.manual_seed(0)
    net = build(network, shape, **overrides).to(device)
    x = torch.randn(shape, device=device)
    net.train(train)
    with PeakMemory(torch.device(device)) as memory:
        if train:
            net(x).float().mean().backward()
        else:
            with torch.no_grad():
                net(x)
    return memory.peak_bytes, memory.method


#: glibc's malloc serves blocks above its mmap threshold with mmap and returns them to the OS on free; by default the
#: threshold grows to the largest block freed so far (up to 32 MiB), after which tensor-sized blocks come from the
#: heap and their pages stay resident when freed. Fixing it keeps the resident peak to what the work holds at once:
#: the same figure in every run (to the MiB, where the default moved by +-15%), and no retained pages counted.
FIXED_MMAP_THRESHOLD = {"MALLOC_MMAP_THRESHOLD_": "131072"}


def measure_peak(
    network: nn.Module | str, shape: tuple[int, ...], device: str = "cpu", train: bool = False,
    isolate: bool | None = None, **overrides: Any,
) -> tuple[int, str]:
    """Peak memory of one inference forward (``train=False``) or training step, and how it was measured.

    On the CPU this runs in a fresh Python process by default (``isolate``) so the figure is the
    growth of a fresh process's footprint, with glibc's mmap threshold fixed (:data:`FIXED_MMAP_THRESHOLD`) so that
    freed tensors leave the resident set. The child is started with ``python -m`` (not
    multiprocessing), so callers need no ``if __name__ == "__main__"`` guard.
    """
    isolate = torch.device(device).type == "cpu" if isolate is None else isolate
    if not isolate:
        return _peak_bytes(network, overrides, shape, device, train)
    with tempfile.TemporaryDirectory(prefix="medunet-peak-") as folder:
        job = Path(folder) / "job.pt"
        torch.save({"network": network, "overrides": overrides, "shape": shape, "device": device, "train": train}, job)
        done = subprocess.run(
            [sys.executable, "-m", "medunet.profiling.profiler", str(job)], capture_output=True, text=True,
            encoding="utf-8", errors="replace", env={**os.environ, **FIXED_MMAP_THRESHOLD},
        )
        if done.returncode != 0:
            raise RuntimeError(f"peak-memory measurement failed in its child process:\n{done.stderr[-3000:]}")
        result = json.loads(done.stdout.strip().splitlines()[-1])
    return result["peak_bytes"], result["method"]


def _measure_job(job_file: str) -> None:
    # The job file is this process's parent's own pickle in a private (0700) temporary folder, never a user's file.
    job = torch.load(job_file, weights_only=False)
    peak, method = _peak_bytes(job["network"], job["overrides"], tuple(job["shape"]), job["device"], job["train"])
    print(json.dumps({"peak_bytes": peak, "method": method}))


def count_macs(net: nn.Module, x: torch.Tensor) -> int:
    """Multiply-accumulates of convolutions and matrix products in one forward (FLOPs / 2).

    A module that computes a convolution without a convolution op (e.g. OneNet's ``FlatSpatialFilter``, a
    shifted sum) declares its own count with an ``extra_macs(output) -> int`` method, added here.
    """
    extra: list[int] = []
    hooks = [module.register_forward_hook(lambda m, _, out: extra.append(int(m.extra_macs(out))))
             for module in net.modules() if callable(getattr(module, "extra_macs", None))]
    try:
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            net(x)
    finally:
        for hook in hooks:
            hook.remove()
    return counter.get_total_flops() // 2 + sum(extra)


def _median_ms(fn: Any, repeats: int, device: torch.device) -> float:
    fn()  # warm-up: first-call allocations and kernel selection
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append((time.perf_counter() - start) * 1000)
    return statistics.median(times)


def profile(
    network: nn.Module | str,
    input_shape: tuple[int, ...] | str,
    device: str | torch.device = "cpu",
    train: bool = True,
    memory: bool = True,
    repeats: int = 3,
    name: str | None = None,
    **overrides: Any,
) -> ProfileResult:
    """Profile ``network`` (a module or a registry name) on a random input of ``input_shape``.

    Args:
        network: an ``nn.Module`` or a preset name from :func:`medunet.networks.list_networks`; a
            preset is built for ``input_shape``'s channels and dimensionality plus ``overrides``.
        input_shape: ``(B, C, *spatial)`` or a string like ``"1x1x128x128x128"``.
        device: ``"cpu"``, ``"cuda"``...
        train: also measure a training step (forward + backward of the mean logit).
        memory: measure peak memory (fresh processes on the CPU: a few seconds each).
        repeats: timed runs after one warm-up; latency is their median.

    Returns:
        a :class:`ProfileResult`.

    Example::

        result = profile("lunet_small_8f", "1x1x64x64x64", out_channels=3)
        print(result.params, result.peak_infer_bytes / 2**20, result.latency_ms)
    """
    shape = parse_shape(input_shape) if isinstance(input_shape, str) else tuple(input_shape)
    device = torch.device(device)
    net = build(network, shape, **overrides).to(device).eval()
    x = torch.randn(shape, device=device)
    params = sum(p.numel() for p in net.parameters())
    size_bytes = sum(t.numel() * t.element_size() for t in [*net.parameters(), *net.buffers()])
    result = ProfileResult(
        name=name or (network if isinstance(network, str) else type(network).__name__),
        input_shape=shape,
        device=str(device),
        params=params,
        size_mb=size_bytes / MIB,
        macs=count_macs(net, x),
        skip_bytes=measure_skip_bytes(net, x),
        latency_ms=0.0,
    )
    with torch.no_grad():
        result.latency_ms = _median_ms(lambda: net(x), repeats, device)
    if train:
        net.train()
        result.train_latency_ms = _median_ms(lambda: net(x).float().mean().backward(), repeats, device)
        net.zero_grad(set_to_none=True)
        net.eval()
    if memory:
        source: nn.Module | str = network if isinstance(network, str) else net
        result.peak_infer_bytes, result.memory_method = measure_peak(source, shape, str(device), False, **overrides)
        if train:
            result.peak_train_bytes, _ = measure_peak(source, shape, str(device), True, **overrides)
    return result


if __name__ == "__main__":
    _measure_job(sys.argv[1])
