"""Evaluation of segmentations: per-case metrics, aggregates, CSV/summary.json and clinical-style reports.

Data flows one way: :mod:`cases` (match and read files) → :mod:`metrics` (one case) →
:mod:`aggregate` (statistics over cases) → :mod:`outputs` and :mod:`report` (files);
:mod:`evaluate` runs that chain over two folders and is what the CLI and workflows call.
"""

from medunet.evaluation.evaluate import EvaluationResult, evaluate_folders
from medunet.evaluation.metrics import evaluate_case

__all__ = ["EvaluationResult", "evaluate_case", "evaluate_folders"]
