"""Evaluation of segmentations: per-case metrics, aggregates, CSV/summary.json and clinical-style reports.

Data flows one way: :mod:`cases` (match and read files) → :mod:`metrics` (one case) →
:mod:`aggregate` (statistics over cases) → :mod:`result` (what was found) → :mod:`outputs` and :mod:`report`
(files). :func:`compute_evaluation` scores two folders and writes nothing; :func:`write_evaluation` writes a
result; :func:`evaluate_folders` does both and is what the CLI and workflows call.
"""

from medunet.evaluation.evaluate import compute_evaluation, evaluate_folders, write_evaluation
from medunet.evaluation.metrics import evaluate_case
from medunet.evaluation.result import EvaluationResult

__all__ = ["EvaluationResult", "compute_evaluation", "evaluate_case", "evaluate_folders", "write_evaluation"]
