"""Measure what a network costs: parameters, size, multiply-adds, peak memory, skip memory, latency."""

from medunet.profiling.memory import PeakMemory
from medunet.profiling.profiler import ProfileResult, count_macs, measure_peak, parse_shape, profile
from medunet.profiling.skips import measure_skip_bytes
from medunet.profiling.table import comparison_rows, markdown_table

__all__ = [
    "PeakMemory",
    "ProfileResult",
    "comparison_rows",
    "count_macs",
    "markdown_table",
    "measure_peak",
    "measure_skip_bytes",
    "parse_shape",
    "profile",
]
