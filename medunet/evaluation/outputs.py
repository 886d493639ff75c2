"""Write the per-case CSV and an nnU-Net-compatible ``summary.json``.

``summary.json`` has nnU-Net v2's keys, so its readers (``load_summary_json``) and habits carry over:
``metric_per_case`` (one entry per case with ``metrics`` by label, ``prediction_file``, ``reference_file``),
``mean`` (per label, NaN-ignoring mean over cases) and ``foreground_mean`` (mean of the per-label means).
nnU-Net's metric names (``Dice``, ``IoU``, ``TP``, ``FP``, ``FN``, ``TN``, ``n_pred``, ``n_ref``) are kept;
medunet's extra metrics follow under their own names (``hd95_mm``, ``assd_mm``, ``nsd``, volumes, ...).
The full statistics (median, IQR, CI, ...) are under the extra key ``medunet``. Like nnU-Net, NaN is
written as the JSON token ``NaN``.
"""

from __future__ import annotations

import csv
import io
import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from medunet.atomic import atomic_write_text
from medunet.evaluation.aggregate import FOREGROUND
from medunet.evaluation.metrics import METRIC_NAMES

CSV_COLUMNS = (
    ("case", "label", "label_name", "status", "failure")
    + METRIC_NAMES
    + ("nsd_tolerance_mm", "prediction_file", "reference_file", "note")
)
_NNUNET_NAMES = {"dice": "Dice", "iou": "IoU", "tp": "TP", "fp": "FP", "fn": "FN", "tn": "TN"}


def write_case_csv(rows: Sequence[Mapping[str, Any]], path: Path) -> Path:
    """One row per case and label, columns :data:`CSV_COLUMNS`; NaN written as an empty cell (atomically)."""
    stream = io.StringIO(newline="")
    writer = csv.DictWriter(stream, fieldnames=CSV_COLUMNS, extrasaction="ignore")
    writer.writeheader()
    for row in rows:
        writer.writerow({key: _csv_value(row.get(key)) for key in CSV_COLUMNS})
    atomic_write_text(stream.getvalue(), path)
    return path


def summary_json(
    rows: Sequence[Mapping[str, Any]], aggregates: Mapping[str, Mapping], extra: Mapping[str, Any]
) -> dict[str, Any]:
    """The ``summary.json`` content (see the module docstring)."""
    per_case: dict[str, dict[str, Any]] = {}
    for row in rows:
        entry = per_case.setdefault(
            row["case"],
            {"metrics": {}, "prediction_file": row["prediction_file"], "reference_file": row["reference_file"]},
        )
        entry["metrics"][str(row["label"])] = _nnunet_metrics({m: row[m] for m in METRIC_NAMES})
    label_keys = [key for key in aggregates if key != FOREGROUND]
    mean = {key: _nnunet_metrics({m: aggregates[key][m]["mean"] for m in METRIC_NAMES}) for key in label_keys}
    foreground_mean = {
        name: _mean([mean[key][name] for key in label_keys]) for name in _nnunet_metrics(dict.fromkeys(METRIC_NAMES))
    }
    return {
        "foreground_mean": foreground_mean,
        "mean": mean,
        "metric_per_case": list(per_case.values()),
        "medunet": {"statistics": aggregates, **extra},
    }


def write_summary_json(summary: Mapping[str, Any], path: Path) -> Path:
    """Write ``summary.json`` (indented, NaN as ``NaN`` like nnU-Net) atomically."""
    atomic_write_text(json.dumps(summary, indent=2, default=str), path)
    return path


def _nnunet_metrics(metrics: Mapping[str, Any]) -> dict[str, Any]:
    return {_NNUNET_NAMES.get(name, name): value for name, value in metrics.items()}


def _mean(values: Sequence[float]) -> float:
    return sum(values) / len(values) if values else math.nan


def _csv_value(value: Any) -> Any:
    if isinstance(value, float) and math.isnan(value):
        return ""
    if isinstance(value, float) and value.is_integer() and abs(value) < 1e15:
        return int(value)
    return value
