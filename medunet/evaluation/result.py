"""What an evaluation found: per-case rows, aggregates, labels, problems, provenance and the files written.

Computed by :func:`medunet.evaluation.compute_evaluation`, written by :func:`medunet.evaluation.write_evaluation`
(``cases.csv``, ``summary.json``, the report), read by the report and by tracking (``metrics()``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from medunet.evaluation.aggregate import FOREGROUND, foreground_per_case
from medunet.evaluation.metrics import COUNT_METRICS


@dataclass
class EvaluationResult:
    """Per-case rows, aggregates and the files written by :func:`evaluate_folders`."""

    rows: list[dict[str, Any]]
    aggregates: dict[str, dict[str, dict[str, float]]]
    labels: dict[int, str]
    problems: list[str]
    provenance: dict[str, Any]
    files: dict[str, Path] = field(default_factory=dict)

    def mean(self, metric: str = "dice", label: int | str = FOREGROUND) -> float:
        """Mean of a metric over cases for one label value or ``"foreground"``."""
        return self.aggregates[str(label)][metric]["mean"]

    def metrics(self, prefix: str = "eval") -> dict[str, float]:
        """Plain numbers for tracking: ``<prefix>_<metric>_<label name>`` (mean over cases) and
        ``<prefix>_n_cases``; counts (TP, FP, ...) are left to ``cases.csv``."""
        names = {str(value): str(name) for value, name in self.labels.items()}
        values: dict[str, float] = {}
        for label_key, per_metric in self.aggregates.items():
            label = names.get(str(label_key), str(label_key))
            for metric, stats in per_metric.items():
                if metric not in COUNT_METRICS:
                    values[f"{prefix}_{metric}_{label}"] = float(stats["mean"])
                    values.setdefault(f"{prefix}_n_cases", float(stats.get("n_cases", float("nan"))))
        return values

    def as_params(self) -> dict[str, Any]:
        """What was evaluated (the provenance given by the caller), as plain data."""
        return {"evaluation": {key: value for key, value in self.provenance.items()
                               if isinstance(value, (str, int, float, bool))}}

    def foreground_per_case(self) -> list[dict[str, float]]:
        """One row per case, its foreground labels combined (see :mod:`medunet.evaluation.aggregate`)."""
        return foreground_per_case(self.rows)

    def to_dataframe(self):
        """The per-case rows as a pandas DataFrame (needs pandas)."""
        import pandas as pd

        return pd.DataFrame(self.rows)
