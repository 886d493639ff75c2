"""Summary statistics of per-case metrics, per label and over the foreground labels.

For each label and metric: mean ± std (sample std, ddof=1), median, IQR (25th-75th percentile), 5th and
95th percentiles, the number of valid (finite) values, the number of failures (see
:mod:`medunet.evaluation.metrics`) and a bootstrap 95% confidence interval of the mean (percentile
bootstrap over cases, 2000 resamples, fixed seed so reports are reproducible).

"foreground" aggregates first average each case over its foreground labels (ignoring NaN labels, i.e.
structures absent from both reference and prediction), then summarise those per-case means. Its mean equals
nnU-Net's ``foreground_mean`` (the mean of the per-label means) whenever no value is NaN, and unlike the
mean of means it has a meaningful spread and confidence interval. Voxel counts and volumes are summed over
labels rather than averaged.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence

import numpy as np

from medunet.evaluation.metrics import COUNT_METRICS, METRIC_NAMES, VOLUME_METRICS

FOREGROUND = "foreground"
BOOTSTRAP_RESAMPLES = 2000
_SUMMED_OVER_LABELS = set(COUNT_METRICS) | (set(VOLUME_METRICS) - {"volume_error_pct"})


def describe(values: Sequence[float], n_failures: int = 0, seed: int = 0) -> dict[str, float]:
    """Summary statistics of one metric over cases; NaN values are left out and counted as not valid."""
    array = np.asarray(values, dtype=float)
    valid = array[np.isfinite(array)]
    stats = {"n_cases": float(array.size), "n_valid": float(valid.size), "n_failures": float(n_failures)}
    if valid.size == 0:
        nan_fields = ("mean", "std", "median", "q25", "q75", "p05", "p95", "ci_low", "ci_high")
        return stats | dict.fromkeys(nan_fields, math.nan)
    q05, q25, q50, q75, q95 = np.percentile(valid, [5, 25, 50, 75, 95])
    ci_low, ci_high = bootstrap_ci(valid, seed=seed)
    return stats | {
        "mean": float(valid.mean()),
        "std": float(valid.std(ddof=1)) if valid.size > 1 else math.nan,
        "median": float(q50),
        "q25": float(q25),
        "q75": float(q75),
        "p05": float(q05),
        "p95": float(q95),
        "ci_low": ci_low,
        "ci_high": ci_high,
    }


def bootstrap_ci(
    values: np.ndarray, level: float = 0.95, resamples: int = BOOTSTRAP_RESAMPLES, seed: int = 0
) -> tuple[float, float]:
    """Percentile-bootstrap confidence interval of the mean of ``values`` (finite values only)."""
    values = np.asarray(values, dtype=float)
    if values.size < 2:
        return math.nan, math.nan
    rng = np.random.default_rng(seed)
    means = values[rng.integers(0, values.size, size=(resamples, values.size))].mean(axis=1)
    tail = 100 * (1 - level) / 2
    low, high = np.percentile(means, [tail, 100 - tail])
    return float(low), float(high)


def aggregate(rows: Iterable[Mapping], labels: Mapping[int, str]) -> dict[str, dict[str, dict[str, float]]]:
    """Statistics per label (keyed by the label value as a string) and for ``"foreground"``.

    ``rows`` are per-case, per-label dicts with ``case``, ``label``, ``failure`` and the metrics.
    Returns ``{label_key: {metric: {"mean": ..., "median": ..., ...}}}``.
    """
    rows = list(rows)
    result = {}
    for label in sorted(labels):
        label_rows = [row for row in rows if row["label"] == label]
        failures = sum(bool(row["failure"]) for row in label_rows)
        result[str(label)] = {
            metric: describe([row[metric] for row in label_rows], failures) for metric in METRIC_NAMES
        }
    per_case = foreground_per_case(rows)
    failures = sum(bool(case["failure"]) for case in per_case)
    result[FOREGROUND] = {metric: describe([case[metric] for case in per_case], failures) for metric in METRIC_NAMES}
    return result


def foreground_per_case(rows: Iterable[Mapping]) -> list[dict[str, float]]:
    """One row per case combining its foreground labels (mean of rates, sum of counts and volumes).

    A case is a failure here when any of its labels is.
    """
    by_case: dict[str, list[Mapping]] = {}
    for row in rows:
        by_case.setdefault(row["case"], []).append(row)
    combined = []
    for case, case_rows in by_case.items():
        entry: dict[str, float] = {"case": case, "failure": any(bool(row["failure"]) for row in case_rows)}
        for metric in METRIC_NAMES:
            values = np.array([row[metric] for row in case_rows], dtype=float)
            entry[metric] = _combine(metric, values)
        combined.append(entry)
    return combined


def _combine(metric: str, values: np.ndarray) -> float:
    if metric in _SUMMED_OVER_LABELS:
        return float(values.sum())
    finite = values[np.isfinite(values)]
    return float(finite.mean()) if finite.size else math.nan
