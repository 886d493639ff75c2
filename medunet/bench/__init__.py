"""``medunet bench``: efficiency and accuracy of every network side by side, against MONAI baselines."""

from medunet.bench.efficiency import (
    BENCH_NETWORKS,
    QUICK_NETWORKS,
    EfficiencyResult,
    run_efficiency,
    sliding_window_throughput,
)

__all__ = ["BENCH_NETWORKS", "QUICK_NETWORKS", "EfficiencyResult", "run_efficiency", "sliding_window_throughput"]
