"""Measured peak memory of a piece of work: CUDA allocator statistics on a GPU, the process's peak
resident set size on the CPU.

On the CPU the kernel's high-water mark (``VmHWM``) is reset to the current RSS just before the work
(``/proc/self/clear_refs``) and read just after, so the figure is the growth of the whole process's
real footprint, allocator overheads and all. Where that reset is not permitted it falls back to
``ru_maxrss`` growth, which is only meaningful in a fresh process (the profiler uses one per figure).

Either way, measure in a fresh process with glibc's mmap threshold fixed, as
:func:`medunet.profiling.profiler.measure_peak` does: in a long-lived process a large block can be served
from freed heap pages that are still resident, and the work then shows no growth at all.
"""

from __future__ import annotations

import re
import resource
import sys
from pathlib import Path

import torch

_STATUS = Path("/proc/self/status")
_CLEAR_REFS = Path("/proc/self/clear_refs")


def _status_kib(field: str) -> int | None:
    try:
        match = re.search(rf"^{field}:\s+(\d+)\s+kB", _STATUS.read_text(encoding="utf-8"), re.MULTILINE)
    except OSError:
        return None
    return int(match.group(1)) if match else None


def _reset_high_water_mark() -> bool:
    try:
        _CLEAR_REFS.write_text("5", encoding="utf-8")
    except OSError:
        return False
    return True


def _maxrss_bytes() -> int:
    # ru_maxrss is in KiB on Linux and in bytes on macOS.
    value = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return value if sys.platform == "darwin" else value * 1024


class PeakMemory:
    """Context manager measuring the peak memory growth of the block it wraps.

    After the block, ``peak_bytes`` holds the growth and ``method`` says how it was measured.

    Example::

        with PeakMemory(torch.device("cpu")) as memory:
            net(x)
        print(memory.peak_bytes, memory.method)
    """

    def __init__(self, device: torch.device | str) -> None:
        self.device = torch.device(device)
        self.peak_bytes = 0
        self.method = ""

    def __enter__(self) -> PeakMemory:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._start = torch.cuda.memory_allocated(self.device)
            self.method = "cuda allocator peak"
        elif _reset_high_water_mark() and _status_kib("VmHWM") is not None:
            self._start = (_status_kib("VmRSS") or 0) * 1024
            self.method = "process peak RSS (VmHWM reset)"
        else:
            self._start = _maxrss_bytes()
            self.method = "process peak RSS (ru_maxrss)"
        return self

    def __exit__(self, *exc: object) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            peak = torch.cuda.max_memory_allocated(self.device)
        elif self.method.endswith("(VmHWM reset)"):
            peak = (_status_kib("VmHWM") or 0) * 1024
        else:
            peak = _maxrss_bytes()
        self.peak_bytes = max(0, peak - self._start)
